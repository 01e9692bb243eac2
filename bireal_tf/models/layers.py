"""Small layers: the authors' ("symmetric") padding arithmetic and ReActNet's learnable shift.

PyTorch pads stride-2 layers on both sides; TF's `padding="same"` pads only at
the bottom/right on even sizes. ConstantPadding2D and Subsample2D reproduce
PyTorch's windows exactly while keeping every binary conv in a form LCE binarizes.
"""

import tensorflow as tf


@tf.keras.utils.register_keras_serializable(package="bireal_tf")
class ConstantPadding2D(tf.keras.layers.Layer):
    """Pad height and width symmetrically with a constant.

    `value=None` pads with the dtype's lowest finite value, which is what a max
    pool must see at the border (PyTorch's max pool ignores its padding); zero
    padding, right for convs, would be wrong there after BatchNorm.
    """

    def __init__(self, padding=1, value=None, **kwargs):
        super().__init__(**kwargs)
        self.padding = int(padding)
        self.value = value

    def call(self, inputs):
        p = self.padding
        value = inputs.dtype.min if self.value is None else self.value
        return tf.pad(inputs, [[0, 0], [p, p], [p, p], [0, 0]], constant_values=value)

    def compute_output_shape(self, input_shape):
        n, h, w, c = input_shape
        grow = lambda d: None if d is None else d + 2 * self.padding  # noqa: E731
        return tf.TensorShape([n, grow(h), grow(w), c])

    def get_config(self):
        return {**super().get_config(), "padding": self.padding, "value": self.value}


@tf.keras.utils.register_keras_serializable(package="bireal_tf")
class Subsample2D(tf.keras.layers.Layer):
    """Keep every `stride`-th row and column: `y = x[:, ::s, ::s, :]`.

    A stride-1 "same" 3x3 conv followed by this equals PyTorch's stride-2,
    padding-1 conv exactly (its windows are centred on even pixels). LCE keeps
    the conv binary (`LceBconv2d` + `STRIDED_SLICE`), which binarize-pad-valid-conv
    does not.
    """

    def __init__(self, stride=2, **kwargs):
        super().__init__(**kwargs)
        self.stride = int(stride)

    def call(self, inputs):
        return inputs[:, :: self.stride, :: self.stride, :]

    def compute_output_shape(self, input_shape):
        n, h, w, c = input_shape
        shrink = lambda d: None if d is None else -(-d // self.stride)  # noqa: E731
        return tf.TensorShape([n, shrink(h), shrink(w), c])

    def get_config(self):
        return {**super().get_config(), "stride": self.stride}


@tf.keras.utils.register_keras_serializable(package="bireal_tf")
class LearnableBias(tf.keras.layers.Layer):
    """ReActNet's learnable shift, one value per channel: `y = x + b_c` (b starts at 0).

    Before a sign it moves the threshold (RSign: sign(x + b) = sign(x - alpha) with
    alpha = -b); around a PReLU it moves the kink (RPReLU). The shift is trained; its
    gradient is the sum of the incoming gradient over batch, height and width.
    LCE converts it to an ADD of a constant, which the following LceQuantize reads.
    """

    def build(self, input_shape):
        self.bias = self.add_weight("bias", shape=(int(input_shape[-1]),), initializer="zeros")
        super().build(input_shape)

    def call(self, inputs):
        return inputs + tf.cast(self.bias, inputs.dtype)
