"""Bi-Real Net 18/34/50: structure, parameter counts, padding conventions, saving, LCE."""
import subprocess
import sys

import larq as lq
import larq_compute_engine as lce
import larq_zoo
import numpy as np
import pytest
import tensorflow as tf

import bireal_tf

from bireal_tf import quantizers
from bireal_tf.models import (
    BiRealNet18,
    BiRealNet50,
    ConstantPadding2D,
    Subsample2D,
    binary_conv_layers,
    bireal_net,
)
from bireal_tf.export.convert import convert
from tests.lce_utils import op_histogram

BINARY_CONVS = {18: 16, 34: 32, 50: 47}
SMALL = (32, 32, 3)


# --- parameter counts, worked out from the reference structure ------------------------


def bn_params(c):
    return 4 * c  # gamma, beta, moving mean, moving variance


def reference_params_basic(blocks, num_classes):
    """Parameters of the authors' 18/34-layer Bi-Real Net, from its structure."""
    total = 7 * 7 * 3 * 64 + bn_params(64)
    cin = 64
    for stage, (n, width) in enumerate(zip(blocks, (64, 128, 256, 512))):
        for b in range(n):
            total += 3 * 3 * cin * width + bn_params(width)  # binary conv + bn1
            if (stage > 0 and b == 0) or cin != width:
                total += cin * width + bn_params(width)  # downsample: 1x1 conv + BN
            cin = width
    return total + 512 * num_classes + num_classes


def reference_params_50(num_classes):
    """Parameters of the authors' 50-layer Bi-Real Net, from its structure.

    The reference also creates a `down_conv1x1` (16 -> 64) in its first block that
    its forward never uses; it has no counterpart here and is not counted.
    """
    total = 7 * 7 * 3 * 64 + bn_params(64)
    cin, prev_inner, first = 64, 64, True
    for n, width in zip((3, 4, 6, 3), (256, 512, 1024, 2048)):
        inner = width // 4
        for b in range(n):
            total += cin * inner + bn_params(inner)  # conv1 (real in the first block) + bn1
            if b == 0 and not first:
                total += prev_inner * inner  # down_conv1x1 on the inner stream, no BN
            total += 3 * 3 * inner * inner + bn_params(inner)  # conv2 + bn2
            total += inner * width + bn_params(width)  # conv3 + bn3
            if b == 0:
                total += cin * width + bn_params(width)  # downsample 1x1 + BN
            cin, prev_inner, first = width, inner, False
    return total + 2048 * num_classes + num_classes


def test_reference_counts_match_larq_zoo_for_18_layers():
    assert reference_params_basic((4, 4, 4, 4), 1000) == 11_699_112


@pytest.mark.parametrize(
    "depth, expected",
    [(18, 11_699_112), (34, 21_814_696), (50, 25_782_184)],
)
def test_parameter_counts(depth, expected):
    model = bireal_net(depth)
    assert model.count_params() == expected
    if depth == 50:
        assert expected == reference_params_50(1000)
    else:
        blocks = (4, 4, 4, 4) if depth == 18 else (6, 8, 12, 6)
        assert expected == reference_params_basic(blocks, 1000)
    if depth == 18:
        assert larq_zoo.literature.BiRealNet(weights=None).count_params() == expected


# --- structure ------------------------------------------------------------------------


@pytest.mark.parametrize("depth", [18, pytest.param(34, marks=pytest.mark.slow),
                                   pytest.param(50, marks=pytest.mark.slow)])
def test_output_shapes_and_binary_convs(depth):
    model = bireal_net(depth, input_shape=(64, 48, 3), num_classes=7)
    assert model.output_shape == (None, 7)
    x = np.random.default_rng(0).normal(size=(2, 64, 48, 3)).astype(np.float32)
    probs = model(x).numpy()
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)

    convs = binary_conv_layers(model)
    assert len(convs) == BINARY_CONVS[depth]
    for conv in convs:
        assert isinstance(conv.input_quantizer, quantizers.ApproxSign)
        assert isinstance(conv.kernel_quantizer, quantizers.MagnitudeAwareSign)
    assert len({id(c.kernel_quantizer) for c in convs}) == len(convs)

    features = bireal_net(depth, input_shape=(64, 48, 3), include_top=False)
    width = 2048 if depth == 50 else 512
    assert features.output_shape == (None, 2, 2, width)
    pooled = bireal_net(depth, input_shape=SMALL, include_top=False, pooling="avg")
    assert pooled.output_shape == (None, width)


def test_layer_names_follow_the_reference():
    names = {layer.name for layer in BiRealNet18(input_shape=SMALL).layers}
    for name in ("conv1", "bn1", "maxpool", "layer1_0_binary_conv", "layer1_0_bn1",
                 "layer2_0_downsample_1", "layer4_3_bn1", "fc"):
        assert name in names
    names50 = {layer.name for layer in BiRealNet50(input_shape=SMALL).layers}
    for name in ("layers_0_conv1", "layers_0_conv3", "layers_3_down_conv1x1",
                 "layers_3_downsample_1", "layers_15_bn3", "fc"):
        assert name in names50
    assert "layers_0_down_conv1x1" not in names50  # unused in the reference's forward


@pytest.mark.parametrize("depth", [18, pytest.param(50, marks=pytest.mark.slow)])  # 50: ~10 s each
@pytest.mark.parametrize("activation", ["relu", "leaky_clip", "clip"])
def test_real_variants_have_no_quantizer_and_share_weights(depth, activation):
    binary = bireal_net(depth, input_shape=SMALL, num_classes=5)
    real = bireal_net(depth, input_shape=SMALL, num_classes=5, activation=activation)
    for layer in real.layers:
        assert getattr(layer, "input_quantizer", None) is None
        assert getattr(layer, "kernel_quantizer", None) is None
    assert not binary_conv_layers(real)
    assert [w.name for w in real.weights] == [w.name for w in binary.weights]
    real.set_weights(binary.get_weights())  # weights of one variant load into another
    x = np.random.default_rng(1).normal(size=(2, *SMALL)).astype(np.float32)
    assert not np.allclose(real(x), binary(x))  # and they compute different things


# --- one to one with larq-zoo ---------------------------------------------------------


def _randomize_batchnorm(model, seed):
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, tf.keras.layers.BatchNormalization):
            g, b, m, v = layer.get_weights()
            layer.set_weights([
                rng.uniform(0.5, 1.5, g.shape), rng.normal(0, 0.5, b.shape),
                rng.normal(0, 0.5, m.shape), rng.uniform(0.5, 2.0, v.shape),
            ])


def test_same_padding_net_equals_larq_zoo_birealnet():
    zoo = larq_zoo.literature.BiRealNet(weights=None, input_shape=(64, 64, 3), num_classes=10)
    _randomize_batchnorm(zoo, seed=0)
    ours = BiRealNet18(input_shape=(64, 64, 3), num_classes=10, bn_epsilon=1e-3,
                       bn_momentum=0.8, kernel_constraint="weight_clip")
    zoo_layers = [l for l in zoo.layers if l.weights]
    our_layers = [l for l in ours.layers if l.weights]
    assert [type(l) for l in zoo_layers] == [type(l) for l in our_layers]
    for theirs, mine in zip(zoo_layers, our_layers):  # layer for layer
        mine.set_weights(theirs.get_weights())
    x = np.random.default_rng(2).normal(size=(4, 64, 64, 3)).astype(np.float32)
    np.testing.assert_allclose(ours(x, training=False), zoo(x, training=False), atol=1e-6)


# --- symmetric padding against PyTorch's arithmetic, in NumPy -------------------------


def np_conv2d(x, w, stride, pad, pad_value=0.0):
    """PyTorch's Conv2d(padding=pad, stride=stride) on NHWC / HWIO arrays."""
    x = np.pad(x, [(0, 0), (pad, pad), (pad, pad), (0, 0)], constant_values=pad_value)
    kh, kw = w.shape[:2]
    oh = (x.shape[1] - kh) // stride + 1
    ow = (x.shape[2] - kw) // stride + 1
    out = np.zeros((x.shape[0], oh, ow, w.shape[3]), np.float64)
    for i in range(oh):
        for j in range(ow):
            patch = x[:, i * stride:i * stride + kh, j * stride:j * stride + kw, :]
            out[:, i, j, :] = np.tensordot(patch, w, axes=([1, 2, 3], [0, 1, 2]))
    return out


def np_maxpool(x, size, stride, pad):
    """PyTorch's MaxPool2d: padding never wins the max."""
    x = np.pad(x, [(0, 0), (pad, pad), (pad, pad), (0, 0)], constant_values=-np.inf)
    oh = (x.shape[1] - size) // stride + 1
    ow = (x.shape[2] - size) // stride + 1
    out = np.empty((x.shape[0], oh, ow, x.shape[3]))
    for i in range(oh):
        for j in range(ow):
            out[:, i, j] = x[:, i * stride:i * stride + size, j * stride:j * stride + size].max((1, 2))
    return out


def np_sign(x):
    return np.where(x >= 0, 1.0, -1.0)


def _apply(model, names, x):
    """Run the named layers of `model` one after another on x."""
    for name in names:
        x = model.get_layer(name)(x)
    return np.asarray(x, np.float64)


@pytest.mark.parametrize("size", [32, pytest.param(34, marks=pytest.mark.slow)])  # odd sizes: slow suite
def test_symmetric_stride2_layers_equal_pytorch_arithmetic(size):
    rng = np.random.default_rng(3)
    tf.keras.utils.set_random_seed(3)
    # logits: a saturated softmax can hide the difference the last check looks for
    sym = BiRealNet18(input_shape=(size, size, 3), num_classes=3, padding="symmetric",
                      classifier_activation=None)
    same = BiRealNet18(input_shape=(size, size, 3), num_classes=3, padding="same",
                       classifier_activation=None)
    same.set_weights(sym.get_weights())

    x = rng.normal(size=(2, size, size, 3)).astype(np.float32)
    w = sym.get_layer("conv1").kernel.numpy()
    expected = np_conv2d(x, w, stride=2, pad=3)
    np.testing.assert_allclose(_apply(sym, ["conv1_pad", "conv1"], x), expected, atol=1e-4)
    assert not np.allclose(_apply(same, ["conv1"], x), expected, atol=1e-2)

    h = rng.normal(size=(2, 16, 16, 64)).astype(np.float32)  # even: the conventions differ
    expected = np_maxpool(h, 3, 2, 1)
    np.testing.assert_array_equal(_apply(sym, ["maxpool_pad", "maxpool"], h), expected)
    assert not np.allclose(_apply(same, ["maxpool"], h), expected)
    h = -np.abs(h)  # all negative: zero padding would win the max, -inf must not
    np.testing.assert_array_equal(_apply(sym, ["maxpool_pad", "maxpool"], h), np_maxpool(h, 3, 2, 1))

    for name, cin in (("layer2_0", 64), ("layer3_0", 128), ("layer4_0", 256)):
        a = rng.normal(size=(2, 8, 8, cin)).astype(np.float32)
        a[0, 0, 0, :4] = 0.0  # sign(0) = +1
        kernel = sym.get_layer(f"{name}_binary_conv").kernel.numpy()
        wb = np.abs(kernel).mean(axis=(0, 1, 2)) * np_sign(kernel)
        expected = np_conv2d(np_sign(a), wb, stride=2, pad=1, pad_value=0.0)
        got = _apply(sym, [f"{name}_binary_conv", f"{name}_binary_conv_subsample"], a)
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-4)
        assert not np.allclose(_apply(same, [f"{name}_binary_conv"], a),
                               expected, atol=1e-2)

    inputs = rng.normal(size=(2, size, size, 3)).astype(np.float32)
    _randomize_batchnorm(sym, 4)
    same.set_weights(sym.get_weights())
    a, b = sym(inputs).numpy(), same(inputs).numpy()
    assert np.abs(a - b).max() > 1e-3  # the option really acts on the whole network


def test_symmetric_50_layer_strided_conv_equals_pytorch_arithmetic():
    rng = np.random.default_rng(5)
    sym = BiRealNet50(input_shape=(64, 64, 3), num_classes=3, padding="symmetric")
    a = rng.normal(size=(1, 8, 8, 128)).astype(np.float32)
    kernel = sym.get_layer("layers_3_conv2").kernel.numpy()
    wb = np.abs(kernel).mean(axis=(0, 1, 2)) * np_sign(kernel)
    expected = np_conv2d(np_sign(a), wb, stride=2, pad=1)
    got = _apply(sym, ["layers_3_conv2", "layers_3_conv2_subsample"], a)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-4)


def test_padding_layers_serialize():
    for layer in (ConstantPadding2D(2, value=None), Subsample2D(2)):
        clone = tf.keras.layers.deserialize(tf.keras.layers.serialize(layer))
        x = np.arange(2 * 5 * 5 * 1, dtype=np.float32).reshape(2, 5, 5, 1)
        np.testing.assert_array_equal(clone(x), layer(x))


# --- saving ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fmt, depth, padding",
    [("keras", 18, "symmetric"), ("h5", 18, "symmetric"),
     # SavedModel tracing (~1 min) and the 50-layer net: the slow suite
     pytest.param("savedmodel", 18, "symmetric", marks=pytest.mark.slow),
     pytest.param("keras", 50, "same", marks=pytest.mark.slow),
     pytest.param("h5", 50, "same", marks=pytest.mark.slow)],
)
def test_save_and_load(tmp_path, fmt, depth, padding):
    model = bireal_net(depth, input_shape=SMALL, num_classes=4, padding=padding,
                       kernel_quantizer=quantizers.MagnitudeAwareSign(scale_gradient=False))
    _randomize_batchnorm(model, 6)
    x = np.random.default_rng(7).normal(size=(3, *SMALL)).astype(np.float32)
    expected = model(x).numpy()
    path = str(tmp_path / {"keras": "m.keras", "h5": "m.h5", "savedmodel": "m_savedmodel"}[fmt])
    model.save(path)
    if fmt == "h5":  # legacy configs name classes bare: Larq holds those names outside the scope
        with bireal_tf.custom_objects():
            loaded = tf.keras.models.load_model(path)
    else:  # registered names: no scope needed
        loaded = tf.keras.models.load_model(path)
    np.testing.assert_array_equal(loaded(x).numpy(), expected)
    convs = binary_conv_layers(loaded)
    assert len(convs) == BINARY_CONVS[depth]
    assert all(isinstance(c.kernel_quantizer, quantizers.MagnitudeAwareSign) for c in convs)
    assert not any(c.kernel_quantizer.scale_gradient for c in convs)


# --- Larq Compute Engine guard --------------------------------------------------------


@pytest.mark.parametrize(
    "depth, padding",
    [pytest.param(18, "same", marks=pytest.mark.slow),  # test_export's R18 proves it fast
     # symmetric padding through LCE is proved fast at 64/65 px by test_react.py
     pytest.param(18, "symmetric", marks=pytest.mark.slow),
     pytest.param(34, "same", marks=pytest.mark.slow),
     pytest.param(50, "same", marks=pytest.mark.slow),
     pytest.param(50, "symmetric", marks=pytest.mark.slow)],
)
def test_lce_makes_every_binary_conv_binary(depth, padding):
    model = bireal_net(depth, input_shape=(64, 64, 3), num_classes=10, padding=padding)
    ops = op_histogram(convert(model)[0])  # LCE's converter (as lce.convert_keras_model, faster)
    assert ops["LceBconv2d"] == BINARY_CONVS[depth]
    assert ops["LceDequantize"] == 0
    if padding == "symmetric":
        assert ops["STRIDED_SLICE"] == 3


@pytest.mark.slow  # an R18 LCE conversion: ~35 s
def test_lce_guard_can_fail():
    """A quantizer LCE cannot match must leave float convs: the guard above can fail."""
    model = BiRealNet18(input_shape=(64, 64, 3), num_classes=10,
                        kernel_quantizer=lambda w: lq.quantizers.ste_sign(w) * 0.5 + 0.01)
    ops = op_histogram(lce.convert_keras_model(model))
    assert ops["LceBconv2d"] < 16


# --- learning and bad input -----------------------------------------------------------


@pytest.mark.slow  # 16 steps and two evaluations: ~30 s (the trained_run fixture and the slow runs train too)
def test_a_few_fit_steps_lower_the_loss():
    from bireal_tf.data import load_dataset

    spec = load_dataset("fashion_mnist_embedded", "train", batch_size=32, limit=64, shuffle=False)
    images, labels = next(iter(spec.dataset.unbatch().batch(64)))
    tf.keras.utils.set_random_seed(0)
    model = BiRealNet18(input_shape=tuple(images.shape[1:]), num_classes=10)
    model.compile(tf.keras.optimizers.Adam(1e-3), "sparse_categorical_crossentropy")
    before = model.evaluate(images, labels, verbose=0)
    model.fit(images, labels, batch_size=32, epochs=8, verbose=0)
    after = model.evaluate(images, labels, verbose=0)
    assert after < 0.8 * before


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(activation="tanh"), "activation must be one of"),
        (dict(padding="reflect"), "padding must be one of"),
        (dict(num_classes=0), "num_classes must be an integer >= 1"),
        (dict(input_shape=(16, 64, 3)), "at least 32"),
        (dict(weights="imagenet"), "'larq_zoo' \\(Bi-Real-18 only\\) or the path"),
    ],
)
def test_bad_arguments_raise_value_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        BiRealNet18(**kwargs)


def test_larq_zoo_weights_exist_for_bireal18_only():
    with pytest.raises(ValueError, match="18-layer net only"):
        bireal_net(34, weights="larq_zoo")


def test_builders_show_their_arguments():
    import inspect

    for builder in (BiRealNet18, bireal_net.__globals__["BiRealNet34"], bireal_net.__globals__["BiRealNet50"]):
        params = inspect.signature(builder).parameters
        assert list(params)[:7] == ["input_shape", "input_tensor", "num_classes", "include_top",
                                    "weights", "pooling", "classifier_activation"]
        assert {"activation", "padding", "pad_values", "bn_epsilon"} <= set(params)
    with pytest.raises(TypeError, match="unexpected keyword argument 'paddding'"):
        BiRealNet18(paddding="same")


def test_bad_depth_names_the_allowed_values():
    with pytest.raises(ValueError, match=r"\(18, 34, 50\)"):
        bireal_net(101)


def _run_python(code, **env):
    import os

    full_env = {k: v for k, v in os.environ.items()
                if k not in ("TF_USE_LEGACY_KERAS", "TF_ENABLE_ONEDNN_OPTS")}
    full_env.update(env)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=full_env, timeout=300)


def test_import_binds_keras_2_by_itself_and_turns_onednn_on():
    """Also oneDNN's kernels, which TF 2.16 leaves off on AVX2-only CPUs (4-5x slower
    training steps here); a value the user set wins."""
    probe = ("import bireal_tf, tensorflow as tf\n"
             "from tensorflow.python.util import _pywrap_util_port as port\n"
             "print(tf.keras.__file__, port.IsMklEnabled())")
    out = _run_python(probe)
    assert out.returncode == 0, out.stderr
    assert "tf_keras" in out.stdout and out.stdout.split()[-1] == "True", out.stdout
    out = _run_python(probe, TF_ENABLE_ONEDNN_OPTS="0")
    assert out.returncode == 0 and out.stdout.split()[-1] == "False", out.stdout + out.stderr[-2000:]


@pytest.mark.parametrize(
    "code, env",
    [
        ("import bireal_tf", {"TF_USE_LEGACY_KERAS": "0"}),
        # Keras 3 itself loaded first: ~15 s of start-up in a fresh interpreter; the same
        # refusal is proved fast by the case above.
        pytest.param("import tensorflow as tf; tf.keras.layers.Dense; import bireal_tf", {},
                     marks=pytest.mark.slow),
    ],
)
def test_keras_3_is_refused_with_instructions(code, env):
    out = _run_python(code, **env)
    assert out.returncode != 0
    assert "ImportError" in out.stderr and "TF_USE_LEGACY_KERAS=1" in out.stderr


def test_keras_internals_are_left_unconverted_and_our_layers_converted():
    """AutoGraph skips tf_keras (as TF skips the package named keras), but still converts
    the `call` of our layers and Larq's, which Keras hands to it (bireal_tf/_keras_setup.py)."""
    import tf_keras
    from tensorflow.python.autograph.impl import conversion

    from bireal_tf.models import LearnableBias

    assert conversion.is_allowlisted(tf_keras.layers.BatchNormalization.call)
    assert conversion.is_allowlisted(tf_keras.Model.train_step)
    assert not conversion.is_allowlisted(LearnableBias.call)
    assert not conversion.is_allowlisted(quantizers.ApproxSign.call)
    out = _run_python("import bireal_tf, tf_keras\n"
                      "from tensorflow.python.autograph.impl import conversion\n"
                      "print(conversion.is_allowlisted(tf_keras.layers.Dense.call))",
                      TF_USE_LEGACY_KERAS="1", BIREAL_TF_CONVERT_KERAS="1")
    assert out.returncode == 0 and out.stdout.split()[-1] == "False", out.stderr[-2000:]
