"""Bi-Real Net 18 / 34 / 50 as Keras functional models built from Larq layers.

The structure and the layer names follow the authors' PyTorch code (module path
with "." -> "_": `conv1`, `layer2_0_binary_conv`, `layer2_0_downsample_1`,
`layers_3_conv2`, `fc`, ...), so a reference checkpoint maps one to one.

Shapes for a 224x224 input:

    stem   7x7/2 conv -> BN -> 3x3/2 max pool           112 -> 56
    stage1 (64 | 256 for 50)      stride 1              56
    stage2 (128 | 512)            first block stride 2  28
    stage3 (256 | 1024)           first block stride 2  14
    stage4 (512 | 2048)           first block stride 2  7
    head   global average pool -> fc(num_classes)

Options shared by the three networks:

- `activation`: "binary" (the paper's network: ApproxSign inputs, magnitude-
  aware weights) or "relu" / "leaky_clip" / "clip": the same network with real
  weights and that activation before each of those convs. All variants have the
  same layer names and weights, so weights of one load into another.
- `padding`: "same" (TF's convention; larq-zoo's weights) or "symmetric" (the
  authors' PyTorch arithmetic at every stride-2 layer, for their checkpoints).
- `pad_values`: what binary convs pad their binarized input with: 0.0 (the
  authors) or 1.0 (LCE's faster kernels on device).
- `block` (18 and 34 layers): "bireal", or "react" for ReActNet's block on the
  same structure (Liu et al., ECCV 2020; their resnet/2_step2/birealnet.py):

      y = BN(BinConv3x3(sign(x + move0))) + shortcut(x)
      out = PReLU_c(y + move1) + move2          (RPReLU; move*: LearnableBias)

  with the binary weights' clip STE unscaled (`MagnitudeAwareSign(scale_gradient=False)`).
- `binary_weights=False`: binary activations with real-valued weights in the same
  convs, ReActNet's first training step.
"""

import dataclasses
import functools

import larq as lq
import tensorflow as tf

from bireal_tf import quantizers
from bireal_tf.models import larq_zoo
from bireal_tf.models.layers import (ConstantPadding2D, LearnableBias, Subsample2D,
                                     TorchConvPadding2D)
from bireal_tf.utils import quiet_larq, refuse_contradictions

ACTIVATIONS = ("binary",) + tuple(quantizers.REAL_ACTIVATIONS)
PADDINGS = ("same", "symmetric")
BLOCKS = ("bireal", "react")
MIN_INPUT_SIZE = 32  # five stride-2 steps: 32 px leave a 1x1 map before the pool


@dataclasses.dataclass(frozen=True)
class _Architecture:
    """What sets one depth apart from the others."""

    blocks_per_stage: tuple
    widths: tuple  # output channels of the four stages
    bottleneck: bool  # 1x1-3x3-1x1 two-stream blocks; else one binary 3x3 per block
    summary: str  # the first line of the builder's docstring


_ARCHITECTURES = {
    18: _Architecture((4, 4, 4, 4), (64, 128, 256, 512), False,
                      "Bi-Real Net 18: 16 binary 3x3 convs in [4, 4, 4, 4] blocks."),
    34: _Architecture((6, 8, 12, 6), (64, 128, 256, 512), False,
                      "Bi-Real Net 34: 32 binary 3x3 convs in [6, 8, 12, 6] blocks."),
    50: _Architecture((3, 4, 6, 3), (256, 512, 1024, 2048), True,
                      "Bi-Real Net 50: 47 binary convs (1x1, 3x3, 1x1) in [3, 4, 6, 3] "
                      "two-stream bottleneck blocks."),
}
DEPTHS = tuple(_ARCHITECTURES)

_layers = tf.keras.layers


@dataclasses.dataclass(frozen=True)
class _Ops:
    """One network's options, with the layer factories that use them, so each
    architecture reads plainly."""

    activation: str = "binary"
    block: str = "bireal"
    binary_weights: bool = True
    padding: str = "same"
    pad_values: float = 0.0
    bn_epsilon: float = 1e-5
    bn_momentum: float = 0.9
    kernel_quantizer: object = None
    kernel_constraint: object = None
    kernel_initializer: object = "glorot_normal"

    def new_kernel_quantizer(self):
        """One quantizer object per conv, so per-layer state (Larq metrics) stays apart."""
        q = self.kernel_quantizer
        if not self.binary_weights:
            return None  # real-valued weights (ReActNet's step 1)
        if q is None:  # ReActNet's HardBinaryConv: the clip STE without the scale
            return quantizers.MagnitudeAwareSign(scale_gradient=self.block != "react")
        if isinstance(q, tf.keras.layers.Layer):
            return q.__class__.from_config(q.get_config())
        return q  # a string alias or a plain function: Larq resolves it per layer

    @property
    def binary(self):
        return self.activation == "binary"

    @property
    def react(self):
        return self.block == "react"

    def shift(self, x, name):
        """ReActNet's learnable per-channel shift (`move0`, `move1`, `move2`)."""
        return LearnableBias(name=name)(x)

    def rprelu(self, x, name):
        """ReActNet's RPReLU after the residual add: move1 -> PReLU (per channel) -> move2.

        torch's nn.PReLU(C) starts every slope at 0.25; so does this one.
        """
        x = self.shift(x, name + "_move1")
        x = _layers.PReLU(alpha_initializer=tf.keras.initializers.Constant(0.25),
                          shared_axes=[1, 2], name=name + "_prelu")(x)
        return self.shift(x, name + "_move2")

    def bn(self, x, name):
        return _layers.BatchNormalization(
            momentum=self.bn_momentum, epsilon=self.bn_epsilon, name=name
        )(x)

    def real_conv(self, x, filters, kernel_size, name, strides=1, padding="valid"):
        """A real-valued conv without bias (stem, shortcuts, R50's first 1x1)."""
        return _layers.Conv2D(
            filters,
            kernel_size,
            strides=strides,
            padding=padding,
            use_bias=False,
            kernel_initializer=self.kernel_initializer,
            name=name,
        )(x)

    def stem(self, x):
        """7x7/2 conv (64) -> BN -> 3x3/2 max pool, in the chosen padding convention."""
        if self.padding == "symmetric":
            x = TorchConvPadding2D(3, kernel_size=7, strides=2, name="conv1_pad")(x)
            x = self.real_conv(x, 64, 7, "conv1", strides=2)
        else:
            x = self.real_conv(x, 64, 7, "conv1", strides=2, padding="same")
        x = self.bn(x, "bn1")
        if self.padding == "symmetric":
            x = ConstantPadding2D(1, value=None, name="maxpool_pad")(x)
            return _layers.MaxPool2D(3, strides=2, padding="valid", name="maxpool")(x)
        return _layers.MaxPool2D(3, strides=2, padding="same", name="maxpool")(x)

    def block_conv(self, x, filters, kernel_size, strides, name):
        """The conv each shortcut bypasses: binary, or real after a real activation.

        Binary: QuantConv2D(ApproxSign input, magnitude-aware kernel). A stride-2
        binary conv in "symmetric" mode is a stride-1 "same" conv + subsampling,
        which is exact and stays binary in LCE.
        """
        subsample = strides == 2 and self.padding == "symmetric" and kernel_size > 1
        if self.binary:
            with quiet_larq():  # the authors' binary kernels have no constraint
                conv = lq.layers.QuantConv2D(
                    filters,
                    kernel_size,
                    strides=1 if subsample else strides,
                    padding="same" if kernel_size > 1 else "valid",
                    pad_values=self.pad_values,
                    input_quantizer=quantizers.ApproxSign(),
                    kernel_quantizer=self.new_kernel_quantizer(),
                    kernel_constraint=self.kernel_constraint,
                    kernel_initializer=self.kernel_initializer,
                    use_bias=False,
                    name=name,
                )
            y = conv(x)
            return Subsample2D(2, name=name + "_subsample")(y) if subsample else y

        x = quantizers.REAL_ACTIVATIONS[self.activation](name=name + "_activation")(x)
        if subsample:
            x = TorchConvPadding2D(kernel_size // 2, kernel_size, strides, name=name + "_pad")(x)
            return self.real_conv(x, filters, kernel_size, name, strides=strides)
        padding = "same" if kernel_size > 1 else "valid"
        return self.real_conv(x, filters, kernel_size, name, strides=strides, padding=padding)

    def avg_pool(self, x, name):
        # On even sizes "same" equals PyTorch's AvgPool2d(2, 2); on odd sizes it keeps
        # the shape of the strided conv beside it, where PyTorch would fail.
        return _layers.AveragePooling2D(2, strides=2, padding="same", name=name)(x)


def _check_args(activation, padding, num_classes, include_top, input_shape, pooling, block):
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}.")
    if block not in BLOCKS:
        raise ValueError(f"block must be one of {BLOCKS}, got {block!r}.")
    if padding not in PADDINGS:
        raise ValueError(f"padding must be one of {PADDINGS}, got {padding!r}.")
    if include_top and (not isinstance(num_classes, int) or num_classes < 1):
        raise ValueError(f"num_classes must be an integer >= 1, got {num_classes!r}.")
    if pooling not in (None, "avg", "max"):
        raise ValueError(f"pooling must be one of (None, 'avg', 'max'), got {pooling!r}.")
    if input_shape is not None:
        if len(input_shape) != 3:
            raise ValueError(f"input_shape must be (height, width, channels), got {input_shape}.")
        for side in input_shape[:2]:
            if side is not None and side < MIN_INPUT_SIZE:
                raise ValueError(
                    f"input_shape {tuple(input_shape)} is too small: Bi-Real Net downsamples "
                    f"by 32, so height and width must be at least {MIN_INPUT_SIZE} "
                    f"(allowed: None or >= {MIN_INPUT_SIZE})."
                )


def _basic_stages(ops, x, architecture):
    """Stages of the 18/34-layer nets: y = BN(BinConv3x3(sign(x))) + shortcut(x);
    with ReActNet's block, sign(x + move0) and RPReLU after the add."""
    in_filters = 64
    for stage, (blocks, filters) in enumerate(zip(architecture.blocks_per_stage,
                                                  architecture.widths)):
        for block in range(blocks):
            name = f"layer{stage + 1}_{block}"
            strides = 2 if (stage > 0 and block == 0) else 1
            shortcut = x
            if strides != 1 or in_filters != filters:
                # Created before the main path, in larq-zoo's order, so the layer
                # lists of the two implementations line up one to one.
                shortcut = ops.avg_pool(x, f"{name}_downsample_0")
                shortcut = ops.real_conv(shortcut, filters, 1, f"{name}_downsample_1")
                shortcut = ops.bn(shortcut, f"{name}_downsample_2")
            y = ops.shift(x, f"{name}_move0") if ops.react else x
            y = ops.block_conv(y, filters, 3, strides, f"{name}_binary_conv")
            y = ops.bn(y, f"{name}_bn1")
            x = _layers.Add(name=f"{name}_add")([y, shortcut])
            if ops.react:
                x = ops.rprelu(x, name)
            in_filters = filters
    return x


def _bottleneck_stages(ops, x, architecture):
    """Stages of the 50-layer net: bottleneck blocks carrying two streams.

    Each block takes (mid, out) = (previous 3x3 output, previous block output),
    and every one of its three convs is bypassed by its own shortcut:

        out1 = BN(conv1x1(sign(out)))  + mid         (mid via a real 1x1 when widths change)
        out2 = BN(conv3x3/s(sign(out1))) + out1      (out1 average-pooled when strided)
        out3 = BN(conv1x1(sign(out2))) + out         (out via avgpool-1x1-BN when shape changes)

    The network's first block instead has a real 1x1 conv after leaky-clip and no
    shortcut around it.
    """
    mid, out = x, x
    index = 0
    for stage, (blocks, filters) in enumerate(zip(architecture.blocks_per_stage,
                                                  architecture.widths)):
        inner = filters // 4
        for block in range(blocks):
            name = f"layers_{index}"
            strides = 2 if (stage > 0 and block == 0) else 1
            first = index == 0
            reshape = block == 0

            if first:
                act = "leaky_clip" if ops.binary else ops.activation
                y = quantizers.REAL_ACTIVATIONS[act](name=f"{name}_conv1_activation")(out)
                y = ops.real_conv(y, inner, 1, f"{name}_conv1")
                out1 = ops.bn(y, f"{name}_bn1")
            else:
                y = ops.block_conv(out, inner, 1, 1, f"{name}_conv1")
                y = ops.bn(y, f"{name}_bn1")
                shortcut = mid
                if reshape:
                    shortcut = ops.real_conv(mid, inner, 1, f"{name}_down_conv1x1")
                out1 = _layers.Add(name=f"{name}_add1")([y, shortcut])

            y = ops.block_conv(out1, inner, 3, strides, f"{name}_conv2")
            y = ops.bn(y, f"{name}_bn2")
            shortcut = ops.avg_pool(out1, f"{name}_pooling") if strides == 2 else out1
            out2 = _layers.Add(name=f"{name}_add2")([y, shortcut])

            y = ops.block_conv(out2, filters, 1, 1, f"{name}_conv3")
            y = ops.bn(y, f"{name}_bn3")
            shortcut = out
            if reshape:
                if strides == 2:
                    shortcut = ops.avg_pool(shortcut, f"{name}_downsample_0")
                shortcut = ops.real_conv(shortcut, filters, 1, f"{name}_downsample_1")
                shortcut = ops.bn(shortcut, f"{name}_downsample_2")
            out3 = _layers.Add(name=f"{name}_add3")([y, shortcut])

            mid, out = out2, out3
            index += 1
    return out


def bireal_net(depth, input_shape=None, input_tensor=None, num_classes=1000, include_top=True,
               weights=None, pooling=None, classifier_activation="softmax", *,
               activation="binary", padding="same", pad_values=0.0, bn_epsilon=1e-5,
               bn_momentum=0.9, kernel_quantizer=None, kernel_constraint=None,
               kernel_initializer="glorot_normal", block="bireal", binary_weights=True):
    """Bi-Real Net of `depth` layers (18, 34 or 50): input -> stem -> four stages -> head.

    `BiRealNet18`, `BiRealNet34` and `BiRealNet50` are this function with the depth given.

    Args:
        depth: 18, 34 or 50 (DEPTHS).
        input_shape: (height, width, channels); height and width None or >= 32.
            Default (224, 224, 3) when `input_tensor` is not given.
        input_tensor: optional Keras tensor to build the model on.
        num_classes: number of classes of the top (>= 1).
        include_top: whether to add global average pooling and the `fc` layer.
        weights: None (random init), the path of a weights file to load, or (18 layers
            only) "larq_zoo": larq-zoo's ImageNet weights (`from_larq_zoo`),
            in larq-zoo's conventions (BatchNorm epsilon 1e-3 and momentum 0.8, weight_clip
            on the binary kernels, whatever is passed for those); padding, activation,
            pad_values or num_classes that contradict the weights are refused.
        pooling: without the top, None (feature map), "avg" or "max".
        classifier_activation: activation of the top ("softmax", or None for logits).
        activation: "binary", or "relu" / "leaky_clip" / "clip" for the real variants.
        padding: "same" (TF) or "symmetric" (the authors' PyTorch arithmetic).
        pad_values: padding value of the binarized inputs, 0.0 or 1.0.
        bn_epsilon, bn_momentum: BatchNorm settings; the authors' 1e-5 and 0.9
            (torch's 0.1) by default; larq-zoo uses 1e-3 and 0.8.
        kernel_quantizer: weight quantizer of the binary convs; default
            `MagnitudeAwareSign()` (`scale_gradient=False` with block="react"). The
            BatchNorm-retrain stage passes "ste_sign".
        block: "bireal", or "react" (18 and 34 layers): ReActNet's learnable shifts
            before the sign and RPReLU after the residual add.
        binary_weights: False keeps the binary convs' weights real-valued (binary
            activations only: ReActNet's first step).
        kernel_constraint: constraint of the binary kernels; None as the authors
            (their gradient is zero outside [-1, 1]), "weight_clip" as larq-zoo.
        kernel_initializer: initializer of every conv kernel.
    Returns:
        A `tf.keras.Model`.
    """
    if depth not in _ARCHITECTURES:
        raise ValueError(f"depth must be one of {DEPTHS}, got {depth!r}.")
    options = dict(activation=activation, padding=padding, pad_values=pad_values,
                   bn_epsilon=bn_epsilon, bn_momentum=bn_momentum,
                   kernel_quantizer=kernel_quantizer, kernel_constraint=kernel_constraint,
                   kernel_initializer=kernel_initializer, block=block,
                   binary_weights=binary_weights)  # _Ops' fields
    if weights == "larq_zoo" and depth == 18:
        # larq-zoo's BatchNorm and weight clip, whatever is passed for those (documented)
        for name in ("bn_epsilon", "bn_momentum", "kernel_constraint"):
            del options[name]
        return from_larq_zoo(None, include_top, input_shape=input_shape,
                             input_tensor=input_tensor, num_classes=num_classes, pooling=pooling,
                             classifier_activation=classifier_activation, **options)
    architecture = _ARCHITECTURES[depth]
    ops = _Ops(**options)
    if input_shape is None and input_tensor is None:
        input_shape = (224, 224, 3)
    _check_args(ops.activation, ops.padding, num_classes, include_top, input_shape, pooling,
                ops.block)
    if weights == "larq_zoo":
        raise ValueError(
            "weights='larq_zoo' exists for the 18-layer net only (larq-zoo publishes Bi-Real-18); "
            "use BiRealNet18(weights='larq_zoo') or bireal_tf.models.from_larq_zoo()."
        )
    if weights is not None and (not isinstance(weights, str) or weights == "imagenet"):
        raise ValueError(
            "weights must be None, 'larq_zoo' (Bi-Real-18 only) or the path to a weights "
            f"file (.h5 or TF checkpoint); got {weights!r}. For PyTorch checkpoints of the "
            "authors' code use bireal_tf.interop.from_pytorch."
        )
    if ops.react and architecture.bottleneck:
        raise ValueError(
            "block='react' exists for Bi-Real Net 18 and 34 only: ReActNet published its "
            "block on the 18/34-layer structure and no 50-layer version. "
            "Use BiRealNet18/34(block='react'), or block='bireal' for 50.")

    inputs = _layers.Input(shape=input_shape) if input_tensor is None else input_tensor
    stages = _bottleneck_stages if architecture.bottleneck else _basic_stages
    x = stages(ops, ops.stem(inputs), architecture)

    if include_top:
        x = _layers.GlobalAveragePooling2D(name="avgpool")(x)
        x = _layers.Dense(num_classes, kernel_initializer="glorot_normal", name="fc")(x)
        # float32 output keeps softmax/logits stable under mixed precision.
        x = _layers.Activation(
            classifier_activation or "linear", dtype="float32", name="predictions"
        )(x)
    elif pooling == "avg":
        x = _layers.GlobalAveragePooling2D(name="avgpool")(x)
    elif pooling == "max":
        x = _layers.GlobalMaxPooling2D(name="maxpool_top")(x)

    if input_tensor is not None:
        inputs = tf.keras.utils.get_source_inputs(input_tensor)
    suffix = ("_react" if ops.react else "") + ("" if ops.binary_weights else "_real_weights")
    suffix += "" if ops.activation == "binary" else f"_{ops.activation}"
    model = tf.keras.Model(inputs, x, name=f"birealnet{depth}{suffix}")
    if weights is not None:
        with quantizers.custom_objects():
            model.load_weights(weights)
    return model


def _with_depth(depth):
    """`bireal_net` with the depth given: the builder Keras Applications would name."""
    builder = functools.partial(bireal_net, depth)
    builder.__name__ = f"BiRealNet{depth}"
    builder.__doc__ = (_ARCHITECTURES[depth].summary
                       + " Arguments: those of `bireal_net` but the depth.")
    return builder


BiRealNet18 = _with_depth(18)
BiRealNet34 = _with_depth(34)
BiRealNet50 = _with_depth(50)


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
    refuse_contradictions(model_kwargs, larq_zoo.FIXED, "larq-zoo's Bi-Real-18 weights")
    if include_top and model_kwargs.get("num_classes", 1000) != 1000:
        raise ValueError(
            f"num_classes={model_kwargs['num_classes']} contradicts larq-zoo's weights with "
            "the top (1000 ImageNet classes); use include_top=False and add your own classifier."
        )
    kwargs = dict(larq_zoo.CONVENTIONS, num_classes=1000)
    kwargs.update(model_kwargs, include_top=include_top, weights=None)
    model = BiRealNet18(**kwargs)
    larq_zoo.assign_larq_zoo_weights(model, path, include_top)
    return model


def binary_conv_layers(model):
    """The layers of `model` that are binary convs: Larq convs with both quantizers set."""
    found = []
    for layer in model.layers:
        if isinstance(layer, tf.keras.Model):
            found.extend(binary_conv_layers(layer))
        elif isinstance(layer, lq.layers.QuantConv2D) and (
            layer.input_quantizer is not None and layer.kernel_quantizer is not None
        ):
            found.append(layer)
    return found


def batchnorm_layers(model):
    """Every BatchNormalization layer in `model`, nested ones included."""
    return [m for m in model.submodules if isinstance(m, tf.keras.layers.BatchNormalization)]
