"""`export_tflite`: convert a Bi-Real Net with LCE, verify the flatbuffer, measure it.

Conversion goes through `larq_compute_engine.convert_keras_model`. The
flatbuffer is then checked, in this order, before anything is written:

1. every Keras binary conv (`binary_conv_layers`) became an `LceBconv2d`. The
   convs are matched to the flatbuffer by their weights: the sign bits of each
   `LceBconv2d` filter and of each float `CONV_2D` filter are compared with the
   sign of each binary conv's quantized kernel, so a conv that stayed float is
   named, with the op it became;
2. the .tflite, run by LCE's interpreter, gives the Keras model's outputs, input by
   input; a difference counts as a fault only on inputs whose pre-sign activations
   are all clear of zero, since elsewhere float rounding may flip a sign (see
   `_parity`);
3. its size beside the floor of `footprint.py`; and, unless `benchmark=False`,
   its host latency per thread count.

A check that fails raises `ExportError` (nothing is written), unless allowed
(`allow_float_convs`, `allow_mismatch`), in which case the report's `warnings`
say what is wrong and `warnings.warn` repeats it.
"""

import math
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from bireal_tf.export.files import (
    ExportError,
    ModelFileError,
    atomic_write_bytes,
    atomic_write_text,
    check_output_path,
    load_keras_model,
)
from bireal_tf.export.flatbuffer import TFLiteGraph, unpack_bconv_filter
from bireal_tf.export.footprint import footprint
from bireal_tf.export.report import (
    BinaryConvCheck,
    ConverterOptions,
    ExportReport,
    HostLatency,
    ParityCheck,
    SizeCheck,
)
from bireal_tf.export.runtime import (
    HOST_LATENCY_NOTE,
    TFLiteRunner,
    host_description,
    measure_latency,
)

__all__ = [
    "ExportWarning",
    "convert",
    "export_tflite",
    "float32_twin",
    "lce_zero_padding_hazards",
    "mixed_precision_policies",
    "sign_margins",
]

# LCE's optimized LceBconv2d applies "same zero" padding as a correction that
# assumes the (dilated) filter is no larger than the input; when it is larger,
# outputs are wrong. Its reference kernel is right. Measured with LCE 0.16.0;
# source: larq/compute-engine, larq_compute_engine/core/bconv2d/zero_padding_correction.h.
_ZERO_PADDING_BUG = (
    "LCE's optimized LceBconv2d kernel computes zero padding (pad_values=0.0) wrongly when "
    "a binary conv's input is smaller than its kernel (its zero-padding correction assumes "
    "filter <= image; LCE's reference kernel is right)"
)
_ZERO_PADDING_FIX = (
    "Fix: build the network with pad_values=1.0 (LCE's native padding; retrain or finetune "
    "briefly), or export at a larger input size so every binary conv's input is at least its "
    "kernel size (Bi-Real Net 18/34/50: input >= 65x65)."
)


class ExportWarning(UserWarning):
    """An allowed export problem (float convs, output mismatch): the report lists it too."""


def _dtype(value, name):
    import tensorflow as tf

    if isinstance(value, str):
        table = {"float32": tf.float32, "int8": tf.int8}
        if value not in table:
            raise ValueError(f"{name} must be 'float32' or 'int8', got {value!r}.")
        return table[value]
    value = tf.as_dtype(value)
    if value not in (tf.float32, tf.int8):
        raise ValueError(f"{name} must be tf.float32 or tf.int8, got {value.name}.")
    return value


def _warn(report_warnings, message):
    report_warnings.append(message)
    warnings.warn(message, ExportWarning, stacklevel=3)


def convert(model, *, inference_input_type, inference_output_type, target,
            experimental_default_int8_range) -> tuple[bytes, float]:
    """LCE conversion with the options passed through; (flatbuffer, seconds)."""
    import larq_compute_engine as lce

    start = time.perf_counter()
    try:
        flatbuffer = lce.convert_keras_model(
            model,
            inference_input_type=inference_input_type,
            inference_output_type=inference_output_type,
            target=target,
            experimental_default_int8_range=experimental_default_int8_range,
        )
    except Exception as err:
        line = (str(err).strip().splitlines() or [""])[0][:400]
        raise ExportError(
            f"LCE could not convert model '{model.name}' ({type(err).__name__}: {line})."
        ) from err
    return bytes(flatbuffer), time.perf_counter() - start


def _kernel_negative_bits(layer) -> np.ndarray:
    """Sign of the quantized kernel, as LCE stores it: bool [O, H, W, I], True = negative."""
    kernel = layer.kernel
    try:
        quantized = np.asarray(layer.kernel_quantizer(kernel))
    except Exception:  # an unusual quantizer: the raw kernel's sign is the next best thing
        quantized = np.asarray(kernel)
    if quantized.shape != tuple(kernel.shape):
        quantized = np.asarray(kernel)
    return np.transpose(quantized < 0, (3, 0, 1, 2))


def _sign_agreement(a: np.ndarray, b: np.ndarray) -> float:
    """Mean over output channels of the sign agreement, up to a flip per channel
    (BatchNorm folded into a float conv flips channels whose scale is negative)."""
    same = (a == b).reshape(a.shape[0], -1).mean(axis=1)
    return float(np.maximum(same, 1.0 - same).mean())


def _locate_binary_convs(graph: TFLiteGraph, layers) -> tuple[dict, dict]:
    """Match binary conv layers to flatbuffer ops by their weight signs.

    Returns ({layer index: op index} for LceBconv2d, {layer index: op name} for
    layers found as a float op).
    """
    bits = {i: _kernel_negative_bits(layer) for i, layer in enumerate(layers)}
    binary, floating = {}, {}

    def best(candidates, signs):
        scored = [(_sign_agreement(bits[i], signs), i) for i in candidates]
        scored = [s for s in scored if s[0] >= 0.99]
        return max(scored)[1] if scored else None

    for op in graph.ops:
        if op.name not in ("LceBconv2d", "CONV_2D", "DEPTHWISE_CONV_2D") or len(op.inputs) < 2:
            continue
        data = graph.tensor_data(op.inputs[1])
        if data is None or data.ndim != 4:
            continue
        if op.name == "LceBconv2d":
            o, h, w, packed = data.shape
            candidates = [i for i, b in bits.items() if i not in binary
                          and b.shape[:3] == (o, h, w) and math.ceil(b.shape[3] / 32) == packed]
            if not candidates:
                continue
            in_channels = bits[candidates[0]].shape[3]
            choice = best([i for i in candidates if bits[i].shape[3] == in_channels],
                          unpack_bconv_filter(data, in_channels))
            if choice is None:  # candidates may differ in input channels
                for c in candidates:
                    choice = best([c], unpack_bconv_filter(data, bits[c].shape[3]))
                    if choice is not None:
                        break
            if choice is not None:
                binary[choice] = op.index
        else:
            signs = np.asarray(data) < 0
            candidates = [i for i, b in bits.items() if i not in binary and i not in floating
                          and b.shape == signs.shape]
            choice = best(candidates, signs) if candidates else None
            if choice is not None:
                floating[choice] = op.name
    return binary, floating


def _spatial(shape):
    return tuple(shape[1:3]) if shape is not None and len(shape) == 4 else (None, None)


def lce_zero_padding_hazards(model):
    """Binary convs that hit LCE's zero-padding bug: [(layer name, input HxW, kernel HxW)].

    Zero-padded ("same", pad_values=0.0) binary convs whose input height or width is
    smaller than the dilated kernel.
    """
    from bireal_tf.models import binary_conv_layers

    found = []
    for layer in binary_conv_layers(model):
        if getattr(layer, "padding", "valid") != "same" or float(getattr(layer, "pad_values", 0.0)) != 0.0:
            continue
        kh, kw = layer.kernel_size
        dh, dw = getattr(layer, "dilation_rate", (1, 1))
        eff = ((kh - 1) * dh + 1, (kw - 1) * dw + 1)
        if eff == (1, 1):
            continue
        try:
            shape = tuple(layer.input.shape)
        except Exception:  # a layer used more than once
            continue
        h, w = _spatial(shape)
        if (h is not None and h < eff[0]) or (w is not None and w < eff[1]):
            found.append((layer.name, (h, w), eff))
    return found


def _other_binary_layers(model):
    """Larq layers with both quantizers that LCE has no binary kernel for (dense, depthwise)."""
    import larq as lq
    import tensorflow as tf

    kinds = tuple(k for k in (getattr(lq.layers, "QuantDense", None),
                              getattr(lq.layers, "QuantDepthwiseConv2D", None),
                              getattr(lq.layers, "QuantConv1D", None),
                              getattr(lq.layers, "QuantConv3D", None),
                              getattr(lq.layers, "QuantSeparableConv2D", None)) if k)
    found = []
    for layer in model.layers:
        if isinstance(layer, tf.keras.Model):
            found.extend(_other_binary_layers(layer))
        elif isinstance(layer, kinds) and getattr(layer, "input_quantizer", None) is not None and (
                getattr(layer, "kernel_quantizer", None) is not None
                or getattr(layer, "depthwise_quantizer", None) is not None):
            found.append(layer)
    return found


def _replace_mixed_policies(config):
    """Walk a Keras config in place: every mixed dtype policy becomes "float32"."""
    if isinstance(config, dict):
        for key, value in config.items():
            if (key == "dtype" and isinstance(value, dict) and "Policy" in str(value.get("class_name"))
                    and value.get("config", {}).get("name", "").startswith("mixed_")):
                config[key] = "float32"
            else:
                _replace_mixed_policies(value)
    elif isinstance(config, list):
        for item in config:
            _replace_mixed_policies(item)


def mixed_precision_policies(model) -> set:
    """The mixed dtype policies (e.g. {"mixed_bfloat16"}) of `model`'s layers; empty if none."""
    import tensorflow as tf

    layers = [model] + [m for m in model.submodules if isinstance(m, tf.keras.layers.Layer)]
    return {layer.dtype_policy.name for layer in layers
            if layer.dtype_policy.name.startswith("mixed_")}


def float32_twin(model):
    """The same network and weights with every layer computing in float32.

    A model trained under a mixed precision policy (`--mixed-precision bfloat16`)
    computes in bfloat16/float16 but keeps float32 variables; the TFLite
    converter takes float32 graphs only. The twin is rebuilt from the model's
    config with each mixed policy replaced by float32, and takes the weights
    unchanged. A model without a mixed policy is returned as it is.
    """
    if not mixed_precision_policies(model):
        return model
    try:
        config = model.get_config()
    except NotImplementedError as err:
        raise ExportError(
            f"Model '{model.name}' computes in {sorted(mixed_precision_policies(model))} and, "
            "being a subclassed model without get_config(), cannot be rebuilt in float32 for "
            "TFLite. Build it again under tf.keras.mixed_precision.set_global_policy('float32') "
            "and copy the weights (model.get_weights()), or export a functional model."
        ) from err
    _replace_mixed_policies(config)
    twin = model.__class__.from_config(config)
    twin.set_weights(model.get_weights())
    return twin


def _fixed_input_model(model, input_shape):
    """The model with a fully defined input shape (wrapping it when `input_shape` is given)."""
    import tensorflow as tf

    if len(model.inputs) != 1 or len(model.outputs) != 1:
        raise ExportError(
            f"Model '{model.name}' has {len(model.inputs)} inputs and {len(model.outputs)} outputs; "
            "export_tflite supports single-input, single-output models."
        )
    shape = tuple(model.inputs[0].shape[1:])
    if input_shape is not None:
        input_shape = tuple(int(d) for d in input_shape)
        if len(input_shape) != len(shape) or any(
                s is not None and s != t for s, t in zip(shape, input_shape)):
            raise ExportError(
                f"input_shape {input_shape} does not fit model '{model.name}', whose input is {shape}."
            )
        if None in shape:
            inputs = tf.keras.Input(input_shape)
            return tf.keras.Model(inputs, model(inputs, training=False), name=model.name)
        return model
    if None in shape:
        raise ExportError(
            f"Model '{model.name}' has the input shape {shape} with free dimensions; a .tflite "
            "needs fixed ones. Pass input_shape=(H, W, 3) (CLI: --input-size H W) or build the "
            "model with a fixed input_shape."
        )
    return model


def _as_inputs(sample_inputs, shape, n, seed):
    """(array [n', *shape], label) from sample_inputs or random normal inputs."""
    if sample_inputs is None:
        rng = np.random.default_rng(seed)
        return rng.standard_normal((n,) + tuple(shape)).astype(np.float32), "random_normal"
    data = sample_inputs
    if hasattr(data, "dataset") and not hasattr(data, "shape"):  # a DatasetSpec
        data = data.dataset
    try:
        import tensorflow as tf

        if isinstance(data, tf.data.Dataset):
            pieces, count = [], 0
            for element in data:
                images = element[0] if isinstance(element, (tuple, list)) else element
                images = np.asarray(images)
                if images.ndim == len(shape):
                    images = images[None]
                pieces.append(images)
                count += images.shape[0]
                if count >= n:
                    break
            data = np.concatenate(pieces) if pieces else np.zeros((0,) + tuple(shape))
    except ImportError:  # pragma: no cover
        pass
    array = np.asarray(data, dtype=np.float32)
    if array.ndim == len(shape):
        array = array[None]
    if tuple(array.shape[1:]) != tuple(shape) or array.shape[0] == 0:
        raise ExportError(
            f"sample_inputs of shape {tuple(array.shape)} do not fit the model's input "
            f"(N, {', '.join(str(d) for d in shape)})."
        )
    return array[:n], "sample_inputs"


def _keras_outputs(model, x, batch=32):
    outs = [np.asarray(model(x[i: i + batch], training=False)) for i in range(0, len(x), batch)]
    return np.concatenate(outs).astype(np.float32)


def _per_sample_max(a, b):
    return np.abs(a - b).reshape(len(a), -1).max(axis=1) if len(a) else np.zeros(0)


def _top1(a, b):
    if not len(a):
        return 1.0
    a, b = a.reshape(len(a), -1), b.reshape(len(b), -1)
    return float(np.mean(np.argmax(a, axis=1) == np.argmax(b, axis=1)))


def sign_margins(model, x, batch=4) -> np.ndarray | None:
    """Per input: how far its closest pre-sign activation is from the sign threshold.

    For each binary conv, the input it binarizes, v: min |v| / max |v| over the sample;
    the margin is the minimum over the binary convs. None if the layers' inputs cannot
    be probed (a layer used twice). Where it is below float rounding (~1e-7), Keras and
    LCE may binarize that activation differently.
    """
    import tensorflow as tf

    from bireal_tf.models import binary_conv_layers

    layers = binary_conv_layers(model)
    if not layers:
        return np.full(len(x), np.inf)
    try:
        probe = tf.keras.Model(model.inputs, [layer.input for layer in layers])
    except Exception:
        return None
    margins = []
    for i in range(0, len(x), batch):
        outs = probe(x[i: i + batch], training=False)
        outs = outs if isinstance(outs, (list, tuple)) else [outs]
        per_layer = []
        for out in outs:
            a = np.abs(np.asarray(out)).reshape(out.shape[0], -1)
            per_layer.append(a.min(axis=1) / np.maximum(a.max(axis=1), 1e-30))
        margins.append(np.min(np.stack(per_layer, axis=1), axis=1))
    return np.concatenate(margins)


def _parity(model, original, flatbuffer, x, atol, rtol, margin_threshold, enforced, hazard):
    """Compare Keras and .tflite outputs on x; the ParityCheck and the Keras outputs.

    A binary net amplifies rounding: an activation within float rounding of zero
    can binarize to +1 in Keras and -1 in LCE (which folds BatchNorm into the conv),
    and the flip spreads to the outputs. So each input is judged on its own, and an
    input that differs is only evidence of a fault when it is *clear* of the sign
    threshold: every pre-sign activation at least `margin_threshold` x the layer's max
    away from zero (see `sign_margins`), where rounding cannot flip a sign.
    """
    keras = _keras_outputs(model, x)
    lite = TFLiteRunner(flatbuffer).predict(x)
    if keras.shape != lite.shape:
        raise ExportError(
            f"The .tflite output has the shape {lite.shape[1:]} but the Keras model's is "
            f"{keras.shape[1:]} (batch of {len(x)})."
        )
    scale = float(np.max(np.abs(keras))) if keras.size else 0.0
    tolerance = float(atol + rtol * scale)
    within = _per_sample_max(keras, lite) <= tolerance
    margins = sign_margins(original, x)
    clear = np.zeros(len(x), bool) if margins is None else margins >= margin_threshold
    if not enforced:
        verdict = "not_enforced"
    elif within.all():
        verdict = "exact"
    elif hazard or (clear & ~within).any():
        verdict = "mismatch"
    elif clear.any() or 2 * within.sum() >= len(x):
        verdict = "sign_flips"  # clear inputs agree, or most do: a fault would move them all
    else:
        verdict = "inconclusive"
    check = ParityCheck(
        inputs="",
        num_samples=len(x),
        max_abs_diff=float(np.max(np.abs(keras - lite))) if keras.size else 0.0,
        max_abs_keras_output=scale,
        tolerance=tolerance,
        samples_within_tolerance=int(within.sum()),
        sign_margin_threshold=float(margin_threshold),
        clear_samples=int(clear.sum()),
        clear_samples_within_tolerance=int((clear & within).sum()),
        min_sign_margin=None if margins is None or not len(x) else float(margins.min()),
        top1_agreement=_top1(keras, lite),
        verdict=verdict,
        ok=verdict in ("exact", "sign_flips", "inconclusive"),
        enforced=bool(enforced),
    )
    return check, keras


def export_tflite(
    model,
    path,
    *,
    inference_input_type="float32",
    inference_output_type="float32",
    target: str = "arm",
    experimental_default_int8_range: tuple[float, float] | None = None,
    sample_inputs=None,
    allow_float_convs: bool = False,
    allow_mismatch: bool = False,
    benchmark: bool = True,
    threads: Sequence[int] = (1, 2),
    latency_runs: int = 10,
    latency_warmup: int = 2,
    parity_samples: int = 16,
    parity_atol: float = 1e-4,
    parity_rtol: float = 1e-4,
    sign_margin: float = 2e-6,
    parity_pool: int = 1,
    input_shape: Sequence[int] | None = None,
    report_path=None,
    seed: int = 0,
) -> ExportReport:
    """Convert `model` to an LCE .tflite at `path`, verify it and report on it.

    Args:
        model: a Keras model, or the path of one saved by the training CLI
            (`.keras`, `.h5`, SavedModel directory).
        path: the .tflite to write. Its directory must exist. Written atomically
            (temp file + os.replace), and only when every check passes or is allowed.
        inference_input_type, inference_output_type, target,
        experimental_default_int8_range: passed to
            `larq_compute_engine.convert_keras_model` (dtypes as tf.DType or
            "float32"/"int8"; target "arm" or "xcore"). int8 I/O needs a quantized
            model or `experimental_default_int8_range` (dummy ranges, latency tests only).
        sample_inputs: inputs for the Keras-vs-.tflite check: an array [N, H, W, C],
            a tf.data.Dataset of images or (images, labels), or a DatasetSpec. Default:
            `parity_samples` random normal inputs (seeded by `seed`); with
            `parity_pool` > 1, the `parity_samples` of `parity_pool` x as many
            candidates whose pre-sign activations are furthest from zero (see
            `sign_margins`): more inputs for the strict check, at the cost of a Keras
            pass over the candidates.
        allow_float_convs: export even if binary convs stayed float, or the model has
            no binary conv; the report's `warnings` record it.
        allow_mismatch: export even if the outputs disagree (verdict "mismatch");
            recorded in `warnings`. Each input agrees when its max |difference| is
            within `parity_atol + parity_rtol * max|keras output|`. An input that
            differs is a fault only if it is clear of the sign threshold (every
            pre-sign activation >= `sign_margin` x its layer's max away from zero);
            otherwise rounding may have flipped a sign (verdict "sign_flips" when the
            clear inputs agree or most inputs agree, "inconclusive" otherwise; both warn).
            With a known LCE hazard (zero padding, see `lce_zero_padding_hazards`)
            any difference is a mismatch.
        benchmark: measure host latency (batch 1) for each count in `threads`,
            median of `latency_runs` after `latency_warmup` runs.
        input_shape: (H, W, C) for a model whose input has free dimensions.
        report_path: also write the report JSON there (atomically).

    Returns:
        ExportReport (`to_dict()`, `to_json()`, `format_table()`).

    Raises:
        ModelFileError: missing/corrupt model file, missing output directory.
        ExportError: conversion failed, binary convs stayed float (naming them),
            no binary layer, outputs disagree, or int8 I/O could not be produced.
    """
    import larq_compute_engine as lce
    import tensorflow as tf

    from bireal_tf.models import binary_conv_layers

    in_type = _dtype(inference_input_type, "inference_input_type")
    out_type = _dtype(inference_output_type, "inference_output_type")
    if target not in ("arm", "xcore"):
        raise ValueError(f"target must be 'arm' or 'xcore', got {target!r}.")
    out_path = check_output_path(path, "output .tflite")
    if report_path is not None:
        check_output_path(report_path, "report file")
    if benchmark and (not threads or any(int(t) < 1 for t in threads)):
        raise ValueError(f"threads must be positive integers, got {threads!r}.")

    if isinstance(model, (str, Path)):
        source = str(model)
        model = load_keras_model(model)
    elif isinstance(model, tf.keras.Model):
        source = f"<in-memory Keras model '{model.name}'>"
    else:
        raise ModelFileError(
            f"model must be a Keras model or the path of a saved one, got {type(model).__name__}."
        )
    # TFLite converts float32 graphs: a mixed precision model is exported as its float32
    # twin, and the parity check compares the .tflite with that twin.
    keras_precision = ",".join(sorted(mixed_precision_policies(model))) or "float32"
    model = float32_twin(model)
    original = model
    model = _fixed_input_model(model, input_shape)
    report_warnings = []

    # Static checks, before the slow conversion.
    layers = binary_conv_layers(original)
    if not layers:
        message = (
            f"Model '{original.name}' has no Larq binary conv (a QuantConv2D with both an "
            "input_quantizer and a kernel_quantizer), so LCE would produce a float model with "
            "no LceBconv2d. Build the binary network (activation='binary')"
        )
        if not allow_float_convs:
            raise ExportError(message + ", or pass allow_float_convs=True (CLI: "
                              "--allow-float-convs) to export a float model anyway.")
        _warn(report_warnings, message + "; exported anyway because float convs were allowed.")
    for layer in _other_binary_layers(original):
        _warn(report_warnings, f"Layer '{layer.name}' ({type(layer).__name__}) has binary "
                               "quantizers but LCE has no binary kernel for it: it runs in float.")
    hazards = lce_zero_padding_hazards(original)
    hazard_text = ""
    if hazards:
        listed = ", ".join(f"{name} (input {h}x{w}, kernel {kh}x{kw})"
                           for name, (h, w), (kh, kw) in hazards)
        hazard_text = f"{_ZERO_PADDING_BUG}; affected: {listed}. {_ZERO_PADDING_FIX}"

    flatbuffer, seconds = convert(
        model,
        inference_input_type=in_type,
        inference_output_type=out_type,
        target=target,
        experimental_default_int8_range=experimental_default_int8_range,
    )
    graph = TFLiteGraph(flatbuffer)
    histogram = dict(sorted(graph.histogram().items(), key=lambda kv: (-kv[1], kv[0])))
    if len(graph.inputs) != 1 or len(graph.outputs) != 1:
        raise ExportError("The .tflite does not have exactly one input and one output.")
    lite_in, lite_out = graph.inputs[0], graph.outputs[0]
    for asked, got, what in ((in_type, lite_in.type, "input"), (out_type, lite_out.type, "output")):
        if asked.name != got:
            raise ExportError(
                f"inference_{what}_type={asked.name} was asked for, but LCE produced a {got} "
                f"{what}: int8 I/O needs a quantized model (trained with fake quantization) or "
                "experimental_default_int8_range=(min, max) (dummy ranges, for latency tests only)."
            )

    # 1. Binary convs.
    n_bconv = histogram.get("LceBconv2d", 0)
    binary_map, float_map = _locate_binary_convs(graph, layers)
    float_layers = [layer.name for i, layer in enumerate(layers) if i not in binary_map]
    float_ops = {layers[i].name: op for i, op in float_map.items() if i not in binary_map}
    ok = n_bconv >= len(layers)
    if ok:
        float_layers, float_ops = [], {}  # the count is the check; matching only names culprits
    elif not float_layers:
        float_layers = ["<could not identify which>"]
    if not ok:
        described = ", ".join(
            f"{name} (became {float_ops[name]})" if name in float_ops else name
            for name in float_layers)
        message = (
            f"LCE made {n_bconv} of the {len(layers)} binary convs of model '{original.name}' "
            f"binary; these stayed float: {described}. LCE binarizes a QuantConv2D only when its "
            "input quantizer is sign-like (Larq's sign(sign(x) + 0.1), e.g. bireal_tf's "
            "ApproxSign) applied directly to the conv input, and its kernel quantizer gives "
            "+-1 times a per-channel scale"
        )
        if not allow_float_convs:
            raise ExportError(message + ". Fix those layers, or pass allow_float_convs=True "
                                        "(CLI: --allow-float-convs) to export anyway.")
        _warn(report_warnings, message + "; exported anyway because float convs were allowed.")
    binary_check = BinaryConvCheck(len(layers), n_bconv, ok, float_layers, float_ops)

    # 2. Keras vs .tflite.
    enforced = (in_type == tf.float32 and out_type == tf.float32
                and experimental_default_int8_range is None)
    shape = tuple(model.inputs[0].shape[1:])
    n = max(1, int(parity_samples))
    pool = max(1, int(parity_pool)) if sample_inputs is None else 1
    x, inputs_kind = _as_inputs(sample_inputs, shape, n * pool, seed)
    if pool > 1:
        margins = sign_margins(original, x)
        if margins is not None:
            x = x[np.argsort(-margins, kind="stable")[:n]]
            inputs_kind = "random_normal_clearest"
        else:
            x = x[:n]
    parity, keras_out = _parity(model, original, flatbuffer, x, parity_atol, parity_rtol,
                                sign_margin, enforced, bool(hazard_text))
    parity.inputs = inputs_kind
    kind_words = {"random_normal": "random normal inputs", "sample_inputs": "sample inputs"}.get(
        inputs_kind, "random normal inputs (clearest of a pool)")
    summary = (
        f"{parity.samples_within_tolerance} of {parity.num_samples} {kind_words} agree within "
        f"{parity.tolerance:.3g} (max |difference| {parity.max_abs_diff:.4g}, max |output| "
        f"{parity.max_abs_keras_output:.3g}); {parity.clear_samples} of them are clear of the sign "
        f"threshold (every pre-sign activation >= {parity.sign_margin_threshold:g} x its layer's "
        f"max from zero), {parity.clear_samples_within_tolerance} of those agree; top-1 agreement "
        f"{100 * parity.top1_agreement:.1f}%"
    )
    if parity.verdict == "not_enforced":
        _warn(report_warnings, "Quantized conversion (int8 I/O or experimental_default_int8_range): "
                               f"parity is not enforced; {summary}.")
    elif parity.verdict == "sign_flips":
        _warn(report_warnings, f"Some outputs differ from Keras: {summary}. Every input that differs "
                               "has an activation within rounding of the sign threshold, which LCE "
                               "(BatchNorm folded) and Keras may binarize differently (sign flips); "
                               "the inputs clear of it, or most inputs, agree, while a conversion "
                               "fault would move them all.")
    elif parity.verdict == "inconclusive":
        _warn(report_warnings, f"Parity is inconclusive: {summary}. Most inputs differ and none is "
                               "clear of the sign threshold (large inputs, deep nets), so rounding-"
                               "level sign flips cannot be told from a fault; compare accuracy on "
                               "data with `python -m bireal_tf.evaluate` (Keras model and .tflite).")
    elif parity.verdict == "mismatch":
        reference = TFLiteRunner(flatbuffer, use_reference_bconv=True).predict(x)
        ref_within = int(np.sum(_per_sample_max(keras_out, reference) <= parity.tolerance))
        message = (
            f"The .tflite disagrees with the Keras model: {summary}. With LCE's reference bconv "
            f"kernel {ref_within} of {parity.num_samples} inputs agree"
        )
        if hazard_text:
            message += f". Likely cause: {hazard_text}"
        elif ref_within == parity.num_samples:
            message += ": LCE's optimized LceBconv2d kernel is at fault."
        else:
            message += "."
        if not allow_mismatch:
            raise ExportError(message + " Pass allow_mismatch=True (CLI: --allow-mismatch) "
                                        "to export anyway.")
        _warn(report_warnings, message + " Exported anyway because the mismatch was allowed.")
    if hazard_text and parity.verdict != "mismatch":
        _warn(report_warnings, hazard_text)

    # 3. Size and latency.
    foot = footprint(original)
    size = SizeCheck(len(flatbuffer), foot.floor_bytes,
                     round(len(flatbuffer) / max(1, foot.floor_bytes), 4),
                     foot.binary_params, foot.float_params, foot.batchnorm_params)
    latency = None
    if benchmark:
        host = host_description()
        results = measure_latency(flatbuffer, x[:1], threads=[int(t) for t in threads],
                                  runs=latency_runs, warmup=latency_warmup)
        latency = HostLatency(host["machine"], host["processor"], host["cpu_count"],
                              HOST_LATENCY_NOTE, int(latency_warmup), int(latency_runs), results)

    report = ExportReport(
        tflite_path=str(out_path),
        source=source,
        keras_precision=keras_precision,
        model_name=original.name,
        input_shape=[int(d) for d in lite_in.shape],
        input_type=lite_in.type,
        output_shape=[int(d) for d in lite_out.shape],
        output_type=lite_out.type,
        converter=ConverterOptions(
            in_type.name, out_type.name, target,
            None if experimental_default_int8_range is None
            else [float(v) for v in experimental_default_int8_range],
            lce.__version__, tf.__version__),
        conversion_seconds=round(seconds, 3),
        op_histogram={k: int(v) for k, v in histogram.items()},
        binary_convs=binary_check,
        parity=parity,
        size=size,
        host_latency_ms=latency,
        warnings=report_warnings,
    )
    atomic_write_bytes(out_path, flatbuffer)
    if report_path is not None:
        atomic_write_text(report_path, report.to_json())
    return report
