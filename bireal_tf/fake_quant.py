"""int8 fake quantization for quantization-aware training (issue 12).

FakeQuant: an int8 fake-quantization point on an activation, its range tracked
during training.

    y = fake_quant_with_min_max_vars(x, lo, hi, num_bits=8)

rounds x onto the 256 levels of [lo, hi] (nudged so that 0 is a level) and
passes the gradient straight through inside the range. LCE's converter turns
such ops into int8 tensors (scale (hi - lo) / 255, a zero point) around the
layers they follow, and lets an LceBconv2d whose output is fake-quantized write
int8. The range is tracked, not trained: in training lo, hi move towards the
batch's min and max by an exponential moving average (the first batch sets
them), lo <= 0 <= hi; in inference they are fixed.

Int8Kernel: the kernel quantizer of a real-valued conv or dense layer, the int8
grid TFLite stores its weights on (symmetric, per output channel for convs).
"""

import tensorflow as tf

__all__ = ["FakeQuant", "Int8Kernel"]


@tf.keras.utils.register_keras_serializable(package="bireal_tf")
class FakeQuant(tf.keras.layers.Layer):
    """Fake int8 quantization of its input, range tracked by a moving average (`momentum`)."""

    def __init__(self, momentum: float = 0.99, num_bits: int = 8, **kwargs):
        super().__init__(**kwargs)
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}.")
        self.momentum = float(momentum)
        self.num_bits = int(num_bits)

    def build(self, input_shape):
        opts = dict(trainable=False, synchronization=tf.VariableSynchronization.ON_READ,
                    aggregation=tf.VariableAggregation.MEAN)
        self.range_min = self.add_weight("range_min", shape=(), initializer=tf.constant_initializer(-6.0), **opts)
        self.range_max = self.add_weight("range_max", shape=(), initializer=tf.constant_initializer(6.0), **opts)
        self.updates_seen = self.add_weight("updates_seen", shape=(), initializer="zeros", **opts)
        super().build(input_shape)

    def call(self, inputs, training=None):
        x = tf.cast(inputs, tf.float32)
        if training:
            # The first batch sets the range, later ones move it by the moving average.
            m = tf.where(self.updates_seen > 0, self.momentum, 0.0)
            lo = m * self.range_min + (1.0 - m) * tf.minimum(tf.reduce_min(x), 0.0)
            hi = m * self.range_max + (1.0 - m) * tf.maximum(tf.reduce_max(x), 0.0)
            self.range_min.assign(lo)
            self.range_max.assign(hi)
            self.updates_seen.assign_add(1.0)
        lo = tf.minimum(self.range_min, 0.0)
        hi = tf.maximum(self.range_max, lo + 1e-6)
        y = tf.quantization.fake_quant_with_min_max_vars(x, lo, hi, num_bits=self.num_bits)
        return tf.cast(y, inputs.dtype)

    def get_config(self):
        return {**super().get_config(), "momentum": self.momentum, "num_bits": self.num_bits}


@tf.keras.utils.register_keras_serializable(package="bireal_tf")
class Int8Kernel(tf.keras.layers.Layer):
    """Symmetric int8 fake quantization of a weight kernel (a Larq `kernel_quantizer`).

        m_c = max |w[..., c]|                       (c: output channel; one m if per tensor)
        q(w) = round(127 * w / m_c) * m_c / 127     in [-m_c, m_c], 255 levels, 0 exact

    the grid of TFLite's int8 weights (zero point 0, scale m_c / 127). Gradient: straight
    through, m_c held constant (every weight is inside its range).

    Per channel, a later BatchNorm folded in by the converter scales channel c by s_c and
    the converter's grid by |s_c| alike, so the folded int8 weights are exactly the
    fake-quantized ones. Dense kernels are quantized per tensor: LCE's converter rejects a
    per-channel fully-connected from fake quantization ("'tfl.transpose' op has
    mismatched quantized axes").
    """

    precision = 8  # read by Larq's model summary and ModelProfile

    def __init__(self, per_channel: bool = True, **kwargs):
        super().__init__(**kwargs)
        self.per_channel = bool(per_channel)

    def call(self, inputs):
        w = tf.cast(inputs, tf.float32)
        axes = list(range(w.shape.rank - 1)) if self.per_channel else None
        m = tf.stop_gradient(tf.maximum(tf.reduce_max(tf.abs(w), axis=axes), 1e-8))
        if self.per_channel:
            q = tf.quantization.fake_quant_with_min_max_vars_per_channel(w, -m, m, num_bits=8, narrow_range=True)
        else:
            q = tf.quantization.fake_quant_with_min_max_vars(w, -m, m, num_bits=8, narrow_range=True)
        return tf.cast(q, inputs.dtype)

    def get_config(self):
        return {**super().get_config(), "per_channel": self.per_channel}
