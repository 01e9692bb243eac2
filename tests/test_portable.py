"""The portable export: builtin ops only, run by stock LiteRT, and its predictor.

One small image model (32x32x3, 10 classes: Fashion-MNIST's shape) is exported once per
module; it has binary convs reading the raw input (exact zeros reach the sign), with
pad_values 0 and 1, stride 1 and 2, and a 1x1 one. The predictor tests run
`predict.py` in subprocesses where importing TensorFlow fails.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import larq as lq
import numpy as np
import pytest
import tensorflow as tf

from bireal_tf import quantizers
from bireal_tf.data import eval_preprocess, raw_examples
from bireal_tf.data.fashion_mnist import CLASS_NAMES
from bireal_tf.evaluate import evaluate
from bireal_tf.export import LiteRTRunner, export_tflite
from bireal_tf.export.files import ExportError
from bireal_tf.export.flatbuffer import TFLiteGraph
from bireal_tf.export.portable import custom_ops, is_portable_file
from bireal_tf.models import binary_conv_layers
from bireal_tf.utils import atomic_write_bytes, quiet_larq
from tests.test_export import documented_keys

PREDICT_PY = Path(__file__).resolve().parents[1] / "bireal_tf" / "export" / "predict.py"


def _binary_conv(filters, kernel, name, strides=1, pad_values=0.0):
    with quiet_larq():
        return lq.layers.QuantConv2D(
            filters, kernel, strides=strides, padding="same" if kernel > 1 else "valid",
            pad_values=pad_values, use_bias=False, name=name,
            input_quantizer=quantizers.ApproxSign(), kernel_quantizer=quantizers.MagnitudeAwareSign())


def image_model(seed=0):
    """Binary convs on a 32x32 RGB image: pad 0 and 1, stride 1 and 2, 3x3 and 1x1."""
    tf.keras.utils.set_random_seed(seed)
    bn = tf.keras.layers.BatchNormalization
    inputs = tf.keras.Input((32, 32, 3))
    y = bn(name="bn_a")(_binary_conv(16, 3, "bconv_a", pad_values=0.0)(inputs))  # reads the image
    add = tf.keras.layers.Add  # layers, not `+`: int8_model puts a FakeQuant after each Add
    x = add(name="add_a")([y, tf.keras.layers.Conv2D(16, 1, name="shortcut_a")(inputs)])
    y = bn(name="bn_b")(_binary_conv(16, 3, "bconv_b", strides=2, pad_values=1.0)(x))
    x = add(name="add_b")([y, tf.keras.layers.AveragePooling2D(2, name="pool_b")(x)])
    y = bn(name="bn_c")(_binary_conv(16, 3, "bconv_c", strides=2, pad_values=0.0)(x))
    x = add(name="add_c")([y, tf.keras.layers.AveragePooling2D(2, name="pool_c")(x)])
    x = add(name="add_d")([bn(name="bn_d")(_binary_conv(16, 1, "bconv_d")(x)), x])
    x = tf.keras.layers.GlobalAveragePooling2D()(x)
    outputs = tf.keras.layers.Dense(10, activation="softmax", name="fc")(x)
    model = tf.keras.Model(inputs, outputs, name="image_net")
    rng = np.random.default_rng(seed)  # BatchNorm statistics as after training, some scales < 0
    for layer in model.layers:
        if isinstance(layer, tf.keras.layers.BatchNormalization):
            n = layer.gamma.shape[0]
            layer.set_weights([rng.uniform(0.5, 2, n) * rng.choice([-1, 1], n), rng.normal(0, 0.3, n),
                               rng.normal(0, 3, n), rng.uniform(0.5, 4, n)])
    return model


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    out = tmp_path_factory.mktemp("portable")
    model = image_model()
    report = export_tflite(model, out / "model_portable.tflite", target="portable",
                           dataset="fashion_mnist_embedded", latency=None,
                           report_path=out / "report.json", lce_path=out / "model_lce.tflite")
    return model, report, out


@pytest.fixture(scope="module")
def lce_file(exported):
    """The LCE file the export compared the portable one with (same labels and preprocessing)."""
    _, _, out = exported
    atomic_write_bytes(out / "model_lce.tflite.json", (out / "model_portable.tflite.json").read_bytes())
    return out / "model_lce.tflite"


def _kernels(path):
    """{tensor name: (type, data, scales)} of every CONV_2D filter of a .tflite."""
    from tensorflow.lite.python import schema_py_generated as schema
    from tensorflow.lite.tools import flatbuffer_utils

    fb = flatbuffer_utils.convert_bytearray_to_object(bytearray(Path(path).read_bytes()))
    graph, found = fb.subgraphs[0], {}
    for op in graph.operators:
        if fb.operatorCodes[op.opcodeIndex].builtinCode != schema.BuiltinOperator.CONV_2D:
            continue
        t = graph.tensors[op.inputs[1]]
        dtype = {schema.TensorType.INT8: np.int8, schema.TensorType.FLOAT32: np.float32}[t.type]
        data = np.frombuffer(bytes(fb.buffers[t.buffer].data), dtype).reshape(t.shape)
        found[t.name.decode()] = (dtype, data, None if t.quantization is None else t.quantization.scale)
    return found


def test_portable_file_has_only_builtin_ops_and_int8_pm1_binary_kernels(exported):
    model, report, out = exported
    data = (out / "model_portable.tflite").read_bytes()
    graph = TFLiteGraph(data)
    assert custom_ops(graph) == [] and is_portable_file(data)
    assert report.target == "portable" and report.runtime == "litert"
    assert report.op_histogram == dict(graph.histogram)
    n = len(binary_conv_layers(model))
    # sign -> bits: GREATER_EQUAL + CAST before each binary conv; PADV2 (with 1) for the 3x3 ones.
    assert graph.histogram["GREATER_EQUAL"] == graph.histogram["CAST"] == n == 4
    assert graph.histogram["PADV2"] == 3 and graph.histogram["CONV_2D"] == n + 1  # + the real 1x1
    int8 = [(d, s) for dtype, d, s in _kernels(out / "model_portable.tflite").values() if dtype == np.int8]
    assert len(int8) == n == report.binary_convs.int8_convs and report.binary_convs.ok
    for weights, scales in int8:
        assert set(np.unique(weights)) == {-1, 1} and len(scales) == weights.shape[0]
    assert report.binary_convs.lce_bconv2d == 0


def test_portable_file_matches_keras_and_the_lce_file(exported, lce_file):
    model, report, out = exported
    assert report.parity.verdict == "exact" and report.parity.ok
    assert report.lce_agreement.top1_agreement == 1.0 and report.lce_agreement.max_abs_diff < 1e-5
    # Beyond the report: images with exact zeros, which reach the first sign (sign(0) = +1).
    x = np.random.default_rng(5).standard_normal((24, 32, 32, 3)).astype(np.float32)
    x[::2, :16] = 0.0
    keras = model(x).numpy()
    lite = LiteRTRunner((out / "model_portable.tflite").read_bytes()).predict(x)
    np.testing.assert_allclose(lite, keras, atol=2e-6)
    from bireal_tf.export.runtime import TFLiteRunner

    np.testing.assert_allclose(TFLiteRunner(lce_file.read_bytes()).predict(x), lite, atol=2e-6)


def test_size_beside_the_float_twin_and_the_report_keys(exported):
    _, report, out = exported
    s = report.size
    assert s.file_bytes == (out / "model_portable.tflite").stat().st_size
    assert s.binary_weight_bits == 8 and s.float_twin_bytes > s.file_bytes
    assert s.float_twin_ratio == round(s.file_bytes / s.float_twin_bytes, 4)
    saved = json.loads((out / "report.json").read_text())
    keys = documented_keys()
    assert set(saved) == keys["top"] and set(saved["size"]) == keys["size"]
    assert set(saved["lce_agreement"]) == keys["lce_agreement"]
    assert set(saved["binary_convs"]) == keys["binary_convs"]
    assert saved["target"] == "portable" and saved["schema_version"] == 5
    assert "target" in report.format_table() and "vs LCE file" in report.format_table()


def test_labels_and_preprocessing_travel_with_the_model(exported):
    _, report, out = exported
    meta = json.loads((out / "model_portable.tflite.json").read_text())
    assert meta["labels"] == list(CLASS_NAMES) and meta["image_size"] == 32
    assert meta["resize"] == "stretch" and meta["color"] == "gray" and meta["output"] == "probabilities"
    from bireal_tf.data.preprocessing import FASHION_MNIST

    assert meta["mean"] == list(FASHION_MNIST.mean) and meta["std"] == list(FASHION_MNIST.std)
    assert (out / "predict.py").read_bytes() == PREDICT_PY.read_bytes()
    assert report.metadata_path == str(out / "model_portable.tflite.json")


def test_an_export_without_a_known_dataset_is_refused_before_converting(tmp_path):
    with pytest.raises(ExportError, match="--dataset"):
        export_tflite(image_model(), tmp_path / "m.tflite", target="portable", latency=None)
    assert os.listdir(tmp_path) == []


# --- the predictor, without TensorFlow ------------------------------------------------------


@pytest.fixture(scope="module")
def no_tf(tmp_path_factory):
    """A PYTHONPATH directory whose `tensorflow` (and, in `no_lce`, LCE) fails to import."""
    shim = tmp_path_factory.mktemp("shim")
    for name in ("tensorflow", "larq_compute_engine"):
        (shim / name).mkdir()
        (shim / name / "__init__.py").write_text(f"raise ImportError('{name} is blocked in this test')\n")
    return shim


def _predict(*args, shim, cwd, hide_lce=True):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if not hide_lce:  # keep only the tensorflow blocker
        (Path(cwd) / "only_tf").mkdir(exist_ok=True)
        target = Path(cwd) / "only_tf" / "tensorflow"
        if not target.exists():
            target.symlink_to(shim / "tensorflow")
        env["PYTHONPATH"] = str(Path(cwd) / "only_tf")
    else:
        env["PYTHONPATH"] = str(shim)
    return subprocess.run([sys.executable, str(PREDICT_PY), *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def _top5(stdout):
    """[(score, label)] of the first image in the predictor's output."""
    return [(float(m.group(1)), m.group(2)) for m in re.finditer(r"^  ([0-9.]+)  (.+)$", stdout, re.M)][:5]


@pytest.fixture(scope="module")
def test_image(exported):
    _, _, out = exported
    from PIL import Image

    images, labels = raw_examples("fashion_mnist_embedded", "test", n=3)
    paths = []
    for i, image in enumerate(images):
        paths.append(out / f"test_{i}.png")
        Image.fromarray(image[..., 0]).save(paths[-1])
    return paths, images


def test_predictor_prints_the_keras_top5_without_tensorflow(exported, no_tf, test_image):
    model, _, out = exported
    paths, images = test_image
    done = _predict(out / "model_portable.tflite", *paths, shim=no_tf, cwd=out)
    assert done.returncode == 0, done.stderr
    assert "LiteRT" in done.stdout and "tensorflow is blocked" not in done.stderr
    keras = model(eval_preprocess(images, "fashion_mnist_embedded")).numpy()
    blocks = done.stdout.split(str(paths[1]))
    for block, scores in ((blocks[0], keras[0]), (blocks[1].split(str(paths[2]))[0], keras[1])):
        expected = [(float(scores[k]), CLASS_NAMES[k]) for k in np.argsort(-scores)[:5]]
        printed = _top5(block)
        assert [label for _, label in printed] == [label for _, label in expected]
        np.testing.assert_allclose([p for p, _ in printed], [p for p, _ in expected], atol=2e-4)


def test_predictor_runs_an_lce_file_where_lce_is_installed(lce_file, no_tf, test_image):
    paths, _ = test_image
    done = _predict(lce_file, paths[0], shim=no_tf, cwd=lce_file.parent, hide_lce=False)
    assert done.returncode == 0, done.stderr
    assert "Larq Compute Engine" in done.stdout and len(_top5(done.stdout)) == 5


def _one_error_line(done, *words):
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    for word in words:
        assert word in lines[0]


def test_predictor_bad_inputs_get_one_line_and_exit_2(exported, lce_file, no_tf, test_image):
    _, _, out = exported
    model, image = out / "model_portable.tflite", test_image[0][0]
    _one_error_line(_predict(out / "missing.tflite", image, shim=no_tf, cwd=out), "does not exist")
    _one_error_line(_predict(out / "model_portable.tflite.json", image, shim=no_tf, cwd=out),
                    "not a .tflite")
    _one_error_line(_predict(model, out / "missing.jpg", shim=no_tf, cwd=out), "missing.jpg", "does not exist")
    (out / "notes.jpg").write_text("not an image")
    _one_error_line(_predict(model, out / "notes.jpg", shim=no_tf, cwd=out), "cannot read image")
    _one_error_line(_predict(lce_file, image, shim=no_tf, cwd=out), "custom ops", "LceQuantize", "--portable")


def test_predictor_reports_a_corrupt_file_that_loads_with_one_line(exported, no_tf, test_image, tmp_path):
    """Seeded byte edits of the portable file: LiteRT refuses them with an error (it verifies
    the flatbuffer), which the predictor reports on one line."""
    _, _, out = exported
    data = bytearray((out / "model_portable.tflite").read_bytes())
    (tmp_path / "bad.tflite.json").write_bytes((out / "model_portable.tflite.json").read_bytes())
    rng = np.random.default_rng(0)
    for offset in rng.integers(8, len(data), 20):
        data[offset] = rng.integers(0, 256)
    (tmp_path / "bad.tflite").write_bytes(bytes(data))
    _one_error_line(_predict(tmp_path / "bad.tflite", test_image[0][0], shim=no_tf, cwd=tmp_path),
                    "LiteRT cannot load")


def test_predictor_reports_an_interpreter_that_dies_by_a_signal(exported, no_tf, test_image):
    """The interpreter runs in a child process; when it dies by a signal (as a crashing
    corrupt file makes it), the predictor says so and exits 3. The signal is sent to the
    running child here: no corrupt file we tried crashes LiteRT 2.3 (it refuses them)."""
    import signal
    import time

    _, _, out = exported
    env = dict(os.environ, PYTHONPATH=str(no_tf))
    parent = subprocess.Popen([sys.executable, str(PREDICT_PY), str(out / "model_portable.tflite"),
                               *[str(test_image[0][0])] * 3000], cwd=out, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    children = Path(f"/proc/{parent.pid}/task/{parent.pid}/children")
    deadline = time.monotonic() + 120
    while not children.read_text().split() and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(1.0)  # let the child get going
    os.kill(int(children.read_text().split()[0]), signal.SIGSEGV)
    _, stderr = parent.communicate(timeout=120)
    lines = stderr.strip().splitlines()
    assert parent.returncode == 3
    assert lines[-1].endswith("Export it again (or, if the file is good, this ai-edge-litert build does "
                              "not run on this machine: try another version).")
    assert "the file crashed the TFLite interpreter: it is corrupt (SIGSEGV)" in lines[-1]


# --- evaluate -----------------------------------------------------------------------------


def test_evaluate_accepts_a_portable_file_and_gives_the_keras_accuracy(exported):
    model, _, out = exported
    on_file = evaluate(out / "model_portable.tflite", "fashion_mnist_embedded", limit=256)
    on_keras = evaluate(model, "fashion_mnist_embedded", limit=256)
    assert on_file["runtime"] == "litert" and on_file["model_kind"] == "tflite"
    assert on_file["correct_top1"] == on_keras["correct_top1"]
    assert on_file["correct_top5"] == on_keras["correct_top5"]


# --- a trained model, over the 2,000 embedded test images ----------------------------------


@pytest.mark.slow
def test_a_trained_models_portable_file_agrees_with_its_lce_file_on_the_test_set(tmp_path):
    """The portable export's acceptance check on a model trained here (the demo R18 takes
    ~6 CPU minutes on an idle machine; this smaller binary net trains in seconds): no custom
    op, top-1 agreement >= 0.999 with the LCE file over all 2,000 embedded test images, and
    the accuracy from `evaluate` equal to the Keras model's."""
    from bireal_tf.data import load_dataset
    from bireal_tf.export.runtime import TFLiteRunner

    model = image_model(seed=1)
    train = load_dataset("fashion_mnist_embedded", "train", batch_size=64, seed=0)
    model.compile(tf.keras.optimizers.Adam(3e-3), "sparse_categorical_crossentropy", ["accuracy"])
    model.fit(train.dataset, epochs=4, verbose=0)
    report = export_tflite(model, tmp_path / "trained.tflite", target="portable",
                           dataset="fashion_mnist_embedded", latency=None,
                           lce_path=tmp_path / "trained_lce.tflite")
    assert custom_ops(TFLiteGraph((tmp_path / "trained.tflite").read_bytes())) == []
    test = load_dataset("fashion_mnist_embedded", "test", batch_size=500)
    x = np.concatenate([np.asarray(images) for images, _ in test.dataset])
    assert len(x) == 2000
    portable = LiteRTRunner((tmp_path / "trained.tflite").read_bytes()).predict(x)
    lce = TFLiteRunner((tmp_path / "trained_lce.tflite").read_bytes()).predict(x)
    keras = np.concatenate([model(x[i: i + 500]).numpy() for i in range(0, len(x), 500)])
    agreement = float(np.mean(portable.argmax(1) == lce.argmax(1)))
    with_keras = float(np.mean(portable.argmax(1) == keras.argmax(1)))
    on_file = evaluate(tmp_path / "trained.tflite", "fashion_mnist_embedded")
    on_keras = evaluate(model, "fashion_mnist_embedded")
    print(f"\ntrained net: top-1 agreement over 2000 portable vs LCE {agreement:.4f}, vs Keras "
          f"{with_keras:.4f}; accuracy portable {on_file['top1']:.4f}, Keras {on_keras['top1']:.4f}; "
          f"parity {report.parity.verdict}")
    assert agreement >= 0.999 and with_keras >= 0.999
    assert on_file["num_examples"] == 2000 and on_file["top1"] > 0.3  # trained (0.49 here): chance is 0.1
    assert abs(on_file["top1"] - on_keras["top1"]) <= 0.001


# --- int8 models: a fully int8 portable file ------------------------------------------------


def _int8(model, x, batches=4):
    """int8_model(model) with its ranges set by a few batches in training mode."""
    from bireal_tf.models import int8_model

    qmodel = int8_model(model, pad_with_ones=True)
    for part in np.array_split(x, batches):
        qmodel(part, training=True)
    return qmodel


def _levels(path, x):
    """(int8 output levels, int8 inputs) of an int8-I/O .tflite on float inputs `x`, quantized
    as the file's input says."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=Path(path).read_bytes())
    interpreter.allocate_tensors()
    (inp,), (out,) = interpreter.get_input_details(), interpreter.get_output_details()
    assert inp["dtype"] == out["dtype"] == np.int8
    scale, zero = inp["quantization"]
    quantized = np.clip(np.round(x / scale) + zero, -128, 127).astype(np.int8)
    levels = []
    for sample in quantized:
        interpreter.set_tensor(inp["index"], sample[None])
        interpreter.invoke()
        levels.append(interpreter.get_tensor(out["index"])[0].copy())
    return np.array(levels), quantized


def test_an_int8_binary_conv_gives_the_int8_levels_of_lces_int8_bconv(tmp_path):
    """A binary conv + BatchNorm (negative scales included) of an int8 model: the portable int8
    CONV_2D on +-1 requantizes its exact sum to the same int8 levels as LCE's LceBconv2d."""
    rng = np.random.default_rng(3)
    inputs = tf.keras.Input((8, 8, 32))
    y = _binary_conv(48, 3, "bconv", strides=2, pad_values=1.0)(inputs)
    y = tf.keras.layers.BatchNormalization(name="bn")(y)
    model = tf.keras.Model(inputs, tf.keras.layers.Flatten(name="flat")(y))
    model.get_layer("bn").set_weights([rng.uniform(0.5, 2, 48) * rng.choice([-1, 1], 48),
                                       rng.normal(size=48), rng.normal(size=48) * 5, rng.uniform(10, 100, 48)])
    x = rng.standard_normal((64, 8, 8, 32)).astype(np.float32)
    qmodel = _int8(model, x)
    report = export_tflite(qmodel, tmp_path / "p.tflite", target="portable", io_type="int8", sample_inputs=x,
                           latency=None, write_predictor=False, lce_path=tmp_path / "lce.tflite")
    hist = dict(TFLiteGraph((tmp_path / "p.tflite").read_bytes()).histogram)
    assert hist == {"GREATER_EQUAL": 1, "SELECT_V2": 1, "PADV2": 1, "CONV_2D": 1, "RESHAPE": 1}
    assert report.binary_convs.int8_convs == 1 and report.input_type == report.output_type == "int8"
    mine, quantized = _levels(tmp_path / "p.tflite", x)
    from larq_compute_engine.tflite.python.interpreter import Interpreter

    theirs = np.asarray(Interpreter((tmp_path / "lce.tflite").read_bytes()).predict(quantized))
    assert mine.size == 64 * 4 * 4 * 48 and np.array_equal(mine, theirs.reshape(mine.shape))
    assert report.lce_agreement.top1_agreement == 1.0 and report.lce_agreement.max_abs_diff == 0.0


def test_an_int8_models_portable_file_is_fully_int8_with_the_signs_as_select(tmp_path):
    """The image model made int8: int8 from the input's QUANTIZE to the global pool, each
    binary conv an int8 CONV_2D on the +-1 of a SELECT_V2 with kernels of +-127 levels (+-1
    times the per-channel scale); evaluate runs it on LiteRT."""
    from bireal_tf.data import load_dataset

    model = image_model()
    x = np.concatenate([np.asarray(images) for images, _ in
                        load_dataset("fashion_mnist_embedded", "train", batch_size=64, limit=128).dataset])
    qmodel = _int8(model, x)
    out = tmp_path / "int8_portable.tflite"
    report = export_tflite(qmodel, out, target="portable", sample_inputs=x[:32], latency=None,
                           dataset="fashion_mnist_embedded")
    data = out.read_bytes()
    graph = TFLiteGraph(data)
    assert custom_ops(graph) == [] and is_portable_file(data)
    assert graph.histogram["GREATER_EQUAL"] == graph.histogram["SELECT_V2"] == 4 and "CAST" not in graph.histogram
    # The network up to the global pool is int8 (this small model's classifier, a Dense with
    # its softmax inside, gets a FakeQuant only after the softmax, so it stays float).
    body = graph.ops[:[op.name for op in graph.ops].index("MEAN") + 1]
    assert body[0].name == "QUANTIZE" and "DEQUANTIZE" not in [op.name for op in body]
    assert {graph.tensors[t].type for op in body[1:] for t in op.inputs + op.outputs} == {"int8", "int32", "bool"}
    kernels = [(d, s) for dtype, d, s in _kernels(out).values()]
    binary = [(d, s) for d, s in kernels if set(np.unique(d)) == {-127, 127}]
    assert len(binary) == report.binary_convs.int8_convs == 4 and report.binary_convs.ok
    assert all(len(scales) == d.shape[0] for d, scales in binary)
    assert report.parity.verdict == "int8_top1" and report.lce_agreement is not None
    assert report.size.float_twin_bytes is None and report.size.binary_weight_bits == 8
    on_file = evaluate(out, "fashion_mnist_embedded", limit=64)
    assert on_file["runtime"] == "litert" and on_file["num_examples"] == 64


@pytest.mark.slow
def test_a_trained_int8_models_portable_file_agrees_with_its_lce_int8_file(tmp_path):
    """The int8 counterpart of the test above: the trained small net, finetuned with fake
    quantization (+1 padding), exported both ways; top-1 over the 2,000 embedded test images."""
    from bireal_tf.data import load_dataset
    from bireal_tf.export.runtime import TFLiteRunner
    from bireal_tf.recipes.int8 import finetune_int8

    model = image_model(seed=1)
    train = load_dataset("fashion_mnist_embedded", "train", batch_size=64, seed=0)
    model.compile(tf.keras.optimizers.Adam(3e-3), "sparse_categorical_crossentropy", ["accuracy"])
    model.fit(train.dataset, epochs=4, verbose=0)
    qmodel = finetune_int8(model, train.dataset, epochs=1, learning_rate=1e-4, verbose=0, pad_with_ones=True)
    report = export_tflite(qmodel, tmp_path / "int8.tflite", target="portable",
                           dataset="fashion_mnist_embedded", latency=None,
                           lce_path=tmp_path / "int8_lce.tflite")
    test = load_dataset("fashion_mnist_embedded", "test", batch_size=500)
    x = np.concatenate([np.asarray(images) for images, _ in test.dataset])
    portable = LiteRTRunner((tmp_path / "int8.tflite").read_bytes()).predict(x)
    lce = TFLiteRunner((tmp_path / "int8_lce.tflite").read_bytes()).predict(x)
    keras = np.concatenate([qmodel(x[i: i + 500]).numpy() for i in range(0, len(x), 500)])
    agreement = float(np.mean(portable.argmax(1) == lce.argmax(1)))
    with_keras = float(np.mean(portable.argmax(1) == keras.argmax(1)))
    lce_with_keras = float(np.mean(lce.argmax(1) == keras.argmax(1)))
    on_file = evaluate(tmp_path / "int8.tflite", "fashion_mnist_embedded")
    on_lce = evaluate(tmp_path / "int8_lce.tflite", "fashion_mnist_embedded")
    sizes = (tmp_path / "int8.tflite").stat().st_size, (tmp_path / "int8_lce.tflite").stat().st_size
    print(f"\ntrained int8 net: top-1 agreement over 2000 portable vs LCE {agreement:.4f}, portable vs "
          f"fake-quant Keras {with_keras:.4f} (LCE vs Keras {lce_with_keras:.4f}); accuracy portable "
          f"{on_file['top1']:.4f}, LCE {on_lce['top1']:.4f}; sizes {sizes}; parity {report.parity.verdict}")
    assert report.binary_convs.int8_convs == 4 and custom_ops(TFLiteGraph((tmp_path / "int8.tflite").read_bytes())) == []
    # Measured: 0.9985 with LCE; with the fake-quant Keras model both files agree alike (0.963,
    # 0.9625): Keras' float rounding flips a few signs that both int8 files flip the other way.
    assert agreement >= 0.99 and abs(with_keras - lce_with_keras) <= 0.01
    assert on_file["num_examples"] == 2000 and on_file["top1"] > 0.3
    assert abs(on_file["top1"] - on_lce["top1"]) <= 0.005
