"""Bi-Real Net 18 / 34 / 50 built from Larq layers."""

from bireal_tf.models.bireal import (
    ACTIVATIONS,
    DEPTHS,
    MIN_INPUT_SIZE,
    PADDINGS,
    BiRealNet18,
    BiRealNet34,
    BiRealNet50,
    binary_conv_layers,
    bireal_net,
)
from bireal_tf.models.layers import ConstantPadding2D, Subsample2D

__all__ = [
    "ACTIVATIONS",
    "DEPTHS",
    "MIN_INPUT_SIZE",
    "PADDINGS",
    "BiRealNet18",
    "BiRealNet34",
    "BiRealNet50",
    "binary_conv_layers",
    "bireal_net",
    "ConstantPadding2D",
    "Subsample2D",
]
