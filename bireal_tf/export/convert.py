"""`export_tflite`: convert a Bi-Real Net with LCE, verify the flatbuffer, measure it.

Conversion goes through LCE (`larq_compute_engine.convert_saved_model` of
`saved_for_conversion`). Then, before anything is written:

1. every Keras binary conv (`binary_conv_layers`) must be an `LceBconv2d`; the ones
   that stayed float are named (`checks.float_binary_convs`);
2. the .tflite, run by LCE's interpreter, must give the Keras model's outputs
   (`checks.compare_outputs`; LCE's zero-padding hazard makes any difference a
   mismatch);
3. the report gives the size beside its floor (`size_floor`) and, unless
   `latency=None`, the host latency per thread count.

A failed check raises `ExportError` and writes nothing, unless allowed
(`allow_float_convs`, `allow_mismatch`): then the report's `warnings` say what is
wrong and `warnings.warn` repeats it.

`export_tflite` checks its arguments, loads the model and gathers them into an
`ExportJob` (options grouped: `ParitySettings`, `LatencySettings`, `Allowed`,
`Predictor`); `export_lce` and `export_portable` (with its `LceComparison`) do the rest.

`target="portable"` makes a file of builtin ops only, for stock LiteRT
(`bireal_tf.export.portable` has the lowering); it is verified the same way, through
LiteRT, and compared with the LCE file of the same model. Beside it go the labels and
preprocessing (`<file>.tflite.json`) and the predictor (`predict.py`).
"""

import contextlib
import os
import platform
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bireal_tf.export.checks import (ParitySettings, compare_outputs, float_binary_convs,
                                     int8_check, lce_zero_padding_hazards, sign_margins)
from bireal_tf.export.files import (ExportError, ModelFileError, check_output_path, first_line,
                                    load_keras_model)
from bireal_tf.export.flatbuffer import TFLiteGraph
from bireal_tf.export.metadata import class_names, model_metadata, run_dataset, sidecar_path
from bireal_tf.export.report import BinaryConvCheck, ExportReport, HostLatency, LceAgreement
from bireal_tf.export.runtime import (HOST_LATENCY_NOTE, LITERT_LATENCY_NOTE, LiteRTRunner,
                                      TFLiteRunner, measure_latency)
from bireal_tf.export.size import int8_size_floor, size_floor
from bireal_tf.models.int8 import fake_quant_layers
from bireal_tf.models.precision import float32_config, mixed_precision_policies
from bireal_tf.utils import atomic_write_bytes, atomic_write_text

__all__ = ["TARGETS", "Allowed", "ExportJob", "ExportWarning", "LatencySettings", "LceComparison",
           "Predictor", "convert", "convert_portable", "export_lce", "export_portable",
           "export_tflite", "float32_twin"]

TARGETS = ("lce", "portable")

_ZERO_PADDING = (
    "LCE's optimized LceBconv2d kernel computes zero padding (pad_values=0.0) wrongly when "
    "a binary conv's input is smaller than its kernel (its zero-padding correction assumes "
    "filter <= image; LCE's reference kernel is right); affected: {}. Fix: build the network "
    "with pad_values=1.0 (LCE's native padding; retrain or finetune briefly), or export at a "
    "larger input size so every binary conv's input is at least its kernel size (Bi-Real Net "
    "18/34/50: input >= 65x65)."
)


class ExportWarning(UserWarning):
    """An allowed export problem (float convs, output mismatch): the report lists it too."""


@dataclass(frozen=True)
class LatencySettings:
    """Host latency, batch 1: median of `runs` after `warmup` runs, per thread count."""

    threads: tuple[int, ...] = (1, 2)
    runs: int = 10
    warmup: int = 2


@contextlib.contextmanager
def saved_for_conversion(model):
    """A temporary directory holding `model`'s inference function as a SavedModel, for the
    converters; removed on exit.

    `lce.convert_keras_model` and `tf.lite.TFLiteConverter.from_keras_model` save the whole
    Keras model first (`model.save(save_format="tf")`), which traces every layer's call
    functions for Keras' own reloading: measured here, 95% of an R18 conversion. The
    converters read only the serving signature, so this saves just that: the model in
    inference mode with Keras' input and output names. LCE's flatbuffer is byte-identical
    (measured for float and int8 Bi-Real-18; tests/test_export.py checks a float net) and
    comes 2-3x sooner.
    """
    import tensorflow as tf

    spec = tf.TensorSpec((None, *model.inputs[0].shape[1:]), model.inputs[0].dtype,
                         name=model.inputs[0].name.split(":")[0])
    serve = tf.function(lambda x: {model.output_names[0]: model(x, training=False)},
                        input_signature=[spec])
    holder = tf.Module()  # tracks the variables only, not the Keras objects
    holder.variables_of_model = list(model.weights)
    holder.serve = serve
    with tempfile.TemporaryDirectory() as directory:
        tf.saved_model.save(holder, directory,
                            signatures={"serving_default": serve.get_concrete_function()})
        yield directory


def convert(model, io_type: str = "float32") -> tuple[bytes, float]:
    """LCE conversion; (flatbuffer, seconds). `io_type` "int8" asks for int8 input and output."""
    import larq_compute_engine as lce
    import tensorflow as tf

    start = time.perf_counter()
    dtype = {"float32": tf.float32, "int8": tf.int8}[io_type]
    try:
        with saved_for_conversion(model) as directory:
            flatbuffer = lce.convert_saved_model(directory, inference_input_type=dtype,
                                                 inference_output_type=dtype)
    except Exception as err:
        raise ExportError(f"LCE could not convert model '{model.name}' ({first_line(err, 400)}).") from err
    return bytes(flatbuffer), time.perf_counter() - start


def convert_portable(model, io_type: str = "float32") -> tuple[bytes, bytes | None, list, float]:
    """Portable conversion: (flatbuffer, its float32 twin, the lowered convs, seconds).

    A float model: the float twin is the same graph with the binary kernels in float32
    (the converter's output before `lower_binary_kernels`). An int8 model (fake-quant
    layers): the converter quantizes the twin from its fake-quant ops into a fully int8
    file (int8 I/O with `io_type="int8"`), and there is no float twin (None).
    """
    import tensorflow as tf

    from bireal_tf.export.portable import find_int8_binary_convs, lower_binary_kernels, portable_twin

    start = time.perf_counter()
    twin = portable_twin(model)
    quantized = bool(fake_quant_layers(model))
    try:
        with saved_for_conversion(twin) as directory:
            converter = tf.lite.TFLiteConverter.from_saved_model(directory)
            if quantized:
                converter.optimizations = [tf.lite.Optimize.DEFAULT]
                converter.inference_input_type = converter.inference_output_type = {
                    "float32": tf.float32, "int8": tf.int8}[io_type]
            converted = bytes(converter.convert())
    except Exception as err:
        raise ExportError(f"TFLite could not convert the portable twin of model '{model.name}' "
                          f"({first_line(err, 400)}).") from err
    if quantized:
        return converted, None, find_int8_binary_convs(converted, model), time.perf_counter() - start
    flatbuffer, lowered = lower_binary_kernels(converted, model)
    return flatbuffer, converted, lowered, time.perf_counter() - start


def float32_twin(model, input_shape=None):
    """The same network and weights with every layer computing in float32.

    A model trained under a mixed precision policy computes in bfloat16/float16 with
    float32 variables; TFLite converts float32 graphs only. The twin is rebuilt from
    the config with each mixed policy replaced by float32 (and, given `input_shape`
    (H, W, C), that input shape). A float32 model of the asked shape is returned as is.
    """
    if len(model.inputs) != 1 or len(model.outputs) != 1:
        raise ExportError(f"Model '{model.name}' has {len(model.inputs)} inputs and "
                          f"{len(model.outputs)} outputs; export_tflite takes one of each.")
    shape = tuple(model.inputs[0].shape[1:])
    if input_shape is not None:
        input_shape = tuple(int(d) for d in input_shape)
        if len(input_shape) != len(shape) or any(s not in (None, t) for s, t in zip(shape, input_shape)):
            raise ExportError(f"input_shape {input_shape} does not fit model '{model.name}', "
                              f"whose input is {shape}.")
    elif None in shape:
        raise ExportError(
            f"Model '{model.name}' has the input shape {shape} with free dimensions; a .tflite "
            "needs fixed ones. Pass input_shape=(H, W, 3) (CLI: --input-size H W) or build the "
            "model with a fixed input_shape.")
    if not mixed_precision_policies(model) and (input_shape is None or input_shape == shape):
        return model
    try:
        config = float32_config(model.get_config())
        if input_shape is not None:
            (layer,) = [c for c in config["layers"] if c["class_name"] == "InputLayer"]
            layer["config"]["batch_input_shape"] = (None,) + input_shape
        twin = model.__class__.from_config(config)
    except (NotImplementedError, KeyError, ValueError) as err:
        raise ExportError(
            f"Model '{model.name}' (precision {sorted(mixed_precision_policies(model))}, input "
            f"{shape}) cannot be rebuilt from its config in float32 with a fixed input shape "
            f"({first_line(err)}). Build it again under tf.keras.mixed_precision."
            "set_global_policy('float32') with a fixed input_shape and copy the weights "
            "(model.get_weights()), or export a functional model."
        ) from err
    twin.set_weights(model.get_weights())
    return twin


def _parity_inputs(model, sample_inputs, settings: ParitySettings):
    """(inputs, kind) for the parity check: up to `settings.samples` of `sample_inputs`
    (an array, a tf.data.Dataset of batches of images or (images, labels), a DatasetSpec),
    or random."""
    import tensorflow as tf

    shape = tuple(model.inputs[0].shape[1:])
    if sample_inputs is not None:
        data = getattr(sample_inputs, "dataset", sample_inputs)
        if isinstance(data, tf.data.Dataset):
            images = [np.asarray(e[0] if isinstance(e, (tuple, list)) else e) for e in
                      data.unbatch().batch(settings.samples).take(1)]
            data = images[0] if images else np.zeros((0,) + shape)
        x = np.asarray(data, dtype=np.float32)[:settings.samples]
        if x.shape[1:] != shape or len(x) == 0:
            raise ExportError(f"sample_inputs of shape {x.shape} do not fit the model's input "
                              f"(N, {', '.join(str(d) for d in shape)}).")
        return x, "sample_inputs"
    rng = np.random.default_rng(settings.seed)
    x = rng.standard_normal((settings.samples * settings.pool,) + shape).astype(np.float32)
    margins = sign_margins(model, x) if settings.pool > 1 else None
    if margins is None:
        return x[:settings.samples], "random_normal"
    return x[np.argsort(-margins, kind="stable")[:settings.samples]], "random_normal_clearest"


@dataclass(frozen=True)
class Allowed:
    """What may be exported anyway, with a warning in the report, instead of refused."""

    float_convs: bool = False  # binary convs that stayed float, or none at all
    mismatch: bool = False  # outputs that disagree with Keras (verdict "mismatch")


@dataclass(frozen=True)
class Predictor:
    """The device-side predictor's files beside the .tflite: the dataset whose evaluation
    preprocessing it applies, and the class names it prints."""

    dataset: str
    labels: tuple[str, ...]


@dataclass(frozen=True)
class LceComparison:
    """Portable target: compare with the LCE file of the same model, and maybe keep that file."""

    enabled: bool = True
    path: Path | None = None


@dataclass(frozen=True)
class ExportJob:
    """One export, as both targets see it once the arguments are checked and the model loaded.

    `model` is the float32 twin of the one given, `layers` its binary convs, `hazards`
    LCE's zero-padding hazards in words ("" if none), `warnings` the report's warnings
    so far (the checks add to it).
    """

    model: object
    out_path: Path
    source: str
    keras_precision: str
    layers: list
    quantized: bool
    hazards: str
    io_type: str
    sample_inputs: object
    parity: ParitySettings
    latency: LatencySettings | None
    allowed: Allowed
    report_path: object
    predictor: Predictor | None
    warnings: list


def _warn(report_warnings, message):
    report_warnings.append(message)
    warnings.warn(message, ExportWarning, stacklevel=2)


def _refuse_unless(allowed: bool, flag: str, message: str, report_warnings):
    """ExportError(message), or, when the user allowed it with `flag`, a warning."""
    if not allowed:
        raise ExportError(f"{message} Pass {flag}=True (CLI: --{flag.replace('_', '-')}) "
                          "to export anyway.")
    _warn(report_warnings, f"{message} Exported anyway ({flag}=True).")


def export_tflite(model, path, *, sample_inputs=None, allow_float_convs: bool = False,
                  allow_mismatch: bool = False, parity: ParitySettings = ParitySettings(),
                  latency: LatencySettings | None = LatencySettings(), io_type: str = "float32",
                  input_shape=None, report_path=None, target: str = "lce", dataset=None,
                  data_dir=None, labels=None, write_predictor=None,
                  compare_lce: bool = True, lce_path=None) -> ExportReport:
    """Convert `model` to an LCE (or portable) .tflite at `path`, verify it and report on it.

    Args:
        model: a Keras model, or the path of one saved by the training CLI
            (`.keras`, `.h5`, SavedModel directory). A mixed precision model is
            converted and compared as its `float32_twin`.
        path: the .tflite to write; its directory must exist. Written atomically,
            and only when every check passes or is allowed.
        sample_inputs: inputs for the Keras-vs-.tflite check: an array [N, H, W, C], a
            tf.data.Dataset of batches of images or of (images, labels), or a DatasetSpec.
            Default: random normal inputs (see `parity`).
        allow_float_convs: export even if binary convs stayed float, or there are none.
        allow_mismatch: export even if the outputs disagree (verdict "mismatch").
        parity: ParitySettings (number of inputs, tolerances, sign margin).
        latency: LatencySettings for the host latency, or None to skip it.
        io_type: "float32", or "int8" for int8 input and output, which needs a model
            with fake-quant ops (`bireal_tf.models.int8_model`, finetuned). Such a model
            is converted to int8 ops with either io_type; its parity uses the int8
            tolerance (`ParitySettings.int8_rtol`), its size the int8 floor.
        input_shape: (H, W, C) for a model whose input has free dimensions.
        report_path: also write the report JSON there (atomically).
        target: "lce" (LCE's custom ops: LceBconv2d, ...) or "portable" (builtin ops only,
            for stock LiteRT: binary convs as hybrid CONV_2D with int8 +-1 kernels on 0/1
            inputs, exact; an int8 model: a fully int8 file, its binary convs int8 CONV_2D
            on +-1; see `bireal_tf.export.portable`). A portable file is checked
            through LiteRT (`ai_edge_litert`) and, with `compare_lce`, against the LCE
            file of the same model on the parity inputs.
        dataset, data_dir, labels: what the predictor needs (the class names and the
            evaluation preprocessing of `dataset`), written as `<path>.json`. Default: the
            dataset recorded by the training CLI beside a saved model (summary.json);
            `labels` (a list of class names) overrides the dataset's names.
        write_predictor: write `<path>.json` and copy `predict.py` beside the .tflite
            (default: for target "portable").
        compare_lce, lce_path: portable target: compare with the LCE file of the same model
            (default yes), and also write that LCE file to `lce_path` (CLI --lce-output).

    Raises:
        ModelFileError: missing or corrupt model file, missing output directory.
        ExportError: conversion failed, binary convs stayed float (naming them), no
            binary conv, outputs disagree, or int8 I/O asked of a model without fake-quant ops.
    """
    if io_type not in ("float32", "int8"):
        raise ValueError(f"io_type must be 'float32' or 'int8', got {io_type!r}.")
    if target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}, got {target!r}.")
    out_path = check_output_path(path, "output .tflite")
    if report_path is not None:
        check_output_path(report_path, "report file")
    lce = _lce_comparison(target, compare_lce, lce_path)
    write_predictor = target == "portable" if write_predictor is None else bool(write_predictor)
    if write_predictor and report_path is not None and Path(report_path) == sidecar_path(out_path):
        raise ModelFileError(f"The report '{report_path}' would overwrite the predictor's labels and "
                             "preprocessing file; give the report another name.")
    predictor = _predictor(model, dataset, data_dir, labels) if write_predictor else None
    source, model = _load(model)
    keras_precision = ",".join(sorted(mixed_precision_policies(model))) or "float32"
    job = _new_job(float32_twin(model, input_shape), out_path, source, keras_precision,
                   io_type=io_type, sample_inputs=sample_inputs, parity=parity, latency=latency,
                   allowed=Allowed(allow_float_convs, allow_mismatch), report_path=report_path,
                   predictor=predictor)
    if target == "portable":
        return export_portable(job, lce)
    return export_lce(job)


def _lce_comparison(target, compare_lce, lce_path) -> LceComparison:
    """LceComparison of the arguments; ValueError for an LCE path the export would not write."""
    if lce_path is not None:
        if target != "portable" or not compare_lce:
            raise ValueError("lce_path is for target='portable' with compare_lce=True: the LCE file "
                             "it is compared with.")
        lce_path = check_output_path(lce_path, "LCE .tflite")
    return LceComparison(bool(compare_lce), lce_path)


def _predictor(model, dataset, data_dir, labels) -> Predictor:
    """The predictor's dataset and class names: as given, or as recorded beside a saved model
    by the training CLI (summary.json); ExportError when there is neither."""
    if dataset is None:
        dataset, recorded_dir = run_dataset(model if isinstance(model, (str, os.PathLike)) else None)
        data_dir = data_dir or recorded_dir
    if dataset is None:
        raise ExportError(
            "The predictor needs the class names and preprocessing of the training data, and "
            "none is recorded beside the model (no summary.json of a training run). Pass "
            "dataset='fashion_mnist_embedded' / 'imagenet2012' / ... (CLI --dataset NAME), or "
            "write_predictor=False (CLI --no-predictor).")
    names = [str(n) for n in labels] if labels is not None else class_names(dataset, data_dir)
    return Predictor(dataset, tuple(names))


def _load(model):
    """(source, Keras model) of a model or the path of a saved one."""
    import tensorflow as tf

    if isinstance(model, (str, os.PathLike)):
        return str(model), load_keras_model(model)
    if isinstance(model, tf.keras.Model):
        return f"<in-memory Keras model '{model.name}'>", model
    raise ModelFileError(
        f"model must be a Keras model or the path of a saved one, got {type(model).__name__}.")


def _new_job(model, out_path, source, keras_precision, allowed: Allowed, **options) -> ExportJob:
    """The ExportJob of a float32 model; refuses (unless allowed) a model without binary convs."""
    from bireal_tf.models import binary_conv_layers

    report_warnings = []
    layers = binary_conv_layers(model)
    if not layers:
        message = (f"Model '{model.name}' has no Larq binary conv (a QuantConv2D with both an "
                   "input_quantizer and a kernel_quantizer), so LCE would produce a float model "
                   "with no LceBconv2d. Build the binary network (activation='binary').")
        _refuse_unless(allowed.float_convs, "allow_float_convs", message, report_warnings)
    hazards = ", ".join(f"{name} (input {h}x{w}, kernel {kh}x{kw})"
                        for name, (h, w), (kh, kw) in lce_zero_padding_hazards(model))
    return ExportJob(model, out_path, source, keras_precision, layers,
                     bool(fake_quant_layers(model)), hazards, allowed=allowed,
                     warnings=report_warnings, **options)


# --- target "lce" ----------------------------------------------------------------------------

def export_lce(job: ExportJob) -> ExportReport:
    """export_tflite(target="lce"): LCE's file, its binary convs, parity and size checked."""
    model = job.model
    if job.io_type == "int8" and not job.quantized:
        raise ExportError(
            f"int8 I/O needs a model trained with fake quantization: model '{model.name}' has no "
            "FakeQuant layer, so LCE has no int8 ranges for it. Make one with "
            "bireal_tf.models.int8_model(model), finetune it for a few epochs "
            "(`python -m bireal_tf.recipes.int8 MODEL -o OUT.keras --epochs N`, or "
            "bireal_tf.recipes.int8.finetune_int8), and export the saved .keras.")
    flatbuffer, seconds = convert(model, job.io_type)
    graph = TFLiteGraph(flatbuffer)
    (lite_in,), (lite_out,) = graph.inputs, graph.outputs
    if (lite_in.type, lite_out.type) != (job.io_type, job.io_type):
        raise ExportError(f"io_type={job.io_type} was asked for, but LCE produced a {lite_in.type} "
                          f"input and a {lite_out.type} output: int8 I/O needs a model trained "
                          "with fake quantization.")
    binary_check = _check_lce_binary_convs(job, graph)
    x, kind = _parity_inputs(model, job.sample_inputs, job.parity)
    check = _check_lce_parity(job, flatbuffer, x, kind)
    size = int8_size_floor(model) if job.quantized else size_floor(model)
    size.file_bytes, size.ratio = len(flatbuffer), round(len(flatbuffer) / max(1, size.floor_bytes), 4)
    report = _new_report(job, graph, seconds, _host_latency(flatbuffer, x, job.latency, "lce"),
                         _lce_version(), binary_convs=binary_check, parity=check, size=size,
                         int8=int8_check(model, graph) if job.quantized else None)
    return _write(job, flatbuffer, report, graph, "lce")


def _check_lce_binary_convs(job: ExportJob, graph) -> BinaryConvCheck:
    """Every Keras binary conv must be an LceBconv2d: the count is the check; the weights
    name the culprits (`float_binary_convs`)."""
    layers = job.layers
    n_bconv = graph.histogram["LceBconv2d"]
    binary_ok = n_bconv >= len(layers)
    float_ops = {} if binary_ok else float_binary_convs(graph, layers)
    if not binary_ok:
        described = ", ".join(name if op == "?" else f"{name} (became {op})"
                              for name, op in float_ops.items()) or "<could not identify which>"
        message = (f"LCE made {n_bconv} of the {len(layers)} binary convs of model '{job.model.name}' "
                   f"binary; these stayed float: {described}. LCE binarizes a QuantConv2D only "
                   "when its input quantizer is sign-like (Larq's sign(sign(x) + 0.1), e.g. "
                   "bireal_tf's ApproxSign) applied directly to the conv input, and its kernel "
                   "quantizer gives +-1 times a per-channel scale. Fix those layers.")
        _refuse_unless(job.allowed.float_convs, "allow_float_convs", message, job.warnings)
    return BinaryConvCheck(len(layers), n_bconv, binary_ok, list(float_ops),
                           {k: v for k, v in float_ops.items() if v != "?"})


def _check_lce_parity(job: ExportJob, flatbuffer, x, kind: str):
    """Keras vs the LCE file on inputs x (`compare_outputs`); the verdict becomes a warning,
    or, for a mismatch, a refusal that says whether LCE's optimized kernel is at fault."""
    check, keras = compare_outputs(job.model, flatbuffer, x, job.parity, bool(job.hazards),
                                   int8=job.quantized)
    check.inputs = kind
    words = {"sample_inputs": "sample", "random_normal": "random normal",
             "random_normal_clearest": "random normal (clearest of a pool)"}[kind]
    summary = (f"{check.samples_within_tolerance} of {check.num_samples} {words} inputs agree within "
               f"{check.tolerance:.3g} (max |difference| {check.max_abs_diff:.4g}, max |output| "
               f"{check.max_abs_keras_output:.3g}); {check.clear_samples} of them are clear of the "
               f"sign threshold (every pre-sign activation >= {check.sign_margin_threshold:g} x its "
               f"layer's max from zero), {check.clear_samples_within_tolerance} of those agree; "
               f"top-1 agreement {100 * check.top1_agreement:.1f}%")
    if check.verdict == "int8_top1":
        _warn(job.warnings, _int8_parity_warning(check, job.parity, "outputs", ".tflite"))
    elif check.verdict == "sign_flips":
        _warn(job.warnings, f"Some outputs differ from Keras: {summary}. Every input that "
                            "differs has an activation within rounding of the sign threshold, "
                            "which LCE (BatchNorm folded) and Keras may binarize differently "
                            "(sign flips); the inputs clear of it, or most inputs, agree, while "
                            "a conversion fault would move them all.")
    elif check.verdict == "inconclusive":
        _warn(job.warnings, f"Parity is inconclusive: {summary}. Most inputs differ and none is "
                            "clear of the sign threshold, so sign flips cannot be told from a "
                            "fault; compare accuracy on data with `python -m bireal_tf.evaluate` "
                            "(Keras model and .tflite).")
    elif check.verdict == "mismatch":
        _refuse_unless(job.allowed.mismatch, "allow_mismatch",
                       _lce_mismatch(job, flatbuffer, x, keras, check, summary), job.warnings)
    if job.hazards and check.verdict != "mismatch":
        _warn(job.warnings, _ZERO_PADDING.format(job.hazards))
    return check


def _lce_mismatch(job, flatbuffer, x, keras, check, summary) -> str:
    """Why the LCE file disagrees, as far as LCE's reference kernel can tell."""
    reference = TFLiteRunner(flatbuffer, use_reference_bconv=True).predict(x)
    ref_within = int(np.sum(np.abs(keras - reference).reshape(len(x), -1).max(1) <= check.tolerance))
    message = (f"The .tflite disagrees with the Keras model: {summary}. With LCE's reference "
               f"bconv kernel {ref_within} of {check.num_samples} inputs agree")
    if job.hazards:
        return message + ". Likely cause: " + _ZERO_PADDING.format(job.hazards)
    if ref_within == check.num_samples:
        return message + ": LCE's optimized LceBconv2d kernel is at fault."
    return message + "."
def _host_latency(flatbuffer, x, latency, runtime):
    """HostLatency of the flatbuffer on `runtime` ("lce" | "litert"), or None without settings."""
    if latency is None:
        return None
    results = measure_latency(flatbuffer, x[:1], latency.threads, latency.runs, latency.warmup,
                              runtime=runtime)
    note = HOST_LATENCY_NOTE if runtime == "lce" else LITERT_LATENCY_NOTE
    return HostLatency(platform.machine(), platform.processor() or platform.machine(),
                       os.cpu_count() or 1, note, latency.warmup, latency.runs, results)


def _new_report(job: ExportJob, graph, seconds, host, lce_version, **fields) -> ExportReport:
    import tensorflow as tf

    (lite_in,), (lite_out,) = graph.inputs, graph.outputs
    return ExportReport(
        tflite_path=str(job.out_path), source=job.source, keras_precision=job.keras_precision,
        model_name=job.model.name, input_shape=list(lite_in.shape), input_type=lite_in.type,
        output_shape=list(lite_out.shape), output_type=lite_out.type,
        converter={"io_type": job.io_type, "lce_version": lce_version,
                   "tensorflow_version": tf.__version__},
        conversion_seconds=round(seconds, 3),
        op_histogram=dict(sorted(graph.histogram.items(), key=lambda kv: (-kv[1], kv[0]))),
        host_latency_ms=host, warnings=job.warnings, **fields)


def _predictor_files(out_path, graph, predictor: Predictor, target) -> dict:
    """{path: bytes} of `<out>.json` (labels, preprocessing) and predict.py, before any is written."""
    import json

    classes = int(graph.outputs[0].shape[-1])
    if len(predictor.labels) != classes:
        raise ExportError(f"{len(predictor.labels)} class names for a model with {classes} outputs; "
                          "pass the dataset the model was trained on, or as many labels as outputs.")
    output = "probabilities" if graph.ops and graph.ops[-1].name == "SOFTMAX" else "logits"
    meta = model_metadata(predictor.dataset, int(graph.inputs[0].shape[1]), list(predictor.labels),
                          output=output, target=target)
    return {sidecar_path(out_path): (json.dumps(meta, indent=2) + "\n").encode(),
            out_path.parent / "predict.py": (Path(__file__).parent / "predict.py").read_bytes()}


def _write(job: ExportJob, flatbuffer, report, graph, target) -> ExportReport:
    """The .tflite, then the predictor's files, then the report; each atomically. The
    predictor's files are made first, so a failure there writes nothing."""
    extra_files = _predictor_files(job.out_path, graph, job.predictor, target) if job.predictor else {}
    atomic_write_bytes(job.out_path, flatbuffer)
    for file, data in extra_files.items():
        atomic_write_bytes(file, data)
    if extra_files:
        report.metadata_path, report.predictor_path = (str(p) for p in extra_files)
    if job.report_path is not None:
        atomic_write_text(job.report_path, report.to_json())
    return report


def _int8_parity_warning(check, parity, subject: str, file_word: str) -> str:
    """The report's warning for an int8 file judged by top-1 agreement (`int8_top1`)."""
    return (f"int8: {subject} agree with the fake-quant Keras model in top-1 on "
            f"{100 * check.top1_agreement:.1f}% of the inputs (>= {100 * parity.int8_min_top1:g}% "
            f"asked); elementwise they differ (max |difference| {check.max_abs_diff:.4g}, max "
            f"|output| {check.max_abs_keras_output:.3g}), since int8 rounding flips some binary "
            f"activations. Compare accuracy with `python -m bireal_tf.evaluate` on the {file_word}.")


# --- target "portable" -----------------------------------------------------------------------

def export_portable(job: ExportJob, lce: LceComparison = LceComparison()) -> ExportReport:
    """export_tflite(target="portable"): builtin ops only, checked through stock LiteRT."""
    model = job.model
    if job.io_type != "float32" and not job.quantized:
        raise ExportError(
            f"int8 I/O needs a model trained with fake quantization: model '{model.name}' has no "
            "FakeQuant layer. Make one with `python -m bireal_tf.recipes.int8 MODEL -o OUT.keras` "
            "and export OUT.keras with --portable --int8, or drop --int8.")
    if not job.layers:
        raise ExportError(f"Model '{model.name}' has no Larq binary conv, so there is nothing to "
                          "lower; a plain float model needs no bireal_tf export.")
    flatbuffer, float_twin, lowered, seconds = convert_portable(model, job.io_type)
    graph = TFLiteGraph(flatbuffer)
    if graph.custom_ops:
        raise ExportError(f"The portable file of model '{model.name}' still holds custom ops "
                          f"{graph.custom_ops}; stock LiteRT cannot run it. This is a bug in the "
                          "lowering.")
    binary_check = BinaryConvCheck(len(job.layers), 0, len(lowered) == len(job.layers), [], {},
                                   int8_convs=len(lowered))
    x, kind = _parity_inputs(model, job.sample_inputs, job.parity)
    runner = LiteRTRunner(flatbuffer)
    check = _check_portable_parity(job, flatbuffer, x, kind, runner)
    agreement, lce_file = _compare_with_lce(job, x, runner) if lce.enabled else (None, None)
    report = _new_report(job, graph, seconds, _host_latency(flatbuffer, x, job.latency, "litert"),
                         _lce_version(), binary_convs=binary_check, parity=check,
                         size=_portable_size(job, flatbuffer, float_twin), target="portable",
                         runtime="litert", lce_agreement=agreement)
    report = _write(job, flatbuffer, report, graph, "portable")
    if lce.path is not None and lce_file is not None:
        atomic_write_bytes(lce.path, lce_file)
    return report


def _check_portable_parity(job: ExportJob, flatbuffer, x, kind: str, runner):
    """Keras vs the portable file through LiteRT; the verdict becomes a warning or a refusal."""
    check, _ = compare_outputs(job.model, flatbuffer, x, job.parity, False, int8=job.quantized,
                               runner=runner)
    check.inputs = kind
    summary = (f"{check.samples_within_tolerance} of {check.num_samples} inputs agree within "
               f"{check.tolerance:.3g} (max |difference| {check.max_abs_diff:.4g}, max |output| "
               f"{check.max_abs_keras_output:.3g}); {check.clear_samples_within_tolerance} of the "
               f"{check.clear_samples} clear of the sign threshold agree; top-1 agreement "
               f"{100 * check.top1_agreement:.1f}%")
    if check.verdict == "int8_top1" and check.max_abs_diff > 0:
        _warn(job.warnings, _int8_parity_warning(check, job.parity, "the portable file's outputs",
                                                 "file"))
    elif check.verdict == "mismatch":
        _refuse_unless(job.allowed.mismatch, "allow_mismatch",
                       f"The portable .tflite disagrees with the Keras model: {summary}.", job.warnings)
    elif check.verdict in ("sign_flips", "inconclusive"):
        _warn(job.warnings, f"Parity {check.verdict}: {summary}. Inputs that differ have an "
                            "activation within rounding of the sign threshold (sign flips); "
                            "compare accuracy with `python -m bireal_tf.evaluate` on the file.")
    return check


def _compare_with_lce(job: ExportJob, x, runner):
    """(LceAgreement, the LCE file) of the portable file against the LCE file of the same
    model on inputs x; (None, None) with a warning when LCE cannot convert it."""
    try:
        lce_file, _ = convert(job.model, job.io_type)
        # LCE's reference kernel where its optimized one mis-pads (small zero-padded maps).
        lce_out = TFLiteRunner(lce_file, use_reference_bconv=bool(job.hazards)).predict(x)
    except ExportError as err:
        _warn(job.warnings, f"No comparison with the LCE file: {err}")
        return None, None
    mine = runner.predict(x)
    top1 = np.argmax(lce_out.reshape(len(x), -1), 1) == np.argmax(mine.reshape(len(x), -1), 1)
    return LceAgreement(len(x), float(top1.mean()), float(np.abs(lce_out - mine).max()),
                        len(lce_file)), lce_file


def _portable_size(job: ExportJob, flatbuffer, float_twin):
    """SizeCheck of a portable file: its binary weights take 8 bits (int8 +-1), and a float
    model's file is set beside its float32 twin."""
    if job.quantized:  # every weight int8, binary ones included
        size = int8_size_floor(job.model)
        size.floor_bytes = (size.binary_params + size.float_params + size.batchnorm_params
                            + 4 * size.scale_params)
    else:
        size = size_floor(job.model)
        size.floor_bytes = size.binary_params + 4 * (size.float_params + size.batchnorm_params)
    size.binary_weight_bits = 8
    size.file_bytes, size.ratio = len(flatbuffer), round(len(flatbuffer) / max(1, size.floor_bytes), 4)
    if float_twin is not None:
        size.float_twin_bytes = len(float_twin)
        size.float_twin_ratio = round(len(flatbuffer) / len(float_twin), 4)
    return size


def _lce_version() -> str:
    import larq_compute_engine as lce

    return lce.__version__
