"""bireal_tf.export: real LCE conversions, checked against the Keras models.

Timings on the shared 2-core host (load 5-6): R18 at 96x96 converts in ~20 s,
R34 ~55 s, R50 ~105 s (most of it LCE's SavedModel save); the tiny models in
1-5 s. R34/R50 are marked slow.
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
from bireal_tf.export import (
    ExportError,
    ExportWarning,
    ModelFileError,
    TFLiteRunner,
    atomic_write_bytes,
    export_tflite,
    float32_twin,
    footprint,
    lce_zero_padding_hazards,
    mixed_precision_policies,
    op_histogram,
    sign_margins,
)
from bireal_tf.models import binary_conv_layers, bireal_net

REPO = Path(__file__).resolve().parents[1]
SCHEMA_DOC = REPO / "docs" / "export_report_schema.md"
BINARY_CONVS = {18: 16, 34: 32, 50: 47}


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


def tiny_binary_model(bad=False, size=8, pad_values=1.0, name="tiny"):
    """Two binary convs with shortcuts, BN, pooling and a classifier: converts in seconds."""
    tf.keras.utils.set_random_seed(1)
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


def normalized_like(n, size, seed=3):
    """Images normalised as bireal_tf.data does: roughly zero mean, unit std."""
    return np.random.default_rng(seed).standard_normal((n, size, size, 3)).astype(np.float32)


# --- the 18-layer net, converted once ------------------------------------------------------


@pytest.fixture(scope="module")
def r18(tmp_path_factory):
    tf.keras.utils.set_random_seed(0)
    # 96x96: every binary conv's input is >= 3x3, clear of LCE's zero-padding bug (see below).
    model = bireal_net(18, input_shape=(96, 96, 3), num_classes=10, classifier_activation=None)
    out = tmp_path_factory.mktemp("r18") / "r18.tflite"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExportWarning)  # sign flips, if any (see below)
        report = export_tflite(model, out, threads=(1, 2), latency_runs=3, latency_warmup=1,
                               parity_atol=1e-4, parity_rtol=0.0,
                               report_path=out.with_suffix(".json"))
    print(f"\nR18 96x96: conversion {report.conversion_seconds:.1f} s, "
          f"{report.size.file_bytes / 1e6:.2f} MB, host latency {report.host_latency_ms.results}")
    return model, out, report


def test_r18_every_binary_conv_is_an_lce_bconv(r18):
    model, out, report = r18
    ops = op_histogram(out.read_bytes())
    assert ops["LceBconv2d"] == len(binary_conv_layers(model)) == 16
    assert ops["LceDequantize"] == 0
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
    binary = sum(int(np.prod(layer.kernel.shape)) for layer in binary_conv_layers(model))
    assert size.binary_params == binary == 10_985_472
    bn = sum(2 * int(layer.moving_mean.shape[0]) for layer in model.layers
             if isinstance(layer, tf.keras.layers.BatchNormalization))
    assert size.batchnorm_params == bn
    # Every other weight is float; a BN layer holds 4 weights per channel, counted as 2.
    assert size.float_params == model.count_params() - binary - 2 * bn
    assert size.floor_bytes == -(-(binary + 32 * (size.float_params + bn)) // 8)
    assert 0.9 < size.ratio < 1.2  # the weights are the file: binary kernels really are 1 bit
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


# --- binary convs LCE cannot binarize -------------------------------------------------


def test_a_float_binary_conv_is_refused_by_name_and_nothing_is_written(tmp_path):
    out = tmp_path / "model.tflite"
    out.write_bytes(b"previous export")
    with pytest.raises(ExportError, match=r"stayed float: first_conv \(became CONV_2D\)"):
        export_tflite(tiny_binary_model(bad=True), out, benchmark=False)
    assert out.read_bytes() == b"previous export"
    assert sorted(os.listdir(tmp_path)) == ["model.tflite"]  # no temp file left


def test_a_float_binary_conv_is_exported_with_warnings_when_allowed(tmp_path):
    out = tmp_path / "model.tflite"
    with pytest.warns(ExportWarning, match="first_conv"):
        report = export_tflite(tiny_binary_model(bad=True), out, benchmark=False,
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
        export_tflite(float_model(), tmp_path / "float.tflite", benchmark=False)
    assert not (tmp_path / "float.tflite").exists()


def test_lce_zero_padding_bug_is_caught_and_explained(tmp_path):
    """LCE 0.16's optimized LceBconv2d mis-pads with zeros when the input is smaller than
    the kernel: a 2x2 input to a zero-padded 3x3 binary conv gives wrong outputs."""
    model = tiny_binary_model(size=2, pad_values=0.0, name="small")
    assert [name for name, _, _ in lce_zero_padding_hazards(model)] == ["first_conv", "second_conv"]
    assert lce_zero_padding_hazards(tiny_binary_model(size=2, pad_values=1.0)) == []
    with pytest.raises(ExportError, match=r"(?s)disagrees.*zero padding.*first_conv.*pad_values=1\.0"):
        export_tflite(model, tmp_path / "small.tflite", benchmark=False)
    assert not (tmp_path / "small.tflite").exists()


def test_int8_io_needs_quantization_ranges(tmp_path):
    with pytest.raises(ExportError, match="int8 I/O needs a quantized model"):
        export_tflite(tiny_binary_model(), tmp_path / "q.tflite", inference_input_type="int8",
                      benchmark=False)
    with pytest.warns(ExportWarning, match="parity is not enforced"):
        report = export_tflite(tiny_binary_model(), tmp_path / "q.tflite", benchmark=False,
                               inference_input_type=tf.int8, inference_output_type="int8",
                               experimental_default_int8_range=(-3.0, 3.0))
    assert (report.input_type, report.output_type) == ("int8", "int8")
    assert report.converter.experimental_default_int8_range == [-3.0, 3.0]
    assert report.parity.verdict == "not_enforced" and report.binary_convs.ok
    assert op_histogram((tmp_path / "q.tflite").read_bytes())["LceBconv2d"] == 2


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
    x = normalized_like(4, 8)[..., :1].repeat(32, axis=-1)
    # The same function up to bfloat16 rounding (a sign near zero may flip, hence loose).
    np.testing.assert_allclose(twin(x).numpy(), model(x).numpy().astype(np.float32), atol=0.5)
    assert float32_twin(twin) is twin  # a float32 model is returned as it is

    report = export_tflite(model, tmp_path / "bf16.tflite", benchmark=False)
    assert report.keras_precision == "mixed_bfloat16"
    assert report.binary_convs.ok and report.op_histogram["LceBconv2d"] == 2
    assert report.parity.verdict == "exact"  # the .tflite computes what the twin computes
    assert "float32 twin" in report.format_table()
    assert export_tflite(twin, tmp_path / "f32.tflite", benchmark=False).keras_precision == "float32"


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


def test_atomic_write_leaves_the_old_file_when_replacing_fails(tmp_path, monkeypatch):
    target = tmp_path / "out.tflite"
    target.write_bytes(b"old")
    atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"new"

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_bytes(target, b"newer")
    assert target.read_bytes() == b"new"
    assert os.listdir(tmp_path) == ["out.tflite"]


# --- CLI ------------------------------------------------------------------------------------


def _cli(*args, cwd):
    env = dict(os.environ, TF_USE_LEGACY_KERAS="1", TF_CPP_MIN_LOG_LEVEL="2")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-m", "bireal_tf.export", *map(str, args)],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=600, check=False)


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
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]


def test_cli_bad_input_exits_nonzero_with_one_line(tmp_path):
    done = _cli(tmp_path / "nowhere.keras", "-o", tmp_path / "m.tflite", cwd=tmp_path)
    assert done.returncode == 2
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "nowhere.keras' does not exist" in errors[0]


# --- the deeper nets (slow) ------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("depth", [34, 50])
def test_deep_nets_convert_fully_binary_and_match_keras(depth, tmp_path):
    """All binary convs become LceBconv2d; logits match Keras to 1e-4 on most inputs.

    The inputs are the 16 of 48 random ones furthest from the sign threshold. In these
    deeper nets even those rarely clear it by 2e-6 (R50 at 96x96: none), so an input can
    still differ by a sign flip (see test_r18_tflite_logits_match_keras).
    """
    tf.keras.utils.set_random_seed(0)
    model = bireal_net(depth, input_shape=(96, 96, 3), num_classes=10, classifier_activation=None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExportWarning)  # sign flips, if any, come with a warning
        report = export_tflite(model, tmp_path / f"r{depth}.tflite", benchmark=False,
                               parity_atol=1e-4, parity_rtol=0.0, parity_pool=3)
    print(f"\nR{depth} 96x96: conversion {report.conversion_seconds:.1f} s, "
          f"{report.size.file_bytes / 1e6:.2f} MB, parity {report.parity}")
    assert report.op_histogram["LceBconv2d"] == BINARY_CONVS[depth] == len(binary_conv_layers(model))
    assert report.op_histogram.get("LceDequantize", 0) == 0
    assert report.binary_convs.ok
    parity = report.parity
    assert parity.inputs == "random_normal_clearest" and parity.tolerance == 1e-4
    assert parity.verdict in ("exact", "sign_flips")
    assert parity.samples_within_tolerance >= 12  # max |diff| <= 1e-4 on >= 12 of 16 inputs
    assert parity.clear_samples_within_tolerance == parity.clear_samples
    assert parity.top1_agreement >= 15 / 16
    assert 0.9 < report.size.ratio < 1.2
    assert report.size.binary_params == footprint(model).binary_params
