"""bireal_tf.export: real LCE conversions, checked against the Keras models.

Counts come from outside the export where they can: op histograms from
TensorFlow's own flatbuffer schema (tests/lce_utils.py), parameter counts from
the Keras layers, outputs from LCE's interpreter run here.

Timings on the shared 2-core host: R18 at 96x96 converts in ~20 s, R34 ~55 s,
R50 ~105 s (most of it LCE's SavedModel save); the tiny models in 1-5 s. R34/R50
are marked slow.
"""
import json
import os
import platform
import re
import subprocess
import sys
import warnings
from pathlib import Path

import larq as lq
import numpy as np
import pytest
import tensorflow as tf

from bireal_tf import quantizers
from bireal_tf.export.checks import batchnorm_cancellation
from bireal_tf.export import (
    ExportError,
    ExportWarning,
    LatencySettings,
    ModelFileError,
    ParitySettings,
    TFLiteRunner,
    export_tflite,
    float32_twin,
    lce_zero_padding_hazards,
    sign_margins,
    size_floor,
)
from bireal_tf.export import convert as convert_module
from bireal_tf.models import binary_conv_layers, bireal_net, mixed_precision_policies
from tests.lce_utils import op_histogram

REPO = Path(__file__).resolve().parents[1]
SCHEMA_DOC = REPO / "docs" / "export_report_schema.md"
BINARY_CONVS = {18: 16, 34: 32, 50: 47}
# docs/deploy.md: every .tflite (18/34/50) is within 0.3% of its size floor.
FLOOR_TOLERANCE = 0.003
# bfloat16 vs float32 logits of the tiny model, measured: max |difference| 0.010-0.038 over
# 5 input seeds (logits up to 0.74): 8 bits of mantissa, and a sign near zero may flip.
BF16_ATOL = 0.05


# --- helpers ---------------------------------------------------------------------------


class TwiceSign(lq.quantizers.Quantizer):
    """2 * sign(x): binary in Keras' eyes, but LCE cannot fold the x2 into a binary conv."""

    precision = 1

    def call(self, inputs):
        return 2.0 * lq.math.sign(inputs)


def _binary_conv(filters, name, input_quantizer=None, pad_values=1.0):
    return lq.layers.QuantConv2D(
        filters, 3, padding="same", pad_values=pad_values, use_bias=False, name=name,
        input_quantizer=input_quantizer or quantizers.ApproxSign(),
        kernel_quantizer=quantizers.MagnitudeAwareSign(),
    )


def tiny_binary_model(bad=False, size=8, pad_values=1.0, name="tiny", seed=1):
    """Two binary convs with shortcuts, BN, pooling and a classifier: converts in seconds."""
    tf.keras.utils.set_random_seed(seed)
    inputs = tf.keras.Input((size, size, 32))
    y = _binary_conv(32, "first_conv", TwiceSign() if bad else None, pad_values)(inputs)
    y = tf.keras.layers.BatchNormalization(name="first_bn")(y)
    x = tf.keras.layers.Add(name="first_add")([y, inputs])
    y = _binary_conv(32, "second_conv", pad_values=pad_values)(x)
    y = tf.keras.layers.BatchNormalization(name="second_bn")(y)
    x = tf.keras.layers.Add(name="second_add")([y, x])
    x = tf.keras.layers.GlobalAveragePooling2D()(x)
    outputs = tf.keras.layers.Dense(3, name="fc")(x)
    return tf.keras.Model(inputs, outputs, name=name)


def float_model():
    inputs = tf.keras.Input((16, 16, 3))
    x = tf.keras.layers.Conv2D(8, 3, padding="same")(inputs)
    x = tf.keras.layers.GlobalAveragePooling2D()(x)
    return tf.keras.Model(inputs, tf.keras.layers.Dense(3)(x), name="float_net")


def counted_params(model):
    """(binary, float, batchnorm) counted from the Keras layers, without Larq's profile:
    binary = kernels of the binary convs, batchnorm = 2 per channel, float = the rest."""
    binary = sum(int(np.prod(layer.kernel.shape)) for layer in binary_conv_layers(model))
    bn_layers = [layer for layer in model.layers
                 if isinstance(layer, tf.keras.layers.BatchNormalization)]
    bn = sum(2 * int(layer.moving_mean.shape[0]) for layer in bn_layers)
    # A BatchNormalization layer holds 4 weights per channel (gamma, beta, mean, variance).
    return binary, model.count_params() - binary - 2 * bn, bn


def documented_keys():
    """{section: set of keys} from the tables of docs/export_report_schema.md."""
    sections, current = {}, None
    for line in SCHEMA_DOC.read_text().splitlines():
        heading = re.match(r"^## (?:`(\w+)`|Top level)", line)
        if heading:
            current = heading.group(1) or "top"
            sections[current] = set()
            continue
        row = re.match(r"^\| `(\w+)` \|", line)
        if row and current:
            sections[current].add(row.group(1))
            if row.group(1) == "results":
                sections["results_item"] = set(re.findall(r"`(\w+)` \(", line))
    return sections


def normalized_like(n, size, seed=3, channels=3):
    """Images normalised as bireal_tf.data does: roughly zero mean, unit std."""
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, size, size, channels)).astype(np.float32)


# --- the 18-layer net, converted once ------------------------------------------------------


@pytest.fixture(scope="module")
def r18(tmp_path_factory):
    tf.keras.utils.set_random_seed(0)
    # 96x96: every binary conv's input is >= 3x3, clear of LCE's zero-padding bug (see below).
    model = bireal_net(18, input_shape=(96, 96, 3), num_classes=10, classifier_activation=None)
    out = tmp_path_factory.mktemp("r18") / "r18.tflite"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExportWarning)  # sign flips, if any (see below)
        report = export_tflite(model, out, parity=ParitySettings(atol=1e-4, rtol=0.0),
                               latency=LatencySettings(threads=(1, 2), runs=3, warmup=1),
                               report_path=out.with_suffix(".json"))
    print(f"\nR18 96x96: conversion {report.conversion_seconds:.1f} s, "
          f"{report.size.file_bytes / 1e6:.2f} MB, host latency {report.host_latency_ms.results}")
    return model, out, report


def test_r18_every_binary_conv_is_an_lce_bconv(r18):
    model, out, report = r18
    ops = op_histogram(out.read_bytes())  # TensorFlow's schema, not the export's parser
    assert ops["LceBconv2d"] == len(binary_conv_layers(model)) == 16
    assert ops["LceDequantize"] == 0
    assert ops["CONV_2D"] == 4 and ops["FULLY_CONNECTED"] == 1  # stem + 3 shortcuts, classifier
    assert report.op_histogram == dict(ops)
    assert report.binary_convs.ok and report.binary_convs.float_layers == []
    assert all("sign flips" in w for w in report.warnings)  # nothing else to warn about


def test_r18_tflite_logits_match_keras(r18):
    """Logits agree to 1e-4 on every input whose binary activations are clear of zero.

    Not on every input: an activation within float rounding of zero can binarize
    differently in LCE (BatchNorm folded into the conv) and in Keras, and the flip spreads
    to the logits. Measured here at 96x96 with 16 random inputs: R18 1 input off by 0.45,
    R34 1, R50 1-3; the others agree to ~1e-5. A conversion fault moves every input.
    """
    model, out, report = r18
    parity = report.parity
    assert parity.inputs == "random_normal" and parity.num_samples == 16
    assert parity.tolerance == 1e-4 and parity.verdict in ("exact", "sign_flips")
    assert parity.ok and parity.samples_within_tolerance >= 12
    assert parity.clear_samples >= 1
    assert parity.clear_samples_within_tolerance == parity.clear_samples
    assert parity.top1_agreement >= 15 / 16
    # Independently of the report: the clearest 8 of 32 fresh inputs through LCE.
    pool = normalized_like(32, 96)
    margins = sign_margins(model, pool)
    order = np.argsort(-margins)[:8]
    x, clear = pool[order], margins[order] >= 2e-6
    assert clear.sum() >= 1
    keras_logits = model(x, training=False).numpy()
    lite_logits = TFLiteRunner(out.read_bytes()).predict(x)
    per_input = np.abs(keras_logits - lite_logits).max(axis=1)
    assert np.all(per_input[clear] <= 1e-4), (per_input, margins[order])
    np.testing.assert_array_equal(keras_logits[clear].argmax(1), lite_logits[clear].argmax(1))
    assert np.sum(per_input <= 1e-4) >= 6, per_input


def test_r18_size_beside_its_floor_and_host_latency(r18):
    model, out, report = r18
    size = report.size
    assert size.file_bytes == out.stat().st_size
    binary, floats, bn = counted_params(model)
    assert (size.binary_params, size.float_params, size.batchnorm_params) == (binary, floats, bn)
    assert binary == 10_985_472
    assert size.floor_bytes == -(-(binary + 32 * (floats + bn)) // 8)
    # The weights are the file: binary kernels really are 1 bit (measured: 0.99865).
    assert abs(size.file_bytes / size.floor_bytes - 1) <= FLOOR_TOLERANCE
    assert size.ratio == round(size.file_bytes / size.floor_bytes, 4)
    latency = report.host_latency_ms
    assert latency.machine == platform.machine()
    assert [r["threads"] for r in latency.results] == [1, 2]
    assert all(r["median"] > 0 and r["min"] <= r["median"] for r in latency.results)
    assert "not device latency" in latency.note
    assert "host" in report.format_table()


def test_report_json_has_exactly_the_documented_keys(r18):
    _, out, report = r18
    data = json.loads(out.with_suffix(".json").read_text())
    assert data == json.loads(report.to_json())
    docs = documented_keys()
    assert set(data) == docs["top"]
    for section in ("converter", "binary_convs", "parity", "size", "host_latency_ms"):
        assert set(data[section]) == docs[section], section
    for item in data["host_latency_ms"]["results"]:
        assert set(item) == docs["results_item"]


# --- the size floor ----------------------------------------------------------------------


@pytest.mark.parametrize("depth", [18, 50])
def test_size_floor_is_larqs_model_profile_and_agrees_with_a_count_of_the_layers(depth):
    """The floor comes from Larq's ModelProfile (1 bit per binary weight, BatchNorm fused to
    2 per channel); counted here from the layers, it is the same figure."""
    model = bireal_net(depth, input_shape=(32, 32, 3), num_classes=10, pad_values=1.0)
    binary, floats, bn = counted_params(model)
    floor = size_floor(model)
    assert (floor.binary_params, floor.float_params, floor.batchnorm_params) == (binary, floats, bn)
    assert binary == {18: 10_985_472, 50: 20_672_512}[depth]
    assert floor.floor_bytes == -(-(binary + 32 * (floats + bn)) // 8)
    profile_bits = sum(p.memory for p in lq.models.ModelProfile(model).layer_profiles)
    assert profile_bits == binary + 32 * (floats + bn)


# --- binary convs LCE cannot binarize -------------------------------------------------


def test_a_float_binary_conv_is_refused_by_name_and_nothing_is_written(tmp_path):
    out = tmp_path / "model.tflite"
    out.write_bytes(b"previous export")
    with pytest.raises(ExportError, match=r"stayed float: first_conv \(became CONV_2D\)"):
        export_tflite(tiny_binary_model(bad=True), out, latency=None)
    assert out.read_bytes() == b"previous export"
    assert sorted(os.listdir(tmp_path)) == ["model.tflite"]  # no temp file left


def test_a_float_binary_conv_is_exported_with_warnings_when_allowed(tmp_path):
    out = tmp_path / "model.tflite"
    with pytest.warns(ExportWarning, match="first_conv"):
        report = export_tflite(tiny_binary_model(bad=True), out, latency=None,
                               allow_float_convs=True)
    ops = op_histogram(out.read_bytes())
    # It really stayed float: one binary conv, the other dequantized into a float CONV_2D.
    assert ops["LceBconv2d"] == 1 and ops["LceDequantize"] == 1 and ops["CONV_2D"] == 1
    checked = report.binary_convs
    assert not checked.ok and checked.lce_bconv2d == 1 and checked.keras_binary_convs == 2
    assert checked.float_layers == ["first_conv"]
    assert checked.float_layer_ops == {"first_conv": "CONV_2D"}
    assert any("first_conv" in w for w in report.warnings)
    assert "FLOAT CONVS: first_conv" in report.format_table()
    assert report.parity.verdict == "exact"  # float, but still the same function


def test_a_model_without_binary_layers_is_refused(tmp_path):
    with pytest.raises(ExportError, match="no Larq binary conv"):
        export_tflite(float_model(), tmp_path / "float.tflite", latency=None)
    assert not (tmp_path / "float.tflite").exists()


def test_lce_zero_padding_bug_is_caught_and_explained(tmp_path):
    """LCE 0.16's optimized LceBconv2d mis-pads with zeros when the input is smaller than
    the kernel: a 2x2 input to a zero-padded 3x3 binary conv gives wrong outputs."""
    model = tiny_binary_model(size=2, pad_values=0.0, name="small")
    assert [name for name, _, _ in lce_zero_padding_hazards(model)] == ["first_conv", "second_conv"]
    assert lce_zero_padding_hazards(tiny_binary_model(size=2, pad_values=1.0)) == []
    with pytest.raises(ExportError, match=r"(?s)disagrees.*zero padding.*first_conv.*pad_values=1\.0"):
        export_tflite(model, tmp_path / "small.tflite", latency=None)
    assert not (tmp_path / "small.tflite").exists()


def test_int8_io_needs_a_model_trained_with_fake_quantization(tmp_path):
    with pytest.raises(ExportError, match="int8 I/O needs a model trained with fake quantization"):
        export_tflite(tiny_binary_model(), tmp_path / "q.tflite", io_type="int8", latency=None)
    assert not (tmp_path / "q.tflite").exists()


# --- parity verdicts without the padding hazard -------------------------------------------


def test_a_tflite_that_computes_another_function_is_refused_and_allowed_on_request(
        tmp_path, monkeypatch):
    """A .tflite that really differs, with no LCE hazard: model A is exported, but the
    converter's output is replaced by LCE's real conversion of model B (same layers, other
    weights). Every input is clear of the sign threshold, so the verdict is a mismatch."""
    model_a = tiny_binary_model(seed=1)
    model_b = tiny_binary_model(seed=2)
    flatbuffer_b, _ = convert_module.convert(model_b)
    monkeypatch.setattr(convert_module, "convert", lambda model, io_type: (flatbuffer_b, 0.0))
    out = tmp_path / "a.tflite"
    with pytest.raises(ExportError, match="disagrees with the Keras model") as refused:
        export_tflite(model_a, out, latency=None)
    assert "zero padding" not in str(refused.value) and "allow_mismatch=True" in str(refused.value)
    assert os.listdir(tmp_path) == []

    with pytest.warns(ExportWarning, match=r"Exported anyway \(allow_mismatch=True\)"):
        report = export_tflite(model_a, out, latency=None, allow_mismatch=True)
    parity = report.parity
    assert parity.verdict == "mismatch" and not parity.ok
    assert parity.clear_samples == parity.num_samples == 16
    assert parity.clear_samples_within_tolerance == 0
    assert out.read_bytes() == flatbuffer_b


def test_the_sign_margin_widens_with_the_offset_batchnorm_cancels(tmp_path, monkeypatch):
    """Where a BatchNorm subtracts a mean k times its spread, its output's rounding error is
    k times larger relative to it, so an input counts as clear only at (1 + k) x the margin.
    The refused case above (another function's file), with the second BatchNorm given a
    mean 1.5e4 x its spread (and a beta that keeps its outputs' scale): no input is clear
    any more, so the differing file is judged by the majority rule ('inconclusive', every
    input differs) instead of refused."""
    model_a = tiny_binary_model(seed=1)
    bn = model_a.get_layer("second_bn")
    assert batchnorm_cancellation(model_a) == 0.0  # fresh statistics: mean 0, variance 1
    bn.moving_mean.assign(np.full(32, 500.0, np.float32))
    bn.moving_variance.assign(np.full(32, 1e-4, np.float32))
    k = 500.0 / np.sqrt(1e-4 + bn.epsilon)
    bn.beta.assign(np.full(32, k, np.float32))
    assert batchnorm_cancellation(model_a) == pytest.approx(k, rel=1e-6)
    flatbuffer_b, _ = convert_module.convert(tiny_binary_model(seed=2))
    monkeypatch.setattr(convert_module, "convert", lambda model, io_type: (flatbuffer_b, 0.0))
    with pytest.warns(ExportWarning, match="Parity is inconclusive"):
        report = export_tflite(model_a, tmp_path / "a.tflite", latency=None)
    parity = report.parity
    assert parity.sign_margin_threshold == pytest.approx(2e-6 * (1 + k), rel=1e-6)
    assert parity.min_sign_margin < parity.sign_margin_threshold
    assert parity.clear_samples == 0 and parity.samples_within_tolerance == 0
    assert parity.verdict == "inconclusive"


def test_inputs_at_the_sign_threshold_give_an_inconclusive_verdict(tmp_path):
    """Inputs that put activations on the sign threshold, as real as sign flips get.

    With half the input channels exactly 0, the shortcut passes the first conv's output
    alone to the second conv there. Where its 288 terms +-scale cancel, Keras' float conv
    leaves a rounding residue of either sign (measured: 752 of 16384 outputs within
    1e-4 x max, e.g. -9.7e-8) while LCE's integer count gives exactly 0, so the second conv
    binarizes differently. Every input differs and none is clear of the threshold (sign
    margin 0): the export cannot tell sign flips from a fault, 'inconclusive' with a warning.
    """
    model = tiny_binary_model()
    x = normalized_like(8, 8, channels=32)
    x[..., :16] = 0.0
    assert np.all(sign_margins(model, x) == 0.0)
    out = tmp_path / "zeros.tflite"
    with pytest.warns(ExportWarning, match="Parity is inconclusive"):
        report = export_tflite(model, out, sample_inputs=x, latency=None)
    parity = report.parity
    assert parity.inputs == "sample_inputs" and parity.num_samples == 8
    assert parity.verdict == "inconclusive" and parity.ok
    assert parity.clear_samples == 0 and 2 * parity.samples_within_tolerance < 8
    # The difference is real, measured here without the export:
    lite = TFLiteRunner(out.read_bytes()).predict(x)
    assert np.abs(lite - model(x, training=False).numpy()).max(axis=1).min() > 1e-3


# --- mixed precision ---------------------------------------------------------------------


def test_a_mixed_bfloat16_model_is_exported_as_its_float32_twin(tmp_path):
    """TFLite refuses mixed precision graphs; the export converts the float32 twin."""
    tf.keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        model = tiny_binary_model(name="bf16")
    finally:
        tf.keras.mixed_precision.set_global_policy("float32")
    assert model.get_layer("first_conv").compute_dtype == "bfloat16"
    assert mixed_precision_policies(model) == {"mixed_bfloat16"}

    twin = float32_twin(model)
    assert mixed_precision_policies(twin) == set()
    assert all(layer.compute_dtype == "float32" for layer in twin.layers)
    assert [w.shape for w in twin.weights] == [w.shape for w in model.weights]
    for a, b in zip(twin.get_weights(), model.get_weights()):
        np.testing.assert_array_equal(a, b)
    x = normalized_like(4, 8, channels=32)
    # The same function up to bfloat16 rounding (see BF16_ATOL).
    np.testing.assert_allclose(twin(x).numpy(), model(x).numpy().astype(np.float32),
                               atol=BF16_ATOL)
    assert float32_twin(twin) is twin  # a float32 model is returned as it is

    report = export_tflite(model, tmp_path / "bf16.tflite", latency=None)
    assert report.keras_precision == "mixed_bfloat16"
    assert report.binary_convs.ok and report.op_histogram["LceBconv2d"] == 2
    assert report.parity.verdict == "exact"  # the .tflite computes what the twin computes
    assert "float32 twin" in report.format_table()
    assert export_tflite(twin, tmp_path / "f32.tflite", latency=None).keras_precision == "float32"


def test_a_free_input_size_is_fixed_by_input_shape(tmp_path):
    model = tiny_binary_model(size=None, name="free")
    with pytest.raises(ExportError, match=r"free dimensions.*--input-size"):
        export_tflite(model, tmp_path / "free.tflite", latency=None)
    with pytest.raises(ExportError, match=r"input_shape \(8, 8, 3\) does not fit"):
        export_tflite(model, tmp_path / "fixed.tflite", latency=None, input_shape=(8, 8, 3))
    report = export_tflite(model, tmp_path / "fixed.tflite", latency=None, input_shape=(8, 8, 32))
    assert report.input_shape == [1, 8, 8, 32] and report.binary_convs.ok
    assert report.parity.verdict == "exact"
    assert report.size.binary_params == counted_params(model)[0]


# --- files ------------------------------------------------------------------------------


def test_missing_output_directory_is_a_clear_error(tmp_path):
    missing = tmp_path / "no_such_dir"
    with pytest.raises(ModelFileError, match=r"no_such_dir.*does not exist.*mkdir -p"):
        export_tflite(tiny_binary_model(), missing / "m.tflite")
    assert not missing.exists()  # not created silently


def test_missing_and_corrupt_model_files_are_named(tmp_path):
    with pytest.raises(ModelFileError, match=r"missing\.keras' does not exist"):
        export_tflite(tmp_path / "missing.keras", tmp_path / "m.tflite")
    for name in ("corrupt.keras", "corrupt.h5"):
        bad = tmp_path / name
        bad.write_bytes(b"\x00 not a model \xff" * 10)
        with pytest.raises(ModelFileError, match=rf"Could not load a Keras model from '.*{name}'"):
            export_tflite(bad, tmp_path / "m.tflite")
    assert not (tmp_path / "m.tflite").exists()


def test_a_failed_write_leaves_the_previous_export_whole(tmp_path, monkeypatch):
    target = tmp_path / "out.tflite"
    target.write_bytes(b"old")

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        export_tflite(tiny_binary_model(), target, latency=None)
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["out.tflite"]


# --- CLI ------------------------------------------------------------------------------------


def _cli(*args, cwd):
    env = dict(os.environ, TF_USE_LEGACY_KERAS="1", TF_CPP_MIN_LOG_LEVEL="2")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-m", "bireal_tf.export", *map(str, args)],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=600, check=False)


def _error_lines(done):
    return [line for line in done.stderr.splitlines() if line.startswith("error:")]


@pytest.mark.slow  # a CLI conversion: ~11 s
def test_cli_exports_a_saved_h5_model_and_writes_the_report(tmp_path):
    tiny_binary_model().save(tmp_path / "model.h5")  # bireal_tf's quantizers, found by name
    done = _cli(tmp_path / "model.h5", "-o", tmp_path / "model.tflite", "--report",
                tmp_path / "report.json", "--threads", "1", "--latency-runs", "2", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "LceBconv2d 2" in done.stdout and "NOT device latency" in done.stdout
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["binary_convs"]["lce_bconv2d"] == 2
    assert report["source"].endswith("model.h5")
    assert op_histogram((tmp_path / "model.tflite").read_bytes())["LceBconv2d"] == 2
    assert sorted(os.listdir(tmp_path)) == ["model.h5", "model.tflite", "report.json"]


@pytest.mark.slow  # two CLI conversions: ~30 s
def test_cli_refuses_with_exit_code_1_and_allow_mismatch_exports(tmp_path):
    """docs/deploy.md: the export refuses with the reason (exit code 1) and writes nothing."""
    tiny_binary_model(size=2, pad_values=0.0, name="small").save(tmp_path / "small.keras")
    out, report = tmp_path / "small.tflite", tmp_path / "report.json"
    done = _cli(tmp_path / "small.keras", "-o", out, "--report", report, "--no-benchmark",
                cwd=tmp_path)
    assert done.returncode == 1, done.stderr[-2000:]
    (error,) = _error_lines(done)
    assert "disagrees with the Keras model" in error and "first_conv" in error
    assert "--allow-mismatch" in error
    assert sorted(os.listdir(tmp_path)) == ["small.keras"]

    done = _cli(tmp_path / "small.keras", "-o", out, "--report", report, "--no-benchmark",
                "--allow-mismatch", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    data = json.loads(report.read_text())
    assert data["parity"]["verdict"] == "mismatch" and not data["parity"]["ok"]
    assert any("Exported anyway (allow_mismatch=True)" in w for w in data["warnings"])
    assert "WARNING: The .tflite disagrees" in done.stdout
    assert op_histogram(out.read_bytes())["LceBconv2d"] == 2


def test_cli_bad_input_exits_2_with_one_line(tmp_path, capsys):
    """The CLI's main() in this process: the same code as `python -m bireal_tf.export`, without
    a second TensorFlow start-up (the slow suite runs the module as a process)."""
    from bireal_tf.export.__main__ import main

    assert main([str(tmp_path / "nowhere.keras"), "-o", str(tmp_path / "m.tflite")]) == 2
    (error,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert "nowhere.keras' does not exist" in error
    assert not (tmp_path / "m.tflite").exists()


# --- the deeper nets (slow) ------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("depth", [34, 50])
def test_deep_nets_convert_fully_binary_and_match_keras(depth, tmp_path):
    """All binary convs become LceBconv2d; logits match Keras to 1e-4 on most inputs.

    The inputs are the 16 of 48 random ones furthest from the sign threshold. At 32x32
    (pad_values=1.0, as the demo trains) most of them clear it by 2e-6 (measured: R34 and
    R50 19 or more of 48), so the strict check has inputs to bite on; at 96x96 none of 48
    does in R34 or R50, and an input can still differ by a sign flip (see
    test_r18_tflite_logits_match_keras).
    """
    tf.keras.utils.set_random_seed(0)
    model = bireal_net(depth, input_shape=(32, 32, 3), num_classes=10, pad_values=1.0,
                       classifier_activation=None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExportWarning)  # sign flips, if any, come with a warning
        report = export_tflite(model, tmp_path / f"r{depth}.tflite", latency=None,
                               parity=ParitySettings(atol=1e-4, rtol=0.0, pool=3))
    print(f"\nR{depth} 32x32: conversion {report.conversion_seconds:.1f} s, "
          f"{report.size.file_bytes / 1e6:.2f} MB, parity {report.parity}")
    ops = op_histogram((tmp_path / f"r{depth}.tflite").read_bytes())
    assert ops["LceBconv2d"] == BINARY_CONVS[depth] == len(binary_conv_layers(model))
    assert ops["LceDequantize"] == 0 and report.op_histogram == dict(ops)
    assert report.binary_convs.ok
    parity = report.parity
    assert parity.inputs == "random_normal_clearest" and parity.tolerance == 1e-4
    assert parity.verdict in ("exact", "sign_flips")
    assert parity.samples_within_tolerance >= 12  # max |diff| <= 1e-4 on >= 12 of 16 inputs
    assert parity.clear_samples >= 8
    assert parity.clear_samples_within_tolerance == parity.clear_samples
    assert parity.top1_agreement >= 15 / 16
    binary, floats, bn = counted_params(model)
    assert (report.size.binary_params, report.size.float_params + report.size.batchnorm_params) == (
        binary, floats + bn)
    # With 10 classes the file is slightly under the floor (R50: 0.9958): LCE folds
    # each BatchNorm after a float conv into that conv's bias, 1 float per channel, not 2.
    assert 0.995 <= report.size.ratio <= 1 + FLOOR_TOLERANCE


def test_conversion_through_the_serving_function_gives_the_flatbuffers_of_keras_conversion():
    """`saved_for_conversion` saves only the serving function: LCE's and TFLite's files are
    byte for byte those of converting the Keras model itself (which traces far more)."""
    import larq_compute_engine as lce

    from bireal_tf.export.portable import portable_twin

    model = tiny_binary_model(size=16)
    ours, _ = convert_module.convert(model)
    assert ours == bytes(lce.convert_keras_model(model))
    # TFLite's conversion metadata records the source kind (Keras model or SavedModel):
    # the files differ there only, so compare what the interpreter sees and computes.
    _, float_twin, _, _ = convert_module.convert_portable(model)
    keras_twin = bytes(tf.lite.TFLiteConverter.from_keras_model(portable_twin(model)).convert())
    x = normalized_like(2, 16, channels=32)
    seen = []
    for flatbuffer in (float_twin, keras_twin):
        interpreter = tf.lite.Interpreter(model_content=flatbuffer)
        interpreter.resize_tensor_input(0, x.shape)
        interpreter.allocate_tensors()
        interpreter.set_tensor(interpreter.get_input_details()[0]["index"], x)
        interpreter.invoke()
        seen.append((len(flatbuffer), [op["op_name"] for op in interpreter._get_ops_details()],
                     [(t["name"], tuple(t["shape"])) for t in interpreter.get_tensor_details()],
                     interpreter.get_tensor(interpreter.get_output_details()[0]["index"]).tolist()))
    assert seen[0] == seen[1]
