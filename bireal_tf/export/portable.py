"""The portable lowering: a Bi-Real Net as a .tflite of builtin ops only, for stock LiteRT.

A binary conv computes y = a_c * sum(sign(x) * sign(W)) over its window (Larq's
sign(0) = +1, `a_c` the per-channel magnitude scale), and that sum is an integer.
Stock TFLite has no 1-bit conv, but its *hybrid* CONV_2D (float input, int8 weights)
quantizes the input on the fly and sums in int32, which is exact for the right values.
Which values are right is the catch: the hybrid kernels (TFLite's per-channel one and
XNNPACK's) quantize the input *asymmetrically* per image, q = round(x / s) + z with
s = (max - min) / 255. Inputs in {-1, +1} land on q = 127 and -128 around a zero
point of -1, i.e. +1.0039 and -0.9961: every sum is off (measured: 0.4-0.7 in
outputs of +-190). Inputs in {0, 1} are exact (s = 1/255, z = -128: q = -128, 127).
So the lowering binarizes to bits and shifts the sum back:

    b = [x >= 0]                        (GREATER_EQUAL + CAST; sign(0) = +1)
    sign(x) = 2b - 1
    y = conv(2b - 1, Wq) = conv(b, 2 Wq) - sum_window(Wq)

where Wq = a_c sign(W) and sum_window(Wq) is what the `-1`s contribute. For a
window inside the (padded) input that is sum over (kh, kw, c_in) of Wq, one number
per channel, which becomes the conv's bias. Padding:

- `pad_values=1` (LCE's own): b is padded with 1 (PADV2), every window is full, the
  bias is the whole correction.
- `pad_values=0`: pad with 1 as well, then subtract the taps that fall on the padding,
  a constant map `border` [1, H_out, W_out, C] (zero inside, the out-of-image taps'
  sum of Wq on the rim). It is stored as float32, H_out * W_out * C values per conv.

The twin (a Keras graph with these layers in place of the binary convs, the other
layers untouched) is converted with the plain `tf.lite.TFLiteConverter` to float32.
The BatchNorm after each binary conv is folded into it first (scale g_c, offset):
its kernel becomes 2 a_c g_c sign(W), one magnitude per output channel. `lower_binary_kernels` then stores each such kernel as int8 +-1 with
that magnitude as its per-channel scale (zero point 0), which makes the CONV_2D a
hybrid one (version 5, as the converter's own dynamic-range quantization writes it).
The integer sum is exact (|sum| <= 255 * 9 * C_in < 2^31); it is rounded once, when
the kernel multiplies it by the two float scales. Every other layer stays float32.

An int8 model (fake-quant layers, `bireal_tf.models.int8_model`) becomes a fully int8
file instead, the builtin twin of LCE's int8 file. Its activations are int8 with
static ranges, so the asymmetry above does not arise, and the sign stays +-1:

    s = +1 where x >= 0 else -1        (GREATER_EQUAL + SELECT_V2, int8 in and out)
    s is stored as +-127 at scale 1/127, zero point 0 (exact)
    y = conv(pad_1(s), K) + t          (PADV2 with +1, int8 CONV_2D)

with K = g_c a_c sign(W) (BatchNorm scale g_c and magnitude a_c folded) stored as
int8 +-127 at the per-channel scale |g_c a_c| / 127, i.e. +-1 times |g_c a_c|, and t
the BatchNorm offset as the int32 bias. The int32 sum is exact
(|sum| <= 127^2 * 9 * C_in < 2^31), and the CONV_2D requantizes it once into the
int8 range of the FakeQuant that follows, as LCE's int8 LceBconv2d writes int8. The
TFLite converter quantizes the twin (`PortableInt8BinaryConv2D` in place of each
binary conv) from its fake-quant ops; the other layers are int8 as in LCE's file.
Measured here against LCE's file on the same int8 inputs: a binary conv + BatchNorm
gives the same int8 levels (196,608 of 196,608); deeper, an int8 requantization rounds
by one level now and then (the stem's int8 conv under XNNPACK, which stock LiteRT
uses by default, on 0.03% of values; a later binary conv on 0.06% without it), and
such a level can flip a sign downstream.
"""

from dataclasses import dataclass

import numpy as np
import tensorflow as tf

from bireal_tf.export.checks import batchnorm_affine, find_by_signs, kernel_signs, quantized_kernel
from bireal_tf.export.files import ExportError
from bireal_tf.export.flatbuffer import TFLiteGraph
from bireal_tf.export.schema import (BuiltinOperator, TensorType, builtin_code, read_model, schema,
                                     text, write_model)
from bireal_tf.models import binary_conv_layers

__all__ = ["HYBRID_CONV_VERSION", "PortableBinaryConv2D", "PortableInt8BinaryConv2D", "custom_ops",
           "find_int8_binary_convs", "is_portable_file", "lower_binary_kernels", "portable_twin"]

HYBRID_CONV_VERSION = 5  # what TFLite's dynamic-range quantizer writes for a per-channel hybrid conv
SIGN_RANGE = (-128.0 / 127.0, 1.0)  # a FakeQuant range whose int8 grid has scale 1/127, zero point 0
_SIGN_PROBE = np.array([-2.0, -1.0, -0.3, -1e-30, 0.0, 1e-30, 0.3, 1.0, 2.0], np.float32)


def _same_padding(size, kernel, stride, dilation):
    """(before, after) of TF's "same" padding along one axis (Larq pads this way too)."""
    extent = (kernel - 1) * dilation + 1
    out = -(-size // stride)
    total = max((out - 1) * stride + extent - size, 0)
    return total // 2, total - total // 2


class PortableBinaryConv2D(tf.keras.layers.Layer):
    """A binary conv in builtin ops: y = conv_valid(pad_1([x >= 0]), 2 Wq) + bias - border.

    `kernel` is 2 Wq [kh, kw, c_in, c_out], `bias` -sum(Wq) (plus the layer's own bias),
    `border` the zero-padding correction [1, H_out, W_out, c_out] or None (module doc).
    Constants, not weights: the layer exists only to be converted.
    """

    def __init__(self, kernel, bias, border, paddings, strides, dilation_rate, activation=None, **kwargs):
        super().__init__(**kwargs)
        self.kernel = np.asarray(kernel, np.float32)
        self.bias = np.asarray(bias, np.float32)
        self.border = None if border is None else np.asarray(border, np.float32)
        self.paddings = [[0, 0], list(paddings[0]), list(paddings[1]), [0, 0]]
        self.conv_strides = tuple(strides)
        self.dilation_rate = tuple(dilation_rate)
        self.activation = tf.keras.activations.get(activation)

    def call(self, inputs):
        bits = tf.cast(inputs >= 0, tf.float32)
        if any(p for pair in self.paddings for p in pair):
            bits = tf.pad(bits, self.paddings, constant_values=1.0)  # sign = +1 on the padding
        y = tf.nn.conv2d(bits, self.kernel, (1, *self.conv_strides, 1), "VALID",
                         dilations=(1, *self.dilation_rate, 1))
        y = y + self.bias
        if self.border is not None:
            y = y - self.border
        return self.activation(y)

    @classmethod
    def from_larq(cls, layer, batchnorm=None):
        """The portable form of a Larq binary QuantConv2D; ExportError names what does not fit.

        `batchnorm`, the BatchNormalization that alone reads the conv, is folded in:
        y -> s y + t per channel with s = gamma / sqrt(var + eps), t = beta - mean s.
        """
        wq, paddings = _binary_kernel(layer)
        h, w = (int(d) for d in layer.input.shape[1:3])
        bias = -wq.sum(axis=(0, 1, 2))
        if layer.use_bias:
            bias = bias + np.asarray(layer.bias, np.float32)
        border = None
        if any(p for pair in paddings for p in pair) and float(layer.pad_values) == 0.0:
            # Sum of Wq over the taps that land on the padding, per output position.
            on_padding = np.pad(np.zeros((1, h, w, 1), np.float32),
                                [[0, 0], list(paddings[0]), list(paddings[1]), [0, 0]], constant_values=1.0)
            border = tf.nn.conv2d(on_padding, wq.sum(axis=2, keepdims=True), (1, *layer.strides, 1),
                                  "VALID", dilations=(1, *layer.dilation_rate, 1)).numpy()
        kernel = 2.0 * wq
        if batchnorm is not None:
            s, t = batchnorm_affine(batchnorm)
            kernel, bias = kernel * s, bias * s + t
            border = None if border is None else border * s
        return cls(kernel, bias, border, paddings, layer.strides, layer.dilation_rate,
                   activation=tf.keras.activations.serialize(layer.activation), name=layer.name)


class PortableInt8BinaryConv2D(tf.keras.layers.Layer):
    """A binary conv of an int8 model in builtin int8 ops: y = conv_valid(pad_1(s), K) + t,
    s = +-1 (sign(0) = +1) on the int8 grid of SIGN_RANGE (module doc).

    `kernel` is K = g_c a_c sign(W) [kh, kw, c_in, c_out], `bias` t. Its int8 grid is
    symmetric per output channel with the range |g_c a_c|, so K is +-127 levels exactly.
    Constants, not weights: the layer exists only to be converted.
    """

    def __init__(self, kernel, bias, paddings, strides, dilation_rate, **kwargs):
        super().__init__(**kwargs)
        self.kernel = np.asarray(kernel, np.float32)
        self.bias = np.asarray(bias, np.float32)
        self.magnitude = np.abs(self.kernel).reshape(-1, self.kernel.shape[-1]).max(0)
        self.paddings = [[0, 0], list(paddings[0]), list(paddings[1]), [0, 0]]
        self.conv_strides = tuple(strides)
        self.dilation_rate = tuple(dilation_rate)

    def call(self, inputs):
        signs = tf.where(inputs >= 0, 1.0, -1.0)
        signs = tf.quantization.fake_quant_with_min_max_vars(signs, *SIGN_RANGE, num_bits=8)
        if any(p for pair in self.paddings for p in pair):
            signs = tf.pad(signs, self.paddings, constant_values=1.0)
        kernel = tf.quantization.fake_quant_with_min_max_vars_per_channel(
            tf.constant(self.kernel), -self.magnitude, self.magnitude, num_bits=8, narrow_range=True)
        y = tf.nn.conv2d(signs, kernel, (1, *self.conv_strides, 1), "VALID",
                         dilations=(1, *self.dilation_rate, 1))
        return y + self.bias

    @classmethod
    def from_larq(cls, layer, batchnorm=None):
        """The int8 portable form of a Larq binary conv of an int8 model, `batchnorm` folded in."""
        if float(layer.pad_values) != 1.0 and layer.padding == "same" and max(layer.kernel_size) > 1:
            raise ExportError(f"Binary conv '{layer.name}' pads with 0; an int8 model's binary convs pad "
                              "with +1 (bireal_tf.models.int8_model makes them so).")
        if tf.keras.activations.serialize(layer.activation) != "linear":
            raise ExportError(f"Binary conv '{layer.name}' has an activation; the int8 portable lowering "
                              "takes a linear binary conv (its BatchNorm and FakeQuant follow it).")
        wq, paddings = _binary_kernel(layer)
        bias = np.asarray(layer.bias, np.float32) if layer.use_bias else np.zeros(wq.shape[-1], np.float32)
        if batchnorm is not None:
            s, t = batchnorm_affine(batchnorm)
            wq, bias = wq * s, bias * s + t
        return cls(wq, bias, paddings, layer.strides, layer.dilation_rate, name=layer.name)


def _binary_kernel(layer):
    """(a_c sign(W) as float32 [kh, kw, c_in, c_out], the (top, bottom), (left, right) padding)
    of a Larq binary conv; ExportError when it is not +-1 times a per-channel scale."""
    problem = _unsupported(layer)
    if problem:
        raise ExportError(f"Binary conv '{layer.name}' cannot be lowered to builtin ops: {problem}")
    wq = quantized_kernel(layer)
    scale = np.abs(wq).reshape(-1, wq.shape[-1])
    if not np.all(scale.max(0) > 0) or not np.allclose(scale.min(0), scale.max(0), rtol=1e-6, atol=0):
        raise ExportError(
            f"Binary conv '{layer.name}': its kernel quantizer gives more than one magnitude in "
            "an output channel (or a zero), so the kernel is not +-1 times a per-channel scale "
            "and cannot be stored as int8 +-1. Use a sign-like kernel quantizer "
            "(bireal_tf's MagnitudeAwareSign, Larq's ste_sign).")
    h, w = (int(d) for d in layer.input.shape[1:3])
    kh, kw = layer.kernel_size
    if layer.padding == "same":
        paddings = [_same_padding(h, kh, layer.strides[0], layer.dilation_rate[0]),
                    _same_padding(w, kw, layer.strides[1], layer.dilation_rate[1])]
    else:
        paddings = [(0, 0), (0, 0)]
    return (np.sign(wq) * scale.max(0)).astype(np.float32), paddings


def _folded_batchnorms(model, binary) -> dict:
    """{binary conv name: the BatchNormalization that alone reads it} for convs without activation."""
    found = {}
    for layer in model.layers:
        if layer.name not in binary or tf.keras.activations.serialize(layer.activation) != "linear":
            continue
        readers = [node.outbound_layer for node in layer._outbound_nodes]
        if (len(readers) == 1 and isinstance(readers[0], tf.keras.layers.BatchNormalization)
                and len(readers[0]._inbound_nodes) == 1 and readers[0].axis in ([-1], [3], -1, 3)):
            found[layer.name] = readers[0]
    return found


def _unsupported(layer) -> str:
    """Why `layer` (a Larq binary conv) cannot be lowered, or ''."""
    if layer.data_format != "channels_last":
        return "only channels_last is supported."
    if getattr(layer, "groups", 1) != 1:
        return f"grouped convs (groups={layer.groups}) are not supported."
    if layer.padding not in ("same", "valid"):
        return f"padding {layer.padding!r} is not supported (same or valid)."
    if float(layer.pad_values) not in (0.0, 1.0):
        return f"pad_values={layer.pad_values} is not supported (0 or 1)."
    if None in tuple(layer.input.shape[1:3]):
        return "its input has a free height or width; export with a fixed input_shape."
    probe = np.asarray(layer.input_quantizer(tf.constant(_SIGN_PROBE)))
    if not np.array_equal(probe, np.where(_SIGN_PROBE >= 0, 1.0, -1.0)):
        return (f"its input quantizer is not sign with sign(0) = +1 (on {_SIGN_PROBE.tolist()} it "
                f"gives {probe.tolist()}).")
    return ""


def portable_twin(model) -> tf.keras.Model:
    """`model` (a float32 functional model) with every binary conv a PortableBinaryConv2D,
    or a PortableInt8BinaryConv2D if `model` has fake-quant layers (an int8 model).

    Same layer names; the other layers are rebuilt from their configs with their weights.
    A BatchNormalization that alone reads a binary conv is folded into it here (and
    becomes an identity), so the lowering does not depend on the converter's fusions.
    """
    from bireal_tf.models import fake_quant_layers

    binary = {layer.name for layer in binary_conv_layers(model)}
    lowered_conv = PortableInt8BinaryConv2D if fake_quant_layers(model) else PortableBinaryConv2D
    if any(isinstance(layer, tf.keras.Model) for layer in model.layers):
        raise ExportError(f"Model '{model.name}' nests models; the portable export takes a flat "
                          "functional model (as bireal_tf's builders make).")

    folded = _folded_batchnorms(model, binary)
    absorbed = {bn.name for bn in folded.values()}

    def clone(layer):
        if layer.name in binary:
            return lowered_conv.from_larq(layer, folded.get(layer.name))
        if layer.name in absorbed:  # folded into the conv before it
            return tf.keras.layers.Activation("linear", name=layer.name)
        return layer.__class__.from_config(layer.get_config())

    try:
        twin = tf.keras.models.clone_model(model, clone_function=clone)
    except ExportError:
        raise
    except (ValueError, TypeError) as err:
        raise ExportError(f"Model '{model.name}' cannot be rebuilt with portable binary convs "
                          f"({type(err).__name__}: {err}); pass a functional model.") from err
    for layer in model.layers:
        if layer.name not in binary | absorbed and layer.weights:
            twin.get_layer(layer.name).set_weights(layer.get_weights())
    return twin


@dataclass
class LoweredConv:
    """One binary conv found in the float flatbuffer and stored as int8 +-1."""

    layer: str
    tensor: str
    out_channels: int
    negative_channels: int  # channels whose folded BatchNorm scale is negative (sign flipped)


def _take_match(wanted: dict, negative: np.ndarray):
    """`find_by_signs` with every weight agreeing; the layer found leaves `wanted`."""
    name, flipped = find_by_signs(wanted, negative)
    if name is not None:
        del wanted[name]
    return name, flipped


def _conv_kernels(fb):
    """(op, input tensor, kernel tensor, kernel buffer) of each CONV_2D with a constant kernel
    in the main subgraph of an object-API model."""
    graph = fb.subgraphs[0]
    for op in graph.operators:
        if builtin_code(fb.operatorCodes[op.opcodeIndex]) != BuiltinOperator.CONV_2D:
            continue
        kernel = graph.tensors[op.inputs[1]]
        buffer = fb.buffers[kernel.buffer]
        if buffer.data is not None:
            yield op, graph.tensors[op.inputs[0]], kernel, buffer


def find_int8_binary_convs(flatbuffer: bytes, model) -> list:
    """The LoweredConv of each binary conv of `model` in an int8 portable file: an int8 CONV_2D
    on an int8 input whose kernel is +-127 levels (zero point 0) in the layer's sign pattern.
    ExportError when one is missing (the converter did not keep the conv as int8 +-1)."""
    fb = read_model(flatbuffer)
    wanted = {layer.name: kernel_signs(layer) for layer in binary_conv_layers(model)}
    found = []
    for _, data, kernel, buffer in _conv_kernels(fb):
        if kernel.type != TensorType.INT8 or data.type != TensorType.INT8:
            continue
        levels = np.frombuffer(bytes(buffer.data), np.int8).reshape(kernel.shape)
        if not np.all(np.abs(levels.astype(np.int16)) == 127) or any(kernel.quantization.zeroPoint):
            continue
        name, flipped = _take_match(wanted, levels < 0)
        if name is not None:
            found.append(LoweredConv(name, text(kernel.name), len(levels), flipped))
    _check_all_found(wanted, model, "int8 CONV_2D in the file has their sign pattern as +-127 levels")
    return found


def _check_all_found(wanted: dict, model, looked_for: str):
    """ExportError naming the binary convs left in `wanted` (not found in the converted file)."""
    if wanted:
        raise ExportError(
            f"The portable conversion lost track of {len(wanted)} binary conv(s) of model "
            f"'{model.name}' ({', '.join(sorted(wanted))}): no {looked_for}. The converter changed "
            "the graph in a way the lowering does not know; export with target='lce' instead.")


def lower_binary_kernels(flatbuffer: bytes, model) -> tuple[bytes, list]:
    """Store every binary conv's float kernel of `flatbuffer` as int8 +-1 with a per-channel scale.

    A CONV_2D belongs to Keras binary conv `layer` when its float filter has one magnitude
    per output channel and the sign pattern of the layer's binarized kernel up to a flip
    per channel (a negative BatchNorm scale folded in). Returns (new flatbuffer, the
    LoweredConv of each layer). ExportError when a binary conv is not found.
    """
    fb = read_model(flatbuffer)
    wanted = {layer.name: kernel_signs(layer) for layer in binary_conv_layers(model)}
    hybrid_code, lowered = None, []
    for op, _, tensor, buffer in _conv_kernels(fb):
        if not wanted or tensor.type != TensorType.FLOAT32:
            continue
        kernel = np.frombuffer(bytes(buffer.data), "<f4").reshape(tensor.shape)
        magnitude = np.abs(kernel).reshape(len(kernel), -1)
        if not (np.all(magnitude.max(1) > 0) and np.array_equal(magnitude.min(1), magnitude.max(1))):
            continue
        negative = kernel < 0
        name, flipped = _take_match(wanted, negative)
        if name is None:
            continue
        buffer.data = np.where(negative, -1, 1).astype(np.int8).tobytes()
        tensor.type = TensorType.INT8
        tensor.quantization = _per_channel_scales(magnitude.max(1))
        if hybrid_code is None:
            fb.operatorCodes.append(_hybrid_conv_code())
            hybrid_code = len(fb.operatorCodes) - 1
        op.opcodeIndex = hybrid_code
        lowered.append(LoweredConv(name, text(tensor.name), len(kernel), flipped))
    _check_all_found(wanted, model, "float CONV_2D in the converted file has their sign pattern with "
                                    "one magnitude per channel")
    return write_model(fb), lowered


def _per_channel_scales(scales: np.ndarray):
    """Symmetric int8 quantization along the output channels (axis 0), zero point 0."""
    q = schema.QuantizationParametersT()
    q.scale = scales.astype(np.float32).tolist()
    q.zeroPoint = [0] * len(scales)
    q.quantizedDimension = 0
    return q


def _hybrid_conv_code():
    """The operator code of a hybrid CONV_2D (float input, int8 per-channel weights)."""
    code = schema.OperatorCodeT()
    code.builtinCode = BuiltinOperator.CONV_2D
    code.deprecatedBuiltinCode = min(BuiltinOperator.CONV_2D, 127)
    code.version = HYBRID_CONV_VERSION
    return code


def custom_ops(graph) -> list:
    """Names of the custom ops (LCE's or any other) in a TFLiteGraph; [] for builtin ops only."""
    return list(graph.custom_ops)


def is_portable_file(flatbuffer: bytes) -> bool:
    """Whether a flatbuffer looks like a portable export: builtin ops only, and binary convs
    as CONV_2D with int8 kernels on a computed sign: a hybrid conv on float32 0/1 (float
    models), or an int8 conv on the +-1 of a SELECT_V2 (int8 models)."""
    graph = TFLiteGraph(flatbuffer)
    if graph.custom_ops:
        return False
    producer = {t: op for op in graph.ops for t in op.outputs}
    for op in graph.ops:
        if op.name != "CONV_2D" or graph.tensors[op.inputs[1]].type != "int8":
            continue
        data = graph.tensors[op.inputs[0]]
        if data.type == "float32" and not graph.is_constant(op.inputs[0]):
            return True
        source = producer.get(op.inputs[0])
        if source is not None and source.name == "PADV2":
            source = producer.get(source.inputs[0])
        if data.type == "int8" and source is not None and source.name == "SELECT_V2":
            return True
    return False
