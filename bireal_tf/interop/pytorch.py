"""Map checkpoints of the authors' PyTorch code (liuzechun/Bi-Real-net) onto our Keras nets.

Our layer names are the authors' module paths with "." -> "_", so each Keras
weight has one PyTorch key:

    conv1.weight (O, I, kh, kw)           -> conv1 kernel (kh, kw, I, O)
    layer2.0.binary_conv.weights          -> layer2_0_binary_conv kernel: the 18/34 code keeps
        (O*I*3*3, 1), i.e. OIHW flattened     it flat; reshape to OIHW, then to HWIO
    layers.3.conv2.weight (OIHW)          -> layers_3_conv2 kernel (the 50-layer code)
    *.bn1.{weight, bias, running_mean, running_var} -> gamma, beta, moving_mean, moving_variance
    fc.weight (C, F), fc.bias             -> fc kernel (F, C), bias

`num_batches_tracked` is ignored, and so is `layers.0.down_conv1x1.weight` of the
50-layer code (its first block creates that conv but never uses it). The net is
built with `padding="symmetric"` and BatchNorm epsilon 1e-5, the authors' arithmetic.
"""

import importlib.util
import re
from collections import defaultdict
from pathlib import Path

import numpy as np

from bireal_tf.interop.torch_reader import CheckpointError, read_torch_checkpoint
from bireal_tf.utils import refuse_contradictions

__all__ = ["checkpoint_info", "from_pytorch", "load_checkpoint"]

_BLOCKS = {18: (4, 4, 4, 4), 34: (6, 8, 12, 6)}
_R50_BLOCKS = 16
# The authors' arithmetic; other values would not compute what the checkpoint was trained as.
_FIXED = dict(padding="symmetric", bn_epsilon=1e-5, pad_values=0.0, activation="binary",
              kernel_quantizer=None, weights=None)
_IGNORED = re.compile(r"(.*\.num_batches_tracked|layers\.0\.down_conv1x1\.weight)")


def _torch_module():
    return importlib.import_module("torch") if importlib.util.find_spec("torch") else None


def _to_numpy(key, value):
    if isinstance(value, np.ndarray):
        return value
    if hasattr(value, "detach") and hasattr(value, "numpy"):  # a torch tensor
        value = value.detach().cpu()
        if str(value.dtype) == "torch.bfloat16":
            value = value.float()
        return value.numpy()
    raise CheckpointError(f"state dict entry '{key}' is a {type(value).__name__}, not a tensor.")


def load_checkpoint(checkpoint, reader="auto"):
    """The state dict of `checkpoint` as {name: np.ndarray}, `module.` prefixes stripped.

    Args:
        checkpoint: a `.pth` / `.pth.tar` path, a dict with a "state_dict" entry (what
            the authors' train.py saves), or a state dict of tensors or arrays.
        reader: for paths: "torch" (`torch.load(..., weights_only=True)`), "restricted"
            (`read_torch_checkpoint`, no torch needed; zip and legacy formats) or "auto"
            (torch when installed).
    """
    if isinstance(checkpoint, (str, Path)):
        path = str(checkpoint)
        torch = _torch_module() if reader in ("auto", "torch") else None
        if reader == "torch" and torch is None:
            raise CheckpointError("reader='torch' needs torch installed.")
        if torch is None:
            checkpoint = read_torch_checkpoint(path)
        else:
            if not Path(path).is_file():
                raise CheckpointError(f"checkpoint {path} does not exist.")
            try:
                checkpoint = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as e:  # torch raises RuntimeError / UnpicklingError / EOFError
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                if "Unsupported global" in str(e) or "weights_only" in str(e).lower():
                    raise CheckpointError(
                        f"{path}: refused: torch.load(weights_only=True) found something other "
                        f"than tensors in it ({first[:300]}). Loading it otherwise could run code."
                    ) from e
                raise CheckpointError(
                    f"{path} is truncated or corrupt ({type(e).__name__}: {first[:300]})."
                ) from e
    if isinstance(checkpoint, dict) and "state_dict" in checkpoint:
        checkpoint = checkpoint["state_dict"]
    if not isinstance(checkpoint, dict):
        raise CheckpointError(
            f"expected a state dict (a dict of tensors), got {type(checkpoint).__name__}."
        )
    state = {}
    for key, value in checkpoint.items():
        if not isinstance(key, str):
            raise CheckpointError(f"state dict key {key!r} is not a string.")
        name = key[len("module."):] if key.startswith("module.") else key  # nn.DataParallel
        state[name] = _to_numpy(key, value)
    return state


def _guess_depth(keys):
    """(depth or None, description of the structure found) for a state dict's keys."""
    if any(k.startswith("layers.") for k in keys):
        blocks = {int(m.group(1)) for k in keys if (m := re.match(r"layers\.(\d+)\.", k))}
        if len(blocks) == _R50_BLOCKS:
            return 50, f"{len(blocks)} bottleneck blocks 'layers.0'..'layers.{max(blocks)}'"
        return None, f"{len(blocks)} blocks 'layers.N' (Bi-Real-50 has {_R50_BLOCKS})"
    stages = defaultdict(set)
    for k in keys:
        if m := re.match(r"layer([1-4])\.(\d+)\.", k):
            stages[int(m.group(1))].add(int(m.group(2)))
    counts = tuple(len(stages[s]) for s in (1, 2, 3, 4))
    binary = any(k.endswith("binary_conv.weights") for k in keys)
    for depth, blocks in _BLOCKS.items():
        if counts == blocks and binary:
            return depth, f"blocks per stage {counts}"
    kind = "binary convs 'binary_conv.weights'" if binary else "no 'binary_conv.weights' keys"
    return None, f"blocks per stage {counts} and {kind}"


def checkpoint_info(state):
    """What a state dict says about its network: depth (guessed), classes, input channels."""
    depth, structure = _guess_depth(state)
    fc = state.get("fc.weight")
    conv1 = state.get("conv1.weight")
    return dict(
        depth=depth,
        structure=structure,
        num_classes=None if fc is None or fc.ndim != 2 else int(fc.shape[0]),
        channels=None if conv1 is None or conv1.ndim != 4 else int(conv1.shape[1]),
    )


def _torch_prefix(layer_name):
    """Keras layer name -> the authors' module path."""
    for pattern, form in ((r"layer(\d)_(\d+)_(.+)", "layer{}.{}.{}"), (r"layers_(\d+)_(.+)", "layers.{}.{}")):
        m = re.fullmatch(pattern, layer_name)
        if m:
            *head, rest = m.groups()
            return form.format(*head, re.sub(r"^downsample_(\d)$", r"downsample.\1", rest))
    return layer_name


def _expected(model, depth):
    """[(keras layer, [(torch key, torch shape, to_keras)])] for every layer with weights."""
    import tensorflow as tf

    plan = []
    for layer in model.layers:
        if not layer.weights:
            continue
        prefix = _torch_prefix(layer.name)
        if isinstance(layer, tf.keras.layers.BatchNormalization):
            (c,) = layer.weights[0].shape
            plan.append((layer, [(f"{prefix}.{n}", (c,), lambda a: a)
                                 for n in ("weight", "bias", "running_mean", "running_var")]))
        elif isinstance(layer, tf.keras.layers.Dense):
            f, c = layer.kernel.shape
            plan.append((layer, [(f"{prefix}.weight", (c, f), lambda a: a.T),
                                 (f"{prefix}.bias", (c,), lambda a: a)]))
        elif isinstance(layer, tf.keras.layers.Conv2D):
            kh, kw, i, o = layer.kernel.shape
            if depth in _BLOCKS and layer.name.endswith("_binary_conv"):
                def flat(a, shape=(o, i, kh, kw)):
                    return a.reshape(shape).transpose(2, 3, 1, 0)
                plan.append((layer, [(f"{prefix}.weights", (o * i * kh * kw, 1), flat)]))
            else:
                plan.append((layer, [(f"{prefix}.weight", (o, i, kh, kw),
                                      lambda a: a.transpose(2, 3, 1, 0))]))
        else:
            raise TypeError(f"no PyTorch mapping for layer {layer.name} ({type(layer).__name__})")
    return plan


def from_pytorch(checkpoint, depth, **model_kwargs):
    """Our Bi-Real Net `depth` (18, 34, 50) with the weights of an authors' PyTorch checkpoint.

    Args:
        checkpoint: a `.pth` / `.pth.tar` path, a dict with "state_dict", or a state
            dict of tensors / NumPy arrays (see `load_checkpoint`; never runs code).
        depth: 18, 34 or 50; a checkpoint of another depth is refused, naming the
            depth it looks like.
        **model_kwargs: passed to `bireal_net` (input_shape, include_top,
            classifier_activation, pooling, ...). Defaults: the checkpoint's number
            of classes and input channels, 224x224 inputs, `padding="symmetric"`,
            BatchNorm epsilon 1e-5, pad_values 0 (values contradicting these are refused).

    Raises:
        CheckpointError: unreadable file, another depth, or missing keys, unexpected
            keys and shape mismatches (all of them, by name).
    """
    from bireal_tf.models import DEPTHS, bireal_net

    if depth not in DEPTHS:
        raise ValueError(f"depth must be one of {DEPTHS}, got {depth!r}.")
    refuse_contradictions(model_kwargs, _FIXED, "the authors' PyTorch weights")
    state = load_checkpoint(checkpoint)
    info = checkpoint_info(state)
    if info["depth"] is not None and info["depth"] != depth:
        raise CheckpointError(
            f"this checkpoint looks like Bi-Real Net {info['depth']} ({info['structure']}), "
            f"not {depth}: pass depth={info['depth']} (--depth {info['depth']})."
        )
    kwargs = dict(_FIXED, classifier_activation="softmax")
    include_top = model_kwargs.get("include_top", True)
    if include_top and info["num_classes"] is not None:
        if model_kwargs.get("num_classes", info["num_classes"]) != info["num_classes"]:
            raise ValueError(
                f"num_classes={model_kwargs['num_classes']} contradicts the checkpoint's "
                f"classifier fc.weight with {info['num_classes']} classes."
            )
        kwargs["num_classes"] = info["num_classes"]
    if "input_tensor" not in model_kwargs:
        kwargs["input_shape"] = (224, 224, info["channels"] or 3)
    kwargs.update(model_kwargs)
    model = bireal_net(depth, **kwargs)

    used, missing, mismatched, assignments = set(), [], [], []
    for layer, entries in _expected(model, depth):
        values = []
        for key, shape, to_keras in entries:
            if key not in state:
                missing.append(key)
                continue
            used.add(key)
            array = state[key]
            if tuple(array.shape) != shape or not np.issubdtype(array.dtype, np.floating):
                mismatched.append(f"{key}: checkpoint {tuple(array.shape)} {array.dtype}, "
                                  f"expected {shape} float for Keras layer '{layer.name}'")
                continue
            values.append(to_keras(array.astype(np.float32)))
        if len(values) == len(entries):
            assignments.append((layer, values))
    ignored = {k for k in state if _IGNORED.fullmatch(k)}
    if not include_top:
        ignored |= {"fc.weight", "fc.bias"}
    unexpected = sorted(set(state) - used - ignored)
    if missing or unexpected or mismatched:
        lines = [f"the checkpoint does not fit Bi-Real Net {depth}"
                 + ("" if info["depth"] else f" (found {info['structure']})") + ":"]
        for title, items in (("missing keys", missing), ("unexpected keys", unexpected),
                             ("shape mismatches", mismatched)):
            if items:
                lines.append(f"  {len(items)} {title}: " + ", ".join(items))
        raise CheckpointError("\n".join(lines))
    for layer, values in assignments:
        layer.set_weights(values)
    return model
