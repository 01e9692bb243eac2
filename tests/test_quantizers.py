"""The quantizers equal their formulas, and Larq's built-ins where those mean the same."""
import larq as lq
import numpy as np
import pytest
import tensorflow as tf

from bireal_tf import quantizers as q

GRID = np.linspace(-2.0, 2.0, 81).astype(np.float32)  # includes 0, +-1 exactly


def value_and_grad(fn, x, upstream=None):
    x = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = fn(x)
        loss = tf.reduce_sum(y * (1.0 if upstream is None else upstream))
    return y.numpy(), tape.gradient(loss, x).numpy()


def test_grid_contains_zero_and_boundaries():
    assert 0.0 in GRID and 1.0 in GRID and -1.0 in GRID


def test_approx_sign_forward_and_gradient_equal_formula():
    y, g = value_and_grad(q.ApproxSign(), GRID)
    np.testing.assert_array_equal(y, np.where(GRID >= 0, 1.0, -1.0))
    np.testing.assert_allclose(g, np.where(np.abs(GRID) <= 1, 2 - 2 * np.abs(GRID), 0.0), atol=1e-6)
    assert y[GRID == 0.0][0] == 1.0  # sign(0) = +1


def test_approx_sign_equals_larq():
    ours = value_and_grad(q.ApproxSign(), GRID)
    larqs = value_and_grad(lq.quantizers.ApproxSign(), GRID)
    np.testing.assert_array_equal(ours[0], larqs[0])
    np.testing.assert_allclose(ours[1], larqs[1], atol=1e-6)


def _kernel():
    """A 3x3x4x3 kernel whose output channels have very different magnitudes."""
    rng = np.random.default_rng(0)
    w = rng.uniform(-1.5, 1.5, size=(3, 3, 4, 3)).astype(np.float32)
    w[..., 1] *= 0.1
    w[..., 2] *= 0.5
    w[0, 0, 0, 0] = 0.0  # sign(0) = +1 for weights too
    return w


def test_magnitude_aware_sign_forward_is_per_output_channel():
    w = _kernel()
    y, _ = value_and_grad(q.MagnitudeAwareSign(), w)
    scale = np.abs(w).mean(axis=(0, 1, 2))
    assert len(set(np.round(scale, 4))) == 3  # three distinct channel scales
    np.testing.assert_allclose(y, scale * np.where(w >= 0, 1.0, -1.0), rtol=1e-6)
    assert y[0, 0, 0, 0] == pytest.approx(scale[0])


@pytest.mark.parametrize("scale_gradient", [True, False])
def test_magnitude_aware_sign_gradient(scale_gradient):
    w = _kernel()
    upstream = np.random.default_rng(1).normal(size=w.shape).astype(np.float32)
    _, g = value_and_grad(q.MagnitudeAwareSign(scale_gradient=scale_gradient), w, upstream)
    scale = np.abs(w).mean(axis=(0, 1, 2)) if scale_gradient else 1.0
    expected = np.where(np.abs(w) <= 1.0, upstream * scale, 0.0)
    np.testing.assert_allclose(g, expected, rtol=1e-5, atol=1e-7)
    assert (np.abs(w) > 1).any() and (g[np.abs(w) > 1] == 0).all()


def test_magnitude_aware_sign_equals_larq():
    w = _kernel()
    upstream = np.random.default_rng(2).normal(size=w.shape).astype(np.float32)
    ours = value_and_grad(q.MagnitudeAwareSign(), w, upstream)
    larqs = value_and_grad(lq.quantizers.MagnitudeAwareSign(), w, upstream)
    np.testing.assert_allclose(ours[0], larqs[0], rtol=1e-6)
    np.testing.assert_allclose(ours[1], larqs[1], rtol=1e-6)


def test_leaky_clip_and_clip():
    y, g = value_and_grad(q.leaky_clip, GRID)
    expected = np.where(GRID > 1, 0.1 * GRID + 0.9, np.where(GRID < -1, 0.1 * GRID - 0.9, GRID))
    np.testing.assert_allclose(y, expected, atol=1e-6)
    inside = np.abs(GRID) < 1
    np.testing.assert_allclose(g[inside], 1.0)
    np.testing.assert_allclose(g[np.abs(GRID) > 1], 0.1, rtol=1e-6)

    y, g = value_and_grad(q.hard_clip, GRID)
    np.testing.assert_allclose(y, np.clip(GRID, -1, 1))
    np.testing.assert_allclose(g[inside], 1.0)
    np.testing.assert_allclose(g[np.abs(GRID) > 1], 0.0)


@pytest.mark.parametrize(
    "input_quantizer, kernel_quantizer",
    [
        ("bireal_approx_sign", "bireal_magnitude_aware_sign"),
        (q.ApproxSign(), q.MagnitudeAwareSign(scale_gradient=False)),
    ],
)
def test_quantizers_usable_in_larq_layers_and_serializable(input_quantizer, kernel_quantizer):
    layer = lq.layers.QuantConv2D(
        3, 3, input_quantizer=input_quantizer, kernel_quantizer=kernel_quantizer, use_bias=False
    )
    assert isinstance(layer.input_quantizer, q.ApproxSign)
    assert isinstance(layer.kernel_quantizer, q.MagnitudeAwareSign)
    x = np.random.default_rng(3).normal(size=(2, 8, 8, 4)).astype(np.float32)
    y = layer(x)

    config = tf.keras.layers.serialize(layer)
    assert config["config"]["input_quantizer"]["registered_name"] == "bireal_tf>ApproxSign"
    clone = tf.keras.layers.deserialize(config)  # no custom_objects: registered names
    assert isinstance(clone.kernel_quantizer, q.MagnitudeAwareSign)
    assert clone.kernel_quantizer.scale_gradient == layer.kernel_quantizer.scale_gradient
    clone.build(x.shape)
    clone.set_weights(layer.get_weights())
    np.testing.assert_array_equal(clone(x).numpy(), y.numpy())
    # Binary inputs times binary, per-channel scaled weights: every output is a multiple
    # of its channel scale.
    scale = np.abs(layer.kernel.numpy()).mean(axis=(0, 1, 2))
    ratio = y.numpy() / scale
    np.testing.assert_allclose(ratio, np.round(ratio), atol=1e-3)


@pytest.mark.parametrize("layer, fn", [(q.LeakyClip(), q.leaky_clip), (q.HardClip(), q.hard_clip)])
def test_activation_layers_serialize(layer, fn):
    clone = tf.keras.layers.deserialize(tf.keras.layers.serialize(layer))
    assert type(clone) is type(layer)
    np.testing.assert_allclose(clone(GRID).numpy(), fn(GRID).numpy())


def test_import_leaves_larqs_own_quantizer_names_to_larq(tmp_path):
    import bireal_tf

    registered = tf.keras.utils.get_registered_object
    assert registered("ApproxSign") is lq.quantizers.ApproxSign
    assert registered("MagnitudeAwareSign") is lq.quantizers.MagnitudeAwareSign
    assert lq.quantizers.get("MagnitudeAwareSign").__class__ is lq.quantizers.MagnitudeAwareSign
    # Larq's documented form works in a model built after `import bireal_tf`, and its
    # .h5 file loads back with Larq's classes.
    x = tf.keras.Input((8, 8, 3))
    y = lq.layers.QuantConv2D(4, 3, input_quantizer="ApproxSign", use_bias=False,
                              kernel_quantizer=lq.quantizers.MagnitudeAwareSign(clip_value=None),
                              kernel_constraint="weight_clip")(x)
    model = tf.keras.Model(x, y)
    model.save(tmp_path / "larq.h5")
    loaded = tf.keras.models.load_model(tmp_path / "larq.h5")
    conv = loaded.layers[-1]
    assert type(conv.input_quantizer) is lq.quantizers.ApproxSign
    assert type(conv.kernel_quantizer) is lq.quantizers.MagnitudeAwareSign
    assert conv.kernel_quantizer.clip_value is None
    # Our scope lends the bare names to ours and gives them back.
    with bireal_tf.custom_objects():
        assert registered("MagnitudeAwareSign") is q.MagnitudeAwareSign
    assert registered("MagnitudeAwareSign") is lq.quantizers.MagnitudeAwareSign
