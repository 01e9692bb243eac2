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


@tf.custom_gradient
def approx_sign(x):
    r"""ApproxSign: forward sign, backward the derivative of a piecewise quadratic.

    Forward:  q(x) = +1 if x >= 0 else -1
    Backward: dq/dx = 2 - 2|x|  for |x| <= 1, else 0

    The backward is the derivative of F(x) = -1 (x < -1), 2x + x^2 (-1 <= x < 0),
    2x - x^2 (0 <= x < 1), +1 (x >= 1): a tighter fit of sign than the clipped
    identity of the straight-through estimator.
    """

    def grad(dy):
        # relu(2 - 2|x|) is 2 - 2|x| on |x| <= 1 and 0 elsewhere: the same values as a
        # masked where, in fewer ops (no measurable difference in step time, BENCHMARKS.md).
        return dy * tf.nn.relu(2.0 - 2.0 * tf.abs(x))

    return lq.math.sign(x), grad


def _channel_scale(w):
    """mean(|W|) over every axis but the last (the output channel), gradient stopped."""
    return tf.stop_gradient(tf.reduce_mean(tf.abs(w), axis=list(range(w.shape.rank - 1))))


def magnitude_aware_sign(w, scale_gradient=True, clip_value=1.0):
    r"""Magnitude-aware binary weights, per output channel c.

    Forward:  Wb = a_c * sign(W),  a_c = mean(|W[..., c]|)  (a_c is a constant to autodiff)
    Backward: dL/dW = dL/dWb * a_c * 1{|W| <= clip}        (scale_gradient=True, the paper)
              dL/dW = dL/dWb * 1{|W| <= clip}              (scale_gradient=False, the
                                                            authors' 2019 PyTorch code)
    """
    scale = _channel_scale(w)

    @tf.custom_gradient
    def _binarize(w):
        def grad(dy):
            if scale_gradient:
                dy = dy * scale
            return tf.where(tf.abs(w) <= clip_value, dy, tf.zeros_like(dy))

        return scale * lq.math.sign(w), grad

    return _binarize(w)


# Larq's private base class gives the quantizers Larq's `flip_ratio` metric; it is
# stable within the pinned larq 0.14.
_LarqQuantizer = lq.quantizers._BaseQuantizer


@_register("bireal_approx_sign")
class ApproxSign(_LarqQuantizer):
    r"""Binary activations with the ApproxSign gradient (Bi-Real Net, Sec. 3.2).

    Forward `sign(x)` with sign(0) = +1; backward `2 - 2|x|` on |x| <= 1, else 0.
    The same function as Larq's `ApproxSign`; kept here so the project owns the
    definition it publishes and tests.
    """

    precision = 1

    def call(self, inputs):
        return super().call(approx_sign(inputs))


@_register("bireal_magnitude_aware_sign")
class MagnitudeAwareSign(_LarqQuantizer):
    r"""Binary weights scaled by their mean magnitude per output channel (Sec. 3.3).

    Forward `mean(|W|) * sign(W)`, the mean over kernel height, width and input
    channels. Backward straight-through, zero where |W| > `clip_value`:

    - `scale_gradient=True` (default, the paper): `dL/dW = dL/dWb * mean(|W|)`;
      equal to Larq's `MagnitudeAwareSign`.
    - `scale_gradient=False`: `dL/dW = dL/dWb`, as the authors' 2019 PyTorch code.
      With Adam the two are nearly the same, since Adam normalizes the step size.
    """

    precision = 1

    def __init__(self, scale_gradient=True, clip_value=1.0, **kwargs):
        self.scale_gradient = bool(scale_gradient)
        self.clip_value = float(clip_value)
        super().__init__(**kwargs)

    def call(self, inputs):
        outputs = magnitude_aware_sign(inputs, self.scale_gradient, self.clip_value)
        return super().call(outputs)

    def get_config(self):
        return {
            **super().get_config(),
            "scale_gradient": self.scale_gradient,
            "clip_value": self.clip_value,
        }


def leaky_clip(x):
    r"""Leaky clip: identity on [-1, 1], slope 0.1 outside, continuous.

    f(x) = x (|x| <= 1);  0.1 x + 0.9 (x > 1);  0.1 x - 0.9 (x < -1).
    The second real-valued stage of the paper's initialization.
    """
    return tf.clip_by_value(x, -1.0, 1.0) + 0.1 * (x - tf.clip_by_value(x, -1.0, 1.0))


def hard_clip(x):
    r"""clip(-1, x, 1): identity on [-1, 1], constant outside (gradient 0 there).

    The third real-valued stage: the real network closest to sign before binarizing.
    """
    return tf.clip_by_value(x, -1.0, 1.0)


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
