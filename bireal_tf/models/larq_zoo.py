"""larq-zoo's published ImageNet Bi-Real-18 weights file: fetch, read, assign.

larq-zoo's `BiRealNet` and our `BiRealNet18(padding="same")` have the same
layers with weights in the same order, so its `.h5` weights load layer for
layer. The net must be built in larq-zoo's conventions (CONVENTIONS: "same"
padding, BatchNorm epsilon 1e-3 and momentum 0.8, `weight_clip` on the binary
kernels, pad_values 0) to compute what larq-zoo's model computes; the builder
does that (`BiRealNet18(weights="larq_zoo")`, `from_larq_zoo`). This module
handles the file only and builds no network.
"""

import os
import re

import numpy as np


__all__ = ["CONVENTIONS", "FIXED", "WeightsUnavailableError", "assign_larq_zoo_weights",
           "load_larq_zoo_weights"]

# larq-zoo 2.4.0's BiRealNet: its release, files and SHA-256 (larq_zoo/literature/birealnet.py).
_RELEASE = ("birealnet", "v0.3.0")
_FILES = {
    True: ("birealnet_weights.h5",
           "6e6efac1584fcd60dd024198c87f42eb53b5ec719a5ca1f527e1fe7e8b997117"),
    False: ("birealnet_weights_notop.h5",
            "5148b61c0c2a1094bdef811f68bf4957d5ba5f83ad26437b7a4a6855441ab46b"),
}
# Arguments the weights fix (a caller may not set them otherwise) ...
FIXED = dict(padding="same", activation="binary", bn_epsilon=1e-3, pad_values=0.0,
             kernel_quantizer=None, block="bireal", binary_weights=True)
# ... and the defaults of larq-zoo's training that a caller may change (e.g. to finetune).
CONVENTIONS = dict(FIXED, bn_momentum=0.8, kernel_constraint="weight_clip")


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
            "path: bireal_tf.models.from_larq_zoo(path=...)."
        ) from e


# larq-zoo's Bi-Real-18 with its top holds 11,699,112 numbers in 100-odd layers; a file
# declaring more is not that file, and is refused before any of its data is read.
MAX_NUMBERS = 16_000_000
MAX_NAMES = 10_000


class _Unreadable(ValueError):
    """A weights file refused by `_read_h5`; the message names the file and the cause."""


def _read_h5(path):
    """[(layer name, [arrays])] of a Keras .h5 weights file, layers with weights, in order.

    The file is untrusted: every name must lead to a plain group or dataset in the
    file itself (no external or soft links, no external or virtual storage), each
    dataset must hold numbers, and all together at most MAX_NUMBERS of them, checked
    from the declared shapes before any data is read. Anything else is a ValueError
    naming the file and the cause.
    """
    import h5py

    def bad(cause):
        return _Unreadable(f"{path} is not a readable Keras .h5 weights file ({cause}).")

    def names(node, attr):
        values = node.attrs[attr]
        if isinstance(values, np.ndarray) and values.shape == (0,):
            return []  # Keras writes a layer without weights as an empty float array
        if not isinstance(values, np.ndarray) or values.ndim != 1 or values.dtype.kind not in "SUO":
            raise bad(f"attribute '{attr}' of '{node.name}' is not a list of names")
        if len(values) > MAX_NAMES:
            raise bad(f"attribute '{attr}' of '{node.name}' lists {len(values):,} names, more "
                      f"than the {MAX_NAMES:,} read")
        values = [v.decode() if isinstance(v, bytes) else v for v in values]
        if not all(isinstance(v, str) and v for v in values):
            raise bad(f"attribute '{attr}' of '{node.name}' is not a list of names")
        return values

    def member(group, name, kind):
        node = group
        for part in name.split("/"):
            link = node.get(part, getlink=True) if isinstance(node, h5py.Group) else None
            if not isinstance(link, h5py.HardLink):
                what = "missing" if link is None else f"a {type(link).__name__}, not in the file"
                raise bad(f"'{name}' under '{group.name}' is {what}")
            node = node[part]
        if not isinstance(node, kind):
            raise bad(f"'{node.name}' is a {type(node).__name__}, not a {kind.__name__}")
        return node

    try:
        with h5py.File(path, "r") as f:
            group = f["model_weights"] if "layer_names" not in f.attrs and "model_weights" in f else f
            datasets = []
            for name in names(group, "layer_names"):
                layer = member(group, name, h5py.Group)
                found = [member(layer, w, h5py.Dataset) for w in names(layer, "weight_names")]
                if found:
                    datasets.append((name, found))
            total = 0
            for _, found in datasets:
                for d in found:
                    if d.shape is None or d.dtype.kind not in "fiu":
                        raise bad(f"dataset '{d.name}' holds {d.dtype} {d.shape}, not numbers")
                    if d.external or d.is_virtual:
                        raise bad(f"dataset '{d.name}' keeps its data outside the file")
                    total += int(np.prod(d.shape, dtype=object))
            if total > MAX_NUMBERS:
                raise bad(f"it declares {total:,} numbers; larq-zoo's Bi-Real-18 has 11,699,112, "
                          f"and at most {MAX_NUMBERS:,} are read")
            return [(name, [np.asarray(d[()]) for d in found]) for name, found in datasets]
    except _Unreadable:
        raise
    except (OSError, KeyError, ValueError, TypeError, AttributeError, RuntimeError) as e:
        raise bad(f"{type(e).__name__}: {e}") from e


def _assign_in_order(layers, ours, path, what):
    """Set each of `ours` (Keras layers) to the next file layer's arrays, shapes checked first."""
    wrong = []
    for (name, arrays), layer in zip(layers, ours):
        shapes = [tuple(a.shape) for a in arrays]
        expected = [tuple(w.shape) for w in layer.weights]
        if shapes != expected:
            wrong.append(f"{name} {shapes} -> {layer.name} {expected}")
    if wrong:
        raise ValueError(f"{path} does not fit {what} (larq-zoo's take 3-channel inputs): "
                         + "; ".join(wrong))
    for (_, arrays), layer in zip(layers, ours):
        layer.set_weights(arrays)


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
    _assign_in_order(layers, ours, path, "our Bi-Real-18")


def assign_larq_zoo_weights(model, path=None, include_top=True):
    """Load larq-zoo's Bi-Real-18 weights into `model`, built in CONVENTIONS; returns the path.

    `path`: a larq-zoo `.h5` weights file (no network used); None fetches larq-zoo's
    published file (with or without the top) through larq-zoo's own download helper,
    which checks its SHA-256 and caches it.
    """
    path = _fetch(include_top) if path is None else str(path)
    _assign(model, _read_h5(path), path)
    return path


def load_larq_zoo_weights(model, path=None):
    """Copy larq-zoo's Bi-Real-18 weights into `model`, a Bi-Real-18 of any variant, layer for layer.

    The variants (activations, padding conventions) share the layers with weights and
    their order. The classifier `fc` is copied only when it has 1000 classes; otherwise
    it is left as it is. The weights were trained with BatchNorm epsilon 1e-3 and
    "same" padding; in a net built otherwise they are a starting point for training,
    not a finished net.

    Returns:
        A one-line summary of what was copied.
    """
    import tensorflow as tf

    fc = next((l for l in model.layers if l.name == "fc"), None)
    top = fc is not None and isinstance(fc, tf.keras.layers.Dense) and fc.units == 1000
    path = _fetch(top) if path is None else str(path)
    layers = _read_h5(path)
    if fc is not None and not top:
        if layers and len(layers[-1][1]) == 2 and layers[-1][1][0].ndim == 2:
            layers = layers[:-1]  # larq-zoo's 1000-class classifier does not fit
        ours = [layer for layer in model.layers if layer.weights and layer is not fc]
    else:
        ours = [layer for layer in model.layers if layer.weights]
    if len(layers) != len(ours):
        raise ValueError(
            f"larq-zoo's Bi-Real-18 weights do not fit model '{model.name}': {path} has "
            f"{len(layers)} layers with weights, the model {len(ours)} (a Bi-Real-18 has "
            f"{len(layers)})."
        )
    _assign_in_order(layers, ours, path, f"model '{model.name}'")
    kept = "" if top else " (fc left as it is: not 1000 classes)" if fc is not None else ""
    return f"larq-zoo's Bi-Real-18 weights: {len(ours)} layers copied{kept}"
