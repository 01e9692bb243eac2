"""Map checkpoints of the authors' PyTorch code onto our Keras nets.

Two codebases of the same authors, told apart by their keys:

- Bi-Real Net (liuzechun/Bi-Real-net, 18/34/50): `arch="bireal"`;
- ReActNet on the Bi-Real 18/34 structure (liuzechun/ReActNet, resnet/1_step1 and
  resnet/2_step2/birealnet.py): `arch="reactnet"`, built with `block="react"`.

Our layer names are the authors' module paths with "." -> "_", so each Keras
weight has one PyTorch key:

    conv1.weight (O, I, kh, kw)           -> conv1 kernel (kh, kw, I, O)
    layer2.0.binary_conv.weights          -> layer2_0_binary_conv kernel: Bi-Real's 18/34 code
        (O*I*3*3, 1), i.e. OIHW flattened     keeps it flat; reshape to OIHW, then to HWIO
    layer2.0.binary_conv.weight (OIHW)    -> layer2_0_binary_conv kernel (ReActNet, both steps)
    layers.3.conv2.weight (OIHW)          -> layers_3_conv2 kernel (Bi-Real's 50-layer code)
    *.bn1.{weight, bias, running_mean, running_var} -> gamma, beta, moving_mean, moving_variance
    layer2.0.move0.bias (1, C, 1, 1)      -> layer2_0_move0 bias (C,)       (ReActNet's shifts,
    layer2.0.prelu.weight (C,)            -> layer2_0_prelu alpha (1, 1, C)  move0/1/2, and PReLU)
    fc.weight (C, F), fc.bias             -> fc kernel (F, C), bias

`num_batches_tracked` is ignored, and so is `layers.0.down_conv1x1.weight` of the
50-layer code (its first block creates that conv but never uses it). The net is
built with `padding="symmetric"`, BatchNorm epsilon 1e-5 and pad_values 0, the
authors' arithmetic.
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
ARCHS = ("bireal", "reactnet", "auto")
# What each file's keys show: ReActNet's shifts and PReLU slopes; Bi-Real's flat 18/34
# binary kernels or its 50-layer blocks. (ReActNet's binary kernels are OIHW `weight`.)
_SIGNS = {
    "reactnet": (re.compile(r"layer\d\.\d+\.(move[012]\.bias|prelu\.weight)"),
                 "ReActNet's shifts and PReLU slopes"),
    "bireal": (re.compile(r"layer\d\.\d+\.binary_conv\.weights|layers\.\d+\..+"),
               "Bi-Real's flat binary kernels or 50-layer blocks"),
}
_TITLES = {"bireal": "Bi-Real Net", "reactnet": "ReActNet"}
_FLAGS = {"bireal": "arch='bireal' (--arch bireal)",
          "reactnet": "arch='reactnet' (--arch reactnet; step=1, --step 1, for a step-1 file)"}


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
    binary = any(re.search(r"\.binary_conv\.weights?$", k) for k in keys)
    for depth, blocks in _BLOCKS.items():
        if counts == blocks and binary:
            return depth, f"blocks per stage {counts}"
    kind = "binary convs 'binary_conv.weight(s)'" if binary else "no 'binary_conv' keys"
    return None, f"blocks per stage {counts} and {kind}"


def _guess_arch(keys):
    """("reactnet" | "bireal" | None, the keys that tell) for a state dict's keys."""
    for arch, (pattern, what) in _SIGNS.items():
        found = sorted(k for k in keys if pattern.fullmatch(k))
        if found:
            return arch, f"{len(found)} keys of {what}, such as '{found[0]}'"
    return None, ("neither ReActNet's 'move0.bias' / 'prelu.weight' nor Bi-Real's flat "
                  "'binary_conv.weights'")


def net_name(arch, depth):
    """How messages name the network: "Bi-Real Net 18", "ReActNet-18 (Bi-Real structure)"."""
    return f"ReActNet-{depth} (Bi-Real structure)" if arch == "reactnet" else f"Bi-Real Net {depth}"


def checkpoint_info(state):
    """What a state dict says about its network: architecture and depth (guessed from the
    keys), classes, input channels."""
    arch, evidence = _guess_arch(state)
    depth, structure = _guess_depth(state)
    fc = state.get("fc.weight")
    conv1 = state.get("conv1.weight")
    return dict(
        arch=arch,
        evidence=evidence,
        depth=depth,
        structure=structure,
        num_classes=None if fc is None or fc.ndim != 2 else int(fc.shape[0]),
        channels=None if conv1 is None or conv1.ndim != 4 else int(conv1.shape[1]),
    )


def _resolve_arch(arch, info):
    """The architecture to build: `arch`, checked against what the keys say."""
    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}.")
    found = info["arch"]
    if arch == "auto":
        if found is None:
            raise CheckpointError(
                f"cannot tell the architecture from the checkpoint's keys ({info['evidence']}): "
                f"pass {_FLAGS['bireal']} or {_FLAGS['reactnet']}.")
        return found
    if found is not None and found != arch:
        raise CheckpointError(
            f"this is a {_TITLES[found]} checkpoint ({info['evidence']}), not a "
            f"{_TITLES[arch]} one: pass {_FLAGS[found]}, or arch='auto' (--arch auto).")
    return arch


def _torch_prefix(layer_name):
    """Keras layer name -> the authors' module path."""
    for pattern, form in ((r"layer(\d)_(\d+)_(.+)", "layer{}.{}.{}"), (r"layers_(\d+)_(.+)", "layers.{}.{}")):
        m = re.fullmatch(pattern, layer_name)
        if m:
            *head, rest = m.groups()
            return form.format(*head, re.sub(r"^downsample_(\d)$", r"downsample.\1", rest))
    return layer_name


def _same(a):
    return a


def _oihw_to_hwio(a):
    return a.transpose(2, 3, 1, 0)


def _expected(model, flat_binary):
    """[(keras layer, [(torch key, torch shape, to_keras)])] for every layer with weights.

    flat_binary: the binary kernels are Bi-Real's flat (O*I*k*k, 1) `weights`.
    """
    import tensorflow as tf

    from bireal_tf.models import LearnableBias

    plan = []
    for layer in model.layers:
        if not layer.weights:
            continue
        prefix = _torch_prefix(layer.name)
        if isinstance(layer, tf.keras.layers.BatchNormalization):
            (c,) = layer.weights[0].shape
            plan.append((layer, [(f"{prefix}.{n}", (c,), _same)
                                 for n in ("weight", "bias", "running_mean", "running_var")]))
        elif isinstance(layer, tf.keras.layers.Dense):
            f, c = layer.kernel.shape
            plan.append((layer, [(f"{prefix}.weight", (c, f), lambda a: a.T),
                                 (f"{prefix}.bias", (c,), _same)]))
        elif isinstance(layer, LearnableBias):  # torch keeps the shift as (1, C, 1, 1)
            (c,) = layer.bias.shape
            plan.append((layer, [(f"{prefix}.bias", (1, c, 1, 1), lambda a, c=c: a.reshape(c))]))
        elif isinstance(layer, tf.keras.layers.PReLU):  # slopes (C,) -> alpha (1, 1, C)
            shape = tuple(layer.alpha.shape)
            plan.append((layer, [(f"{prefix}.weight", (shape[-1],),
                                  lambda a, shape=shape: a.reshape(shape))]))
        elif isinstance(layer, tf.keras.layers.Conv2D):
            kh, kw, i, o = layer.kernel.shape
            if flat_binary and layer.name.endswith("_binary_conv"):
                def flat(a, shape=(o, i, kh, kw)):
                    return _oihw_to_hwio(a.reshape(shape))
                plan.append((layer, [(f"{prefix}.weights", (o * i * kh * kw, 1), flat)]))
            else:
                plan.append((layer, [(f"{prefix}.weight", (o, i, kh, kw), _oihw_to_hwio)]))
        else:
            raise TypeError(f"no PyTorch mapping for layer {layer.name} ({type(layer).__name__})")
    return plan


def from_pytorch(checkpoint, depth, arch="bireal", step=2, **model_kwargs):
    """Our Bi-Real Net `depth` with the weights of an authors' PyTorch checkpoint.

    Args:
        checkpoint: a `.pth` / `.pth.tar` path, a dict with "state_dict", or a state
            dict of tensors / NumPy arrays (see `load_checkpoint`; never runs code).
        depth: 18, 34 or 50 (ReActNet: 18 or 34); a checkpoint of another depth is
            refused, naming the depth it looks like.
        arch: "bireal" (liuzechun/Bi-Real-net), "reactnet" (liuzechun/ReActNet's
            Bi-Real-based net, built with `block="react"`) or "auto" (told from the
            keys). A checkpoint of the other architecture is refused, naming it.
        step: ReActNet's training step the checkpoint comes from: 2 (binary weights,
            the published model) or 1 (binary activations, real 3x3 weights: built
            with `binary_weights=False`). The keys of the two steps are the same.
        **model_kwargs: passed to `bireal_net` (input_shape, include_top,
            classifier_activation, pooling, ...). Defaults: the checkpoint's number
            of classes and input channels, 224x224 inputs, `padding="symmetric"`,
            BatchNorm epsilon 1e-5, pad_values 0 (values contradicting these are refused).

    Raises:
        CheckpointError: unreadable file, the other architecture, another depth, or
            missing keys, unexpected keys and shape mismatches (all of them, by name).
    """
    from bireal_tf.models import DEPTHS, bireal_net

    if depth not in DEPTHS:
        raise ValueError(f"depth must be one of {DEPTHS}, got {depth!r}.")
    if step not in (1, 2):
        raise ValueError(f"step must be 1 or 2 (ReActNet's training steps), got {step!r}.")
    state = load_checkpoint(checkpoint)
    info = checkpoint_info(state)
    arch = _resolve_arch(arch, info)
    if arch == "bireal" and step != 2:
        raise ValueError("step=1 is ReActNet's first training step; a Bi-Real Net checkpoint "
                         "has no steps: leave step out.")
    if arch == "reactnet" and depth not in _BLOCKS:
        raise ValueError(f"ReActNet's Bi-Real-based code has 18 and 34 layers, not {depth}.")
    fixed = dict(_FIXED, block="react" if arch == "reactnet" else "bireal",
                 binary_weights=step == 2)
    refuse_contradictions(model_kwargs, fixed, f"the weights of {net_name(arch, depth)}")
    if info["depth"] is not None and info["depth"] != depth:
        raise CheckpointError(
            f"this checkpoint looks like {net_name(arch, info['depth'])} ({info['structure']}), "
            f"not {depth}: pass depth={info['depth']} (--depth {info['depth']})."
        )
    kwargs = dict(fixed, classifier_activation="softmax")
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
    for layer, entries in _expected(model, flat_binary=arch == "bireal" and depth in _BLOCKS):
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
        lines = [f"the checkpoint does not fit {net_name(arch, depth)}"
                 + ("" if info["depth"] else f" (found {info['structure']})") + ":"]
        for title, items in (("missing keys", missing), ("unexpected keys", unexpected),
                             ("shape mismatches", mismatched)):
            if items:
                lines.append(f"  {len(items)} {title}: " + ", ".join(items))
        raise CheckpointError("\n".join(lines))
    for layer, values in assignments:
        layer.set_weights(values)
    return model
