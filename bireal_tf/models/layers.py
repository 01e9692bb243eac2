"""Small layers: the authors' ("symmetric") padding arithmetic and ReActNet's learnable shift.

PyTorch pads stride-2 layers on both sides; TF's `padding="same"` pads only at
the bottom/right on even sizes. ConstantPadding2D, TorchConvPadding2D and Subsample2D
reproduce PyTorch's windows exactly, in forms LCE converts faithfully (binary convs
stay binary; real convs keep their padding).
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
class TorchConvPadding2D(tf.keras.layers.Layer):
    """Zero padding for a valid conv that computes PyTorch's `Conv2d(k, stride=s, padding=p)`.

    Pads p before and, after, only what the last window reads:

        out = (n + 2p - k) // s + 1,    after = (out - 1) * s + k - n - p    (<= p)

    which gives PyTorch's output exactly (the rows and columns left out are never read).
    Padding p on both sides would too, in Keras, but not in LCE: its converter folds a
    pad with equal sides into the conv's "same" padding without checking that "same" pads
    as much, and for stride 2 on even sizes "same" pads p - 1 before and p after (LCE 0.16,
    mlir/transforms/fuse_padding: the 7x7 stem at 96 px then differed from Keras by up to
    4.07; with this padding by 1.4e-6). Where LCE still folds this padding (odd sizes),
    "same" pads the same.
    """

    def __init__(self, padding, kernel_size, strides, **kwargs):
        super().__init__(**kwargs)
        self.padding, self.kernel_size, self.strides = int(padding), int(kernel_size), int(strides)

    def _after(self, n):
        """Rows (or columns) after an input of size n; n an int or a scalar tensor."""
        p, k, s = self.padding, self.kernel_size, self.strides
        return ((n + 2 * p - k) // s) * s + k - n - p

    def call(self, inputs):
        dynamic = tf.shape(inputs)
        h, w = (inputs.shape[i] if inputs.shape[i] is not None else dynamic[i] for i in (1, 2))
        p = self.padding
        return tf.pad(inputs, [[0, 0], [p, self._after(h)], [p, self._after(w)], [0, 0]])

    def compute_output_shape(self, input_shape):
        n, h, w, c = input_shape
        grow = lambda d: None if d is None else d + self.padding + self._after(d)  # noqa: E731
        return tf.TensorShape([n, grow(h), grow(w), c])

    def get_config(self):
        return {**super().get_config(), "padding": self.padding,
                "kernel_size": self.kernel_size, "strides": self.strides}


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
