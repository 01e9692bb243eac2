"""FakeQuant: an int8 fake-quantization point with a range tracked during training.

    y = fake_quant_with_min_max_vars(x, lo, hi, num_bits=8)

rounds x onto the 256 levels of [lo, hi] (nudged so that 0 is a level) and
passes the gradient straight through inside the range. LCE's converter turns
such ops into int8 tensors (scale (hi - lo) / 255, a zero point) around the
layers they follow, and lets an LceBconv2d whose output is fake-quantized write
int8. The range is tracked, not trained: in training lo, hi move towards the
batch's min and max by an exponential moving average (the first batch sets
them), lo <= 0 <= hi; in inference they are fixed.
"""

import tensorflow as tf

__all__ = ["FakeQuant"]


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
