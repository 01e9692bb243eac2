"""int8 for the layers that are not binary: a tiny QAT run -> int8 export.

Real training, real LCE conversion, real interpreter. The op types are read from
the flatbuffer by tests/lce_utils.py's parser (independent of the package's).
"""

import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from bireal_tf.export import ExportError, export_tflite
from bireal_tf.models import fake_quant_layers, int8_model
from bireal_tf.export.files import load_keras_model
from bireal_tf.models import binary_conv_layers, bireal_net
from bireal_tf.recipes.int8 import finetune_int8
from tests.lce_utils import op_histogram

SIZE = 32


def _data(n=64, seed=0):
    """Images whose class is the brightness decile of the top-left corner: learnable fast."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(0, 1, (n, SIZE, SIZE, 3)).astype("float32")
    y = (x[:, :8, :8].mean((1, 2, 3)) * 20).astype("int32") % 4
    return x, y


@pytest.fixture(scope="module")
def qat_model(tmp_path_factory):
    tf.keras.utils.set_random_seed(0)
    model = bireal_net(18, input_shape=(SIZE, SIZE, 3), num_classes=4, pad_values=1.0,
                       classifier_activation=None)
    x, y = _data()
    qmodel = finetune_int8(model, tf.data.Dataset.from_tensor_slices((x, y)).batch(16),
                           epochs=1, learning_rate=1e-3, verbose=0)
    path = tmp_path_factory.mktemp("int8") / "tiny_int8.keras"
    qmodel.save(path)
    return model, qmodel, path


@pytest.mark.slow  # uses the fake-quant finetune fixture (~40 s)
def test_int8_model_keeps_layers_and_weights(qat_model):
    model, qmodel, path = qat_model
    fresh = bireal_net(18, input_shape=(SIZE, SIZE, 3), num_classes=4, pad_values=1.0)
    q = int8_model(fresh)
    names = [layer.name for layer in fresh.layers]
    assert [layer.name for layer in q.layers if not layer.name.endswith("_fq")] == names
    for layer in fresh.layers:
        for a, b in zip(layer.get_weights(), q.get_layer(layer.name).get_weights()):
            np.testing.assert_array_equal(a, b)
    # input, 16 residual adds, every BN (stem, 16 blocks, 3 shortcuts), pool and classifier
    assert len(fake_quant_layers(q)) == 1 + 16 + 20 + 2
    # The real-valued kernels train on TFLite's int8 grid: symmetric, per output
    # channel for the convs (scale max|w_c| / 127), per tensor for the classifier.
    for name, per_channel in [("conv1", True), ("fc", False)]:
        layer = q.get_layer(name)
        w = layer.kernel.numpy()
        qw = layer.kernel_quantizer(layer.kernel).numpy()
        scale = np.abs(w).max(axis=tuple(range(w.ndim - 1)) if per_channel else None) / 127
        steps = qw / scale
        np.testing.assert_allclose(steps, np.round(steps), atol=1e-3)
        assert np.abs(steps).max() <= 127 + 1e-3 and np.abs(qw - w).max() <= scale.max() / 2 + 1e-7
        assert 0 < np.abs(qw - w).max()  # rounding happened
    assert len(binary_conv_layers(q)) == 16  # the int8 kernels are not binary convs
    # Training moved the ranges off their [-6, 6] start; loading keeps them.
    loaded = load_keras_model(path)
    ranges = [(float(f.range_min), float(f.range_max)) for f in fake_quant_layers(loaded)]
    assert ranges == [(float(f.range_min), float(f.range_max)) for f in fake_quant_layers(qmodel)]
    assert all(r != (-6.0, 6.0) for r in ranges)


@pytest.mark.slow  # int8 LCE conversion of R18: ~1.5 min
def test_qat_model_exports_int8_with_every_binary_conv_binary(qat_model, tmp_path):
    _, _, path = qat_model
    x, _ = _data(32, seed=1)
    out = tmp_path / "tiny_int8.tflite"
    report = export_tflite(str(path), out, sample_inputs=x, io_type="int8", latency=None)
    hist = op_histogram(out.read_bytes())
    qmodel = load_keras_model(path)
    assert hist["LceBconv2d"] == len(binary_conv_layers(qmodel)) == 16
    assert report.input_type == report.output_type == "int8"
    # The float layers became int8 ops: no float op is left, none (de)quantizes.
    assert report.int8.float_ops == {}
    assert report.int8.int8_ops == sum(hist.values())
    assert hist["CONV_2D"] == 4 and hist["FULLY_CONNECTED"] == 1
    assert "DEQUANTIZE" not in hist and "QUANTIZE" not in hist and "LceDequantize" not in hist
    # Size: at most 8 bits per non-binary weight, so below the float32 floor.
    assert report.size.weight_bits == 8 and report.size.scale_params > 0
    assert report.size.file_bytes < 1.1 * report.size.floor_bytes
    # Parity with the fake-quant Keras model: the argmax agrees on most inputs
    # (a wrong scale or a float fallback would leave chance level, 25%).
    assert report.parity.verdict == "int8_top1" and report.parity.ok
    assert report.parity.top1_agreement >= 0.7
    assert report.parity.num_samples == 16
    from tests.test_export import documented_keys
    assert set(report.to_dict()["int8"]) == documented_keys()["int8"]
    assert set(report.to_dict()["size"]) == documented_keys()["size"]  # ParitySettings().samples of the 32 given


@pytest.mark.slow  # a CLI process besides the API: ~15 s
def test_int8_refuses_a_model_without_fake_quant_with_the_fix(tmp_path):
    model = bireal_net(18, input_shape=(SIZE, SIZE, 3), num_classes=4, pad_values=1.0)
    path = tmp_path / "float.keras"
    model.save(path)
    with pytest.raises(ExportError, match=r"no FakeQuant layer.*int8_model\(model\).*finetune"):
        export_tflite(model, tmp_path / "q.tflite", io_type="int8", latency=None)
    proc = subprocess.run([sys.executable, "-m", "bireal_tf.export", str(path), "--int8",
                           "-o", str(tmp_path / "q.tflite"), "--no-benchmark"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr
    assert "int8 I/O needs a model trained with fake quantization" in proc.stderr
    assert "int8_model" in proc.stderr
    assert not (tmp_path / "q.tflite").exists()



def test_zero_padded_binary_convs_are_refused_or_switched_to_ones():
    model = bireal_net(18, input_shape=(SIZE, SIZE, 3), num_classes=4)  # pad_values=0
    with pytest.raises(ValueError, match=r"16 binary convs that pad with 0.*pad_values=1.0.*pad_with_ones"):
        int8_model(model)
    q = int8_model(model, pad_with_ones=True)
    padded = {layer.pad_values for layer in binary_conv_layers(q) if layer.kernel_size[0] > 1}
    assert padded == {1.0} and len(binary_conv_layers(q)) == 16
    assert {layer.pad_values for layer in binary_conv_layers(model)} == {0.0}  # the input model is untouched
