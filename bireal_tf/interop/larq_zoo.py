"""larq-zoo's published ImageNet Bi-Real-18 weights in our Bi-Real-18.

larq-zoo's `BiRealNet` and our `BiRealNet18(padding="same")` have the same
layers in the same order, so its `.h5` weights load layer for layer. The net is
built in larq-zoo's conventions ("same" padding, BatchNorm epsilon 1e-3 and
momentum 0.8, `weight_clip` on the binary kernels, pad_values 0), so it computes
what larq-zoo's model computes.
"""

import os
import re

import numpy as np

from bireal_tf.interop.pytorch import refuse_contradictions

__all__ = ["WeightsUnavailableError", "from_larq_zoo", "load_larq_zoo_weights"]

# larq-zoo 2.4.0's BiRealNet: its release, files and SHA-256 (larq_zoo/literature/birealnet.py).
_RELEASE = ("birealnet", "v0.3.0")
_FILES = {
    True: ("birealnet_weights.h5",
           "6e6efac1584fcd60dd024198c87f42eb53b5ec719a5ca1f527e1fe7e8b997117"),
    False: ("birealnet_weights_notop.h5",
            "5148b61c0c2a1094bdef811f68bf4957d5ba5f83ad26437b7a4a6855441ab46b"),
}
_FIXED = dict(padding="same", activation="binary", bn_epsilon=1e-3, pad_values=0.0,
              kernel_quantizer=None, weights=None)


class WeightsUnavailableError(OSError):
    """larq-zoo's weights could not be fetched (no network, or a bad download)."""


def _cache_path(file):
    """Where larq-zoo's helper (Keras `get_file`) keeps `file`: ~/.keras, or /tmp/.keras
    when ~/.keras is not writable, then larq-zoo's `larq/models/<model>` subfolder."""
    base = os.path.expanduser(os.path.join("~", ".keras"))
    if not os.access(base, os.W_OK):
        base = os.path.join("/tmp", ".keras")
    return os.path.join(base, "larq", "models", _RELEASE[0], file)


def _fetch(include_top):
    from larq_zoo.core.utils import download_pretrained_model

    file, sha256 = _FILES[include_top]
    try:
        return download_pretrained_model(
            model=_RELEASE[0], version=_RELEASE[1], file=file, file_hash=sha256
        )
    except Exception as e:  # Keras' get_file raises a bare Exception on a failed fetch
        origin = re.search(r"URL fetch failure on (\S+):\s", str(e))
        origin = origin.group(1) if origin else f"larq-zoo's GitHub release {'-'.join(_RELEASE)}"
        raise WeightsUnavailableError(
            f"Could not fetch larq-zoo's Bi-Real-18 weights '{file}' from {origin} ({e}). "
            f"Without network: download that file elsewhere and put it at {_cache_path(file)} "
            f"(larq-zoo's helper checks its SHA-256 {sha256} and then uses it), or pass its "
            "path: bireal_tf.interop.from_larq_zoo(path=...)."
        ) from e


def _read_h5(path):
    """[(layer name, [arrays])] of a Keras .h5 weights file, layers with weights, in order."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            group = f["model_weights"] if "layer_names" not in f.attrs and "model_weights" in f else f
            layers = []
            for name in group.attrs["layer_names"]:
                name = name.decode() if isinstance(name, bytes) else name
                weights = [w.decode() if isinstance(w, bytes) else w
                           for w in group[name].attrs["weight_names"]]
                if weights:
                    layers.append((name, [np.asarray(group[name][w]) for w in weights]))
            return layers
    except (OSError, KeyError) as e:
        raise ValueError(f"{path} is not a readable Keras .h5 weights file ({e}).") from e


def _assign(model, layers, path):
    ours = [layer for layer in model.layers if layer.weights]
    if len(layers) == len(ours) + 1 and len(layers[-1][1]) == 2 and layers[-1][1][0].ndim == 2:
        layers = layers[:-1]  # the with-top file into a net without the top: skip the classifier
    if len(layers) != len(ours):
        hint = (" It has no classifier: load it with include_top=False."
                if len(layers) == len(ours) - 1 else "")
        raise ValueError(
            f"{path} has {len(layers)} layers with weights, our Bi-Real-18 "
            f"{len(ours)}: it is not larq-zoo's Bi-Real-18 weights file.{hint}"
        )
    wrong = []
    for (name, arrays), layer in zip(layers, ours):
        shapes = [tuple(a.shape) for a in arrays]
        expected = [tuple(w.shape) for w in layer.weights]
        if shapes != expected:
            wrong.append(f"{name} {shapes} -> {layer.name} {expected}")
    if wrong:
        raise ValueError(f"{path} does not fit our Bi-Real-18: " + "; ".join(wrong))
    for (_, arrays), layer in zip(layers, ours):
        layer.set_weights(arrays)


def from_larq_zoo(path=None, include_top=True, **model_kwargs):
    """Our Bi-Real-18 with larq-zoo's ImageNet weights (57.47% top-1 as published by larq-zoo).

    Args:
        path: a larq-zoo `.h5` weights file (no network used); None fetches larq-zoo's
            published file (with or without the top) through larq-zoo's own download
            helper, which checks its SHA-256 and caches it.
        include_top: with the 1000-class classifier. The with-top file also loads
            into a net without the top.
        **model_kwargs: passed to `BiRealNet18` (input_shape, input_tensor, pooling,
            classifier_activation, bn_momentum, kernel_constraint). Arguments that
            contradict the weights (num_classes other than 1000 with the top,
            padding="symmetric", activation other than "binary", another bn_epsilon
            or pad_values) are refused.

    Raises:
        WeightsUnavailableError: no network; names the file, its address and the
            cache path where a copy can be put by hand.
    """
    from bireal_tf.models import BiRealNet18

    refuse_contradictions(model_kwargs, _FIXED, "larq-zoo's Bi-Real-18 weights")
    if include_top and model_kwargs.get("num_classes", 1000) != 1000:
        raise ValueError(
            f"num_classes={model_kwargs['num_classes']} contradicts larq-zoo's weights with "
            "the top (1000 ImageNet classes); use include_top=False and add your own classifier."
        )
    kwargs = dict(_FIXED, bn_momentum=0.8, kernel_constraint="weight_clip", num_classes=1000)
    kwargs.update(model_kwargs, include_top=include_top)
    model = BiRealNet18(**kwargs)
    path = _fetch(include_top) if path is None else str(path)
    _assign(model, _read_h5(path), path)
    return model


def load_larq_zoo_weights(model, path=None):
    """Copy larq-zoo's Bi-Real-18 weights into `model`, a Bi-Real-18 of any variant, by layer name.

    The classifier `fc` is copied only when it has 1000 classes; otherwise it is left
    as it is. The weights were trained with BatchNorm epsilon 1e-3 and "same" padding;
    in a net built otherwise they are a starting point for training, not a finished net.

    Returns:
        A one-line summary of what was copied.
    """
    import tensorflow as tf

    fc = next((l for l in model.layers if l.name == "fc"), None)
    top = fc is not None and isinstance(fc, tf.keras.layers.Dense) and fc.units == 1000
    source = from_larq_zoo(path, include_top=top, input_shape=(None, None, 3),
                           classifier_activation=None)
    by_name = {layer.name: layer for layer in source.layers if layer.weights}
    ours = [layer for layer in model.layers if layer.weights and layer.name != "fc" or
            (layer.name == "fc" and top)]
    absent = [layer.name for layer in ours if layer.name not in by_name]
    wrong = [f"{layer.name} {[tuple(w.shape) for w in layer.weights]}" for layer in ours
             if layer.name in by_name and [tuple(w.shape) for w in layer.weights]
             != [tuple(w.shape) for w in by_name[layer.name].weights]]
    if absent or wrong:
        raise ValueError(
            f"larq-zoo's Bi-Real-18 weights do not fit model '{model.name}'"
            + (f"; layers with no counterpart: {', '.join(absent[:8])}" if absent else "")
            + (f"; shapes differ (larq-zoo's take 3-channel inputs): {', '.join(wrong[:8])}"
               if wrong else "")
        )
    for layer in ours:
        layer.set_weights(by_name[layer.name].get_weights())
    kept = "" if top else " (fc left as it is: not 1000 classes)" if fc is not None else ""
    return f"larq-zoo's Bi-Real-18 weights: {len(ours)} layers copied{kept}"
