"""The floor of a .tflite's size: the fewest bytes its weights can be stored in.

The report sets the file's size beside it (`SizeCheck.ratio`): a file far above its
floor holds something it should not (float binary kernels, unfolded BatchNorm).
"""

import math

import larq as lq
import tensorflow as tf

from bireal_tf.export.report import SizeCheck
from bireal_tf.models import binary_conv_layers

__all__ = ["int8_size_floor", "size_floor"]


def size_floor(model) -> SizeCheck:
    """The smallest the weights can be stored in, by Larq's `ModelProfile` (file_bytes 0).

    floor_bits = sum over weights of bits x count: 1 bit per binary weight (a
    quantized kernel of precision 1), 32 per other weight, BatchNorm folded to 2
    per channel (a scale and an offset). The binary kernels' per-channel magnitude
    scale folds into that BatchNorm scale.
    """
    profiles = lq.models.ModelProfile(model).layer_profiles
    binary = sum(p.weight_count(bitwidth=1) for p in profiles)
    bn = sum(p.weight_count() for p in profiles
             if isinstance(model.get_layer(p.name), tf.keras.layers.BatchNormalization))
    floor = math.ceil(sum(p.memory for p in profiles) / 8)
    rest = sum(p.weight_count() for p in profiles) - binary - bn
    return SizeCheck(0, floor, 0.0, binary, rest, bn, 32, 0)


def int8_size_floor(model):
    """SizeCheck (file_bytes 0) against the int8 floor of a model with fake-quant ops.

        floor_bits = 1 * binary_params + 8 * (float_params + batchnorm_params)
                     + 32 * scale_params

    binary_params, float_params, batchnorm_params as in `size_floor` (BatchNorm
    folded to 2 per channel); scale_params: one float32 scale per output channel of
    each real-valued conv and dense kernel (TFLite's per-channel int8 weights).
    """
    size = size_floor(model)
    binary = {layer.name for layer in binary_conv_layers(model)}
    scales = sum(1 if len(layer.kernel.shape) == 2 else int(layer.kernel.shape[-1])
                 for layer in model.layers if hasattr(layer, "kernel") and layer.name not in binary)
    bits = size.binary_params + 8 * (size.float_params + size.batchnorm_params) + 32 * scales
    size.floor_bytes, size.weight_bits, size.scale_params = math.ceil(bits / 8), 8, scales
    return size
