"""Bi-Real Net's quantizers and the real-valued activations of its finetune pipeline.

Every quantizer is a Larq quantizer: pass it as `input_quantizer=` or
`kernel_quantizer=` of `lq.layers.QuantConv2D`, by instance, by class, or by
its short alias (`"bireal_approx_sign"`, `"bireal_magnitude_aware_sign"`).

The forward passes use Larq's `sign(sign(x) + 0.1)`. That form gives
sign(0) = +1 and is the one Larq Compute Engine (LCE) pattern-matches into a
binary convolution; any other form silently leaves the conv in float.
"""

import contextlib

import larq as lq
import tensorflow as tf

__all__ = [
    "ApproxSign",
    "MagnitudeAwareSign",
    "approx_sign",
    "magnitude_aware_sign",
    "leaky_clip",
    "hard_clip",
    "LeakyClip",
    "HardClip",
    "REAL_ACTIVATIONS",
    "custom_objects",
]


_CUSTOM_OBJECTS = {}


def _register(alias):
    """Register with Keras under `bireal_tf>Name` and the short `alias`, never a bare name.

    Larq registers its own `ApproxSign` and `MagnitudeAwareSign` under the bare
    names; those stay Larq's. Files whose configs name our classes bare (Keras'
    legacy .h5 format) load through `custom_objects()`.
    """

    def wrap(obj):
        obj = tf.keras.utils.register_keras_serializable(package="bireal_tf")(obj)
        tf.keras.utils.get_custom_objects()[alias] = obj
        _CUSTOM_OBJECTS[obj.__name__] = obj
        return obj

    return wrap


@contextlib.contextmanager
def custom_objects():
    """A scope in which the bare names `ApproxSign`, `MagnitudeAwareSign`, ... mean ours.

        with bireal_tf.custom_objects():
            model = tf.keras.models.load_model("model.h5")

    Keras' legacy .h5 configs name classes bare, and Keras merges its global
    registry (where Larq's classes hold those names) over any scope, so the
    scope claims the bare names in the global registry and gives them back to
    Larq on exit. The project's loaders use it; outside it, the names resolve
    to Larq's classes as usual.
    """
    registry = tf.keras.utils.get_custom_objects()
    saved = {name: registry[name] for name in _CUSTOM_OBJECTS if name in registry}
    registry.update(_CUSTOM_OBJECTS)
    try:
        with tf.keras.utils.custom_object_scope(dict(_CUSTOM_OBJECTS)):
            yield
    finally:
        for name in _CUSTOM_OBJECTS:
            registry.pop(name, None)
        registry.update(saved)


def approx_sign(x):
    r"""Larq's ApproxSign: forward sign, backward the derivative of a piecewise quadratic.

    Forward:  q(x) = +1 if x >= 0 else -1       (Larq's `sign(sign(x) + 0.1)`)
    Backward: dq/dx = 2 - 2|x|  for |x| <= 1, else 0

    The backward is the derivative of F(x) = -1 (x < -1), 2x + x^2 (-1 <= x < 0),
    2x - x^2 (0 <= x < 1), +1 (x >= 1): a tighter fit of sign than the clipped
    identity of the straight-through estimator.
    """
    return lq.quantizers.approx_sign(x)


def _channel_scale(w):
    """mean(|W|) over every axis but the last (the output channel), gradient stopped."""
    return tf.stop_gradient(tf.reduce_mean(tf.abs(w), axis=list(range(w.shape.rank - 1))))


def _scale_forward_only(scale, x):
    """scale * x forward; the gradient passes to x unscaled."""

    @tf.custom_gradient
    def _scale(x):
        return scale * x, lambda dy: dy

    return _scale(x)


def magnitude_aware_sign(w, scale_gradient=True, clip_value=1.0):
    r"""Magnitude-aware binary weights, per output channel c.

    Forward:  Wb = a_c * sign(W),  a_c = mean(|W[..., c]|)  (a_c is a constant to autodiff)
    Backward: dL/dW = dL/dWb * a_c * 1{|W| <= clip}        (scale_gradient=True, the paper;
                                                            Larq's MagnitudeAwareSign)
              dL/dW = dL/dWb * 1{|W| <= clip}              (scale_gradient=False, the
                                                            authors' 2019 PyTorch code)

    The sign and its clipped straight-through gradient are Larq's `ste_sign`;
    `clip_value=None` does not clip.
    """
    binary = lq.quantizers.ste_sign(w, clip_value=clip_value)
    if scale_gradient:
        return _channel_scale(w) * binary
    return _scale_forward_only(_channel_scale(w), binary)


@_register("bireal_approx_sign")
class ApproxSign(lq.quantizers.ApproxSign):
    r"""Binary activations with the ApproxSign gradient (Bi-Real Net, Sec. 3.2): Larq's.

    Forward `sign(x)` with sign(0) = +1; backward `2 - 2|x|` on |x| <= 1, else 0
    (see `approx_sign`). Larq's class and arithmetic, registered under the project's
    names, so files saved with it keep loading as the project's class.
    """


@_register("bireal_magnitude_aware_sign")
class MagnitudeAwareSign(lq.quantizers.MagnitudeAwareSign):
    r"""Binary weights scaled by their mean magnitude per output channel (Sec. 3.3).

    Forward `mean(|W|) * sign(W)`, the mean over kernel height, width and input
    channels. Backward straight-through, zero where |W| > `clip_value`
    (see `magnitude_aware_sign`):

    - `scale_gradient=True` (default, the paper): `dL/dW = dL/dWb * mean(|W|)`;
      Larq's `MagnitudeAwareSign`, which this class is.
    - `scale_gradient=False`: `dL/dW = dL/dWb`, as the authors' 2019 PyTorch code.
      With Adam the two are nearly the same, since Adam normalizes the step size.
    """

    def __init__(self, scale_gradient=True, clip_value=1.0, **kwargs):
        self.scale_gradient = bool(scale_gradient)
        clip_value = None if clip_value is None else float(clip_value)
        super().__init__(clip_value=clip_value, **kwargs)

    def call(self, inputs):
        if self.scale_gradient:
            return super().call(inputs)
        outputs = magnitude_aware_sign(inputs, scale_gradient=False, clip_value=self.clip_value)
        # The call of Larq's base class, past Larq's MagnitudeAwareSign: it adds Larq's
        # `flip_ratio` metric when asked for.
        return super(lq.quantizers.MagnitudeAwareSign, self).call(outputs)

    def get_config(self):
        return {**super().get_config(), "scale_gradient": self.scale_gradient}


def leaky_clip(x):
    r"""Leaky clip: identity on [-1, 1], slope 0.1 outside, continuous.

    f(x) = x (|x| <= 1);  0.1 x + 0.9 (x > 1);  0.1 x - 0.9 (x < -1).
    The second real-valued stage of the paper's initialization.

    Larq's `leaky_tanh(x, alpha=0.1)` gives the same values bit for bit but not the
    same gradient: at |x| = 1 it passes 1.1 g (its clip and its leak both pass there)
    where this one passes g, and inside it passes g exactly where this one's
    0.1 g + (g - 0.1 g) can be an ulp off. Training with it would not reproduce
    earlier runs, so this definition stays.
    """
    return tf.clip_by_value(x, -1.0, 1.0) + 0.1 * (x - tf.clip_by_value(x, -1.0, 1.0))


def hard_clip(x):
    r"""clip(-1, x, 1): identity on [-1, 1], constant outside (gradient 0 there).

    Larq's `hard_tanh`. The third real-valued stage: the real network closest to
    sign before binarizing.
    """
    return lq.activations.hard_tanh(x)


@_register("leaky_clip")
class LeakyClip(tf.keras.layers.Layer):
    """Layer form of `leaky_clip` (a layer, not a function, so .h5 files load it)."""

    def call(self, inputs):
        return leaky_clip(inputs)


@_register("hard_clip")
class HardClip(tf.keras.layers.Layer):
    """Layer form of `hard_clip`, clip(-1, x, 1)."""

    def call(self, inputs):
        return hard_clip(inputs)


# The real-valued activation layers a network accepts for its real-valued variants.
REAL_ACTIVATIONS = {"relu": tf.keras.layers.ReLU, "leaky_clip": LeakyClip, "clip": HardClip}
