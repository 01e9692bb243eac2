"""The smallest file a binary network can be: its size floor.

Definition (also in docs/export_report_schema.md):

    floor_bits  = 1 * binary_params + 32 * (float_params + batchnorm_params)
    floor_bytes = ceil(floor_bits / 8)

- `binary_params`: the kernel weights of the binary convs (`binary_conv_layers`:
  Larq `QuantConv2D` with both an input and a kernel quantizer). One bit each,
  as LCE stores them bitpacked. Their per-channel magnitude scale is not
  counted: it folds into the BatchNorm scale below.
- `batchnorm_params`: 2 per channel of every `BatchNormalization` (one scale and
  one offset once its gamma, beta, moving mean and variance are folded), 32 bits
  each.
- `float_params`: every other weight, 32 bits each: kernels and biases of the
  real-valued convs and dense layers (stem, shortcut 1x1 convs, classifier),
  biases of binary convs, and the weights of any other layer.

The floor ignores the flatbuffer's structure (op and tensor tables, names,
alignment) and LCE's bitpacking to multiples of 32 input channels; `ratio`
(file size / floor) measures that overhead plus anything left in float.
"""

import math
from dataclasses import dataclass

__all__ = ["Footprint", "footprint"]


@dataclass
class Footprint:
    binary_params: int
    float_params: int
    batchnorm_params: int

    @property
    def floor_bits(self) -> int:
        return self.binary_params + 32 * (self.float_params + self.batchnorm_params)

    @property
    def floor_bytes(self) -> int:
        return math.ceil(self.floor_bits / 8)


def _leaf_layers(model, seen=None):
    import tensorflow as tf

    seen = set() if seen is None else seen
    for layer in model.layers:
        if id(layer) in seen:
            continue
        seen.add(id(layer))
        if isinstance(layer, tf.keras.Model):
            yield from _leaf_layers(layer, seen)
        else:
            yield layer


def _size(weight) -> int:
    return int(math.prod(int(d) for d in weight.shape))


def footprint(model) -> Footprint:
    """Count `model`'s parameters by how they are stored at best (see module docstring)."""
    import tensorflow as tf

    from bireal_tf.models import binary_conv_layers

    binary_ids = {id(layer) for layer in binary_conv_layers(model)}
    binary = floats = bn = 0
    for layer in _leaf_layers(model):
        if isinstance(layer, tf.keras.layers.BatchNormalization):
            bn += 2 * _size(layer.moving_mean)
        elif id(layer) in binary_ids:
            binary += _size(layer.kernel)
            floats += sum(_size(w) for w in layer.weights
                          if w is not layer.kernel and "flip_ratio" not in w.name)
        else:
            floats += sum(_size(w) for w in layer.weights if "flip_ratio" not in w.name)
    return Footprint(binary, floats, bn)
