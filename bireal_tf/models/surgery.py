"""Weight transfer between variants of a network: the stages of a recipe hand their
weights on by layer name.
"""
import larq as lq
import numpy as np
import tensorflow as tf

from bireal_tf.models.layers import Subsample2D
from bireal_tf.quantizers import MagnitudeAwareSign


def copy_weights_by_name(model, source) -> int:
    """Set each layer of `model` that has weights from `source`'s layer of the same name;
    returns how many layers were copied. The variants of one network (ReLU, clip, binary,
    +-1 weights) share their layer names, so each stage starts where the last one ended."""
    by_name = {layer.name: layer for layer in source.layers}
    copied = 0
    for layer in model.layers:
        if layer.weights and layer.name in by_name:
            layer.set_weights(by_name[layer.name].get_weights())
            copied += 1
    if copied:
        absorb_weight_scale(model, by_name)
    return copied


def absorb_weight_scale(model, source_layers):
    """Carry the magnitude-aware scale into BatchNorm when weights become +-1 (no scale).

    A source conv computed z = a_c * (sign(W) * x), a_c = mean|W[..., c]|; the same conv
    with plain sign weights computes z / a_c. The BatchNorm right after it keeps its
    moving statistics of z, so in inference mode it would see inputs 1/a_c (30-80x on
    Fashion-MNIST) too large. Rescaling moving_mean by 1/a_c and moving_variance by
    1/a_c**2 makes the loaded network compute what the source did (up to BatchNorm's
    epsilon), so the BatchNorm retrain starts from the binary model, as the paper's does.
    `source_layers`: the source network's layers by name.
    """
    for bn in model.layers:
        if not isinstance(bn, tf.keras.layers.BatchNormalization):
            continue
        producer = bn.input._keras_history.layer
        if isinstance(producer, Subsample2D):  # "symmetric" padding's stride-2 convs
            producer = producer.input._keras_history.layer
        source = source_layers.get(producer.name)
        if not (isinstance(producer, lq.layers.QuantConv2D) and source is not None
                and isinstance(getattr(source, "kernel_quantizer", None), MagnitudeAwareSign)
                and not isinstance(producer.kernel_quantizer, MagnitudeAwareSign)):
            continue
        kernel = producer.kernel.numpy()
        scale = np.abs(kernel).mean(axis=tuple(range(kernel.ndim - 1)))
        bn.moving_mean.assign(bn.moving_mean.numpy() / scale)
        bn.moving_variance.assign(bn.moving_variance.numpy() / scale**2)
