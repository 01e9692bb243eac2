"""Bi-Real Net 18 / 34 / 50 built from Larq layers, their pretrained weights and model transforms.

    bireal.py     the builders (BiRealNet18/34/50, bireal_net) and from_larq_zoo
    layers.py     the padding layers of the authors' arithmetic
    larq_zoo.py   larq-zoo's weights file: fetch, read, assign (builds no network)
    int8.py       the int8 training model: FakeQuant, Int8Kernel, int8_model
    precision.py  mixed precision policies and a model's float32 config
    surgery.py    weight transfer between a network's variants, by layer name
"""

from bireal_tf.models.bireal import (
    ACTIVATIONS,
    BLOCKS,
    DEPTHS,
    MIN_INPUT_SIZE,
    PADDINGS,
    BiRealNet18,
    BiRealNet34,
    BiRealNet50,
    batchnorm_layers,
    binary_conv_layers,
    bireal_net,
    from_larq_zoo,
)
from bireal_tf.models.int8 import FakeQuant, Int8Kernel, fake_quant_layers, int8_model
from bireal_tf.models.larq_zoo import WeightsUnavailableError, load_larq_zoo_weights
from bireal_tf.models.layers import ConstantPadding2D, LearnableBias, Subsample2D, TorchConvPadding2D
from bireal_tf.models.precision import float32_config, mixed_precision_policies
from bireal_tf.models.surgery import absorb_weight_scale, copy_weights_by_name

__all__ = [
    "ACTIVATIONS",
    "BLOCKS",
    "DEPTHS",
    "MIN_INPUT_SIZE",
    "PADDINGS",
    "BiRealNet18",
    "BiRealNet34",
    "BiRealNet50",
    "batchnorm_layers",
    "binary_conv_layers",
    "bireal_net",
    "ConstantPadding2D",
    "FakeQuant",
    "Int8Kernel",
    "LearnableBias",
    "Subsample2D",
    "TorchConvPadding2D",
    "WeightsUnavailableError",
    "absorb_weight_scale",
    "copy_weights_by_name",
    "fake_quant_layers",
    "float32_config",
    "from_larq_zoo",
    "int8_model",
    "load_larq_zoo_weights",
    "mixed_precision_policies",
]
