"""The checks of an export: binary convs that stayed float, LCE's zero-padding hazard, parity.

Parity in a binary network: an activation within float rounding of zero can
binarize to +1 in Keras and -1 in LCE (which folds BatchNorm into the conv), and
the flip spreads to the outputs. So each input is judged on its own, and an input
that differs is evidence of a fault only if it is *clear* of the sign threshold:
every pre-sign activation at least `sign_margin` x its layer's max away from zero
(`sign_margins`), the margin widened where BatchNorm cancels a large offset
(`batchnorm_cancellation`). A conversion fault moves every input, clear ones included.
"""

import math
from collections import Counter
from dataclasses import dataclass

import numpy as np

from bireal_tf.export.flatbuffer import TFLiteGraph, unpack_bconv_filter
from bireal_tf.export.report import Int8Check, ParityCheck
from bireal_tf.export.runtime import TFLiteRunner
from bireal_tf.models import batchnorm_layers, binary_conv_layers
from bireal_tf.models.int8 import fake_quant_layers

__all__ = ["ParitySettings", "batchnorm_affine", "batchnorm_cancellation", "compare_outputs",
           "find_by_signs", "float_binary_convs", "int8_check", "kernel_signs",
           "lce_zero_padding_hazards", "quantized_kernel", "sign_margins"]


@dataclass(frozen=True)
class ParitySettings:
    """How the .tflite is compared with Keras (docs/export_report_schema.md, `parity`).

    An input agrees when max |keras - tflite| <= atol + rtol * max |keras outputs|.
    Without sample inputs, `samples` random normal inputs (seeded); with `pool` > 1,
    the `samples` of `pool` x as many whose pre-sign activations are furthest from zero.
    A model with fake-quant ops (int8) is judged by top-1 agreement instead (at least
    `int8_min_top1`): TFLite rounds the weights to int8 and rescales in integers, so
    activations differ from Keras by a step here and there, and a step across zero
    flips a binary activation, which spreads. Measured on the 2-epoch demo model
    after a 1-epoch int8 finetune, 500 test images: top-1 agreement 0.892, per-input
    max |difference| of the softmax median 0.048, accuracy 0.787 (.tflite) vs 0.788
    (Keras). Its tolerance (int8_atol + int8_rtol * max |output|) is reported only.
    """

    samples: int = 16
    pool: int = 1
    atol: float = 1e-4
    rtol: float = 1e-4
    sign_margin: float = 2e-6
    seed: int = 0
    int8_atol: float = 0.0
    int8_rtol: float = 0.05
    int8_min_top1: float = 0.7


def quantized_kernel(layer) -> np.ndarray:
    """A Keras binary conv's kernel as its kernel quantizer gives it, float32 [kh, kw, c_in, c_out]
    (a constant: no gradient tape)."""
    import tensorflow as tf

    return np.asarray(layer.kernel_quantizer(tf.constant(np.asarray(layer.kernel))), np.float32)


def kernel_signs(layer) -> np.ndarray:
    """The signs of a binary conv's binarized kernel in TFLite's filter layout [O, H, W, I],
    True = -1: what a converted file keeps of the layer, whatever it did to the magnitudes."""
    return np.transpose(quantized_kernel(layer) < 0, (3, 0, 1, 2))


def find_by_signs(signs: dict, negative: np.ndarray, min_agreement: float = 1.0):
    """(name, channels flipped) of the layer in `signs` ({name: kernel_signs}) whose sign pattern
    a converted filter `negative` [O, H, W, I] (True = -1) has, or (None, 0).

    A flip per output channel is allowed: BatchNorm folded into a conv flips the channels
    whose scale is negative. `min_agreement` is the mean over channels of the share of
    weights that agree (1.0: every weight, after the flip).
    """
    for name, wanted in signs.items():
        if wanted.shape != negative.shape:
            continue
        same = (wanted == negative).reshape(len(wanted), -1).mean(axis=1)
        if np.maximum(same, 1.0 - same).mean() >= min_agreement:
            return name, int(np.sum(same < 0.5))
    return None, 0


def float_binary_convs(graph: TFLiteGraph, layers) -> dict:
    """{layer name: op it became or "?"} for the binary conv layers that are no LceBconv2d.

    A layer is found by its weights (`find_by_signs`): the signs of its binarized kernel
    against each LceBconv2d filter (bitpacked) and each float CONV_2D filter. 1% of the
    signs may differ: the point is which layer it is, not whether it is exact.
    """
    left = {layer.name: kernel_signs(layer) for layer in layers}
    became = {name: "?" for name in left}
    for op in graph.ops:
        data = graph.tensor_data(op.inputs[1]) if len(op.inputs) > 1 else None
        if op.name not in ("LceBconv2d", "CONV_2D") or data is None or data.ndim != 4:
            continue
        if op.name == "LceBconv2d":
            name = _find_bitpacked(left, data)
        else:
            name, _ = find_by_signs(left, data < 0, min_agreement=0.99)
        if name is None:
            continue
        del left[name]
        if op.name == "LceBconv2d":
            del became[name]
        else:
            became[name] = op.name
    return became


def _find_bitpacked(signs: dict, words: np.ndarray):
    """The layer in `signs` whose pattern an LceBconv2d filter (32 input channels per word) has,
    or None; each input channel count that packs into as many words is tried."""
    for in_channels in sorted({s.shape[3] for s in signs.values()}):
        if math.ceil(in_channels / 32) == words.shape[3]:
            name, _ = find_by_signs(signs, unpack_bconv_filter(words, in_channels), min_agreement=0.99)
            if name is not None:
                return name
    return None


def lce_zero_padding_hazards(model) -> list:
    """Binary convs that hit LCE 0.16's zero-padding bug: [(layer name, input HxW, kernel HxW)].

    LCE's optimized LceBconv2d computes "same" zero padding (pad_values=0.0) wrongly
    when the input is smaller than the (dilated) kernel: its correction
    (core/bconv2d/zero_padding_correction.h) assumes filter <= image.
    """
    found = []
    for layer in binary_conv_layers(model):
        if layer.padding != "same" or float(layer.pad_values) != 0.0:
            continue
        kernel = tuple((k - 1) * d + 1 for k, d in zip(layer.kernel_size, layer.dilation_rate))
        try:
            h, w = tuple(layer.input.shape)[1:3]
        except AttributeError:  # a layer used more than once has no single input
            continue
        if kernel != (1, 1) and ((h or kernel[0]) < kernel[0] or (w or kernel[1]) < kernel[1]):
            found.append((layer.name, (h, w), kernel))
    return found


def sign_margins(model, x, batch=4) -> np.ndarray | None:
    """Per input: min over binary convs of min |v| / max |v|, v the input the conv binarizes.

    None if the layers' inputs cannot be probed (a layer used twice). Below float
    rounding (~1e-7), Keras and LCE may binarize that activation differently.
    """
    import tensorflow as tf

    layers = binary_conv_layers(model)
    if not layers:
        return np.full(len(x), np.inf)
    try:
        probe = tf.keras.Model(model.inputs, [layer.input for layer in layers])
    except (AttributeError, ValueError):
        return None
    margins = []
    for i in range(0, len(x), batch):
        outs = probe(x[i: i + batch], training=False)
        per_layer = [np.abs(np.asarray(v)).reshape(len(v), -1) for v in tf.nest.flatten(outs)]
        margins.append(np.min([a.min(1) / np.maximum(a.max(1), 1e-30) for a in per_layer], axis=0))
    return np.concatenate(margins)


def batchnorm_affine(bn) -> tuple[np.ndarray, np.ndarray]:
    """(s, t) with BN(y) = s y + t in inference, per channel, in float32, from the layer's
    attributes (gamma and beta only when it has them: `scale`, `center`)."""
    mean = np.asarray(bn.moving_mean, np.float32)
    gamma = np.asarray(bn.gamma, np.float32) if bn.scale else np.ones_like(mean)
    beta = np.asarray(bn.beta, np.float32) if bn.center else np.zeros_like(mean)
    s = gamma / np.sqrt(np.asarray(bn.moving_variance, np.float32) + bn.epsilon)
    return s.astype(np.float32), (beta - mean * s).astype(np.float32)


def batchnorm_cancellation(model) -> float:
    """The largest |moving_mean| / sqrt(moving_variance + epsilon) of any BatchNorm channel.

    A BatchNorm subtracts its mean from its input: where the mean is k times the spread,
    the output keeps the input's rounding error (relative to the input's size) and is k
    times smaller, so its relative error grows k-fold. The parity check widens its sign
    margin by (1 + k). Measured: Bi-Real-18 with ReActNet's block after 4 + 4 epochs on
    32 px Fashion-MNIST has k = 212 (stage 4, whose 1x1 maps padded with +1 make 8 of 9
    taps a constant offset), and 18-21 of 256 test images that cleared the plain 2e-6
    margin still differed between Keras and LCE (margins up to 1.4e-5; Keras at batch 1
    and at batch 32 differed on 18); the same recipe's Bi-Real block (r18_adam) has
    k = 4.8 and none differed.
    """
    worst = 0.0
    for layer in batchnorm_layers(model):
        mean = np.abs(np.asarray(layer.moving_mean, np.float64))
        std = np.sqrt(np.asarray(layer.moving_variance, np.float64) + layer.epsilon)
        worst = max(worst, float((mean / std).max(initial=0.0)))
    return worst


def compare_outputs(model, flatbuffer: bytes, x: np.ndarray, settings: ParitySettings,
                    hazard: bool, int8: bool = False, runner=None) -> tuple[ParityCheck, np.ndarray]:
    """Keras vs .tflite on inputs x: (the ParityCheck without `inputs`, the Keras outputs).

    Verdicts: `exact` every input agrees; `mismatch` a clear input differs, or any input
    while a known LCE hazard is present; `sign_flips` the clear inputs agree, or half the
    inputs do; `inconclusive` otherwise (most differ, none clear). `int8` (a model with
    fake-quant ops) gets `int8_top1` when its top-1 agreement reaches
    `settings.int8_min_top1`, else `mismatch`. `runner` runs the flatbuffer (default
    LCE's interpreter, `TFLiteRunner(flatbuffer)`; a portable file: `LiteRTRunner`).
    """
    keras = np.concatenate([np.asarray(model(x[i: i + 32], training=False))
                            for i in range(0, len(x), 32)]).astype(np.float32)
    lite = (runner or TFLiteRunner(flatbuffer)).predict(x)
    if keras.shape != lite.shape:
        raise ValueError(f"the .tflite output has the shape {lite.shape[1:]}, the Keras "
                         f"model's {keras.shape[1:]}")
    scale = float(np.abs(keras).max())
    atol, rtol = (settings.int8_atol, settings.int8_rtol) if int8 else (settings.atol, settings.rtol)
    tolerance = float(atol + rtol * scale)
    diff = np.abs(keras - lite).reshape(len(x), -1).max(axis=1)
    within = diff <= tolerance
    margins = sign_margins(model, x)
    threshold = settings.sign_margin * (1.0 + batchnorm_cancellation(model))
    clear = np.zeros(len(x), bool) if margins is None else margins >= threshold
    top1 = np.argmax(keras.reshape(len(x), -1), 1) == np.argmax(lite.reshape(len(x), -1), 1)
    if int8:
        verdict = "int8_top1" if top1.mean() >= settings.int8_min_top1 else "mismatch"
    elif within.all():
        verdict = "exact"
    elif hazard or (clear & ~within).any():
        verdict = "mismatch"
    elif clear.any() or 2 * within.sum() >= len(x):
        verdict = "sign_flips"
    else:
        verdict = "inconclusive"
    check = ParityCheck(
        inputs="", num_samples=len(x), max_abs_diff=float(diff.max()), max_abs_keras_output=scale,
        tolerance=tolerance, samples_within_tolerance=int(within.sum()),
        sign_margin_threshold=float(threshold), clear_samples=int(clear.sum()),
        clear_samples_within_tolerance=int((clear & within).sum()),
        min_sign_margin=None if margins is None else float(margins.min()),
        top1_agreement=float(top1.mean()), verdict=verdict,
        ok=verdict in ("exact", "sign_flips", "inconclusive", "int8_top1"),
    )
    return check, keras


def int8_check(model, graph):
    """Int8Check of a converted model: its integer ops and the float ops left, by name.

    An op is a float op when it reads or writes a float32 activation (its
    constant float parameters, such as LceBconv2d's folded BatchNorm, aside).
    """
    float_ops = Counter(op.name for op in graph.float_ops())
    return Int8Check(len(fake_quant_layers(model)), len(graph.ops) - sum(float_ops.values()),
                     dict(sorted(float_ops.items())))
