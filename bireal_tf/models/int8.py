"""int8 for the layers that are not binary: the quantization-aware training model.

A model transform, not an export step: training needs it (`bireal_tf.recipes.int8`),
and `bireal_tf.export` only converts and checks what it produces.

FakeQuant: an int8 fake-quantization point on an activation, its range tracked
during training.

    y = fake_quant_with_min_max_vars(x, lo, hi, num_bits=8)

rounds x onto the 256 levels of [lo, hi] (nudged so that 0 is a level) and
passes the gradient straight through inside the range. LCE's converter turns
such ops into int8 tensors (scale (hi - lo) / 255, a zero point) around the
layers they follow, and lets an LceBconv2d whose output is fake-quantized write
int8. The range is tracked, not trained: in training lo, hi move towards the
batch's min and max by an exponential moving average (the first batch sets
them), lo <= 0 <= hi; in inference they are fixed.

Int8Kernel: the kernel quantizer of a real-valued conv or dense layer, the int8
grid TFLite stores its weights on (symmetric, per output channel for convs).

int8_model(model): the same network and weights with a FakeQuant after every
tensor LCE's converter must store as int8, in the placement of LCE's own int8
test model (larq_compute_engine/tests/end2end_test.py, `toy_model_int8`):

- the image input;
- every BatchNormalization (after the conv it folds into: stem, 1x1 shortcuts,
  and each binary conv, so LceBconv2d writes int8), and every conv not followed
  by one;
- every Add (the residual stream that each LceQuantize reads);
- the global average pool and the classifier (Dense).

The real-valued convs and the classifier become Larq `QuantConv2D` / `QuantDense`
with an `Int8Kernel`: they train on the int8 grid TFLite stores their weights on,
so the Keras model computes what the .tflite computes. On Fashion-MNIST (R18,
32 px, 1,000 test images, ranges from 30 training batches, no finetune) this
raised top-1 agreement with the .tflite from 0.970 to 0.988. Pooling, padding and
the final activation keep their input's scale (TFLite's same-scale ops) and need
no range of their own.
"""

import larq as lq
import tensorflow as tf

from bireal_tf.models.precision import float32_config
from bireal_tf.utils import quiet_larq

__all__ = ["FakeQuant", "Int8Kernel", "SUFFIX", "fake_quant_layers", "int8_model"]


@tf.keras.utils.register_keras_serializable(package="bireal_tf")
class FakeQuant(tf.keras.layers.Layer):
    """Fake int8 quantization of its input, range tracked by a moving average (`momentum`)."""

    def __init__(self, momentum: float = 0.99, num_bits: int = 8, **kwargs):
        super().__init__(**kwargs)
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}.")
        self.momentum = float(momentum)
        self.num_bits = int(num_bits)

    def build(self, input_shape):
        opts = dict(trainable=False, synchronization=tf.VariableSynchronization.ON_READ,
                    aggregation=tf.VariableAggregation.MEAN)
        self.range_min = self.add_weight("range_min", shape=(), initializer=tf.constant_initializer(-6.0), **opts)
        self.range_max = self.add_weight("range_max", shape=(), initializer=tf.constant_initializer(6.0), **opts)
        self.updates_seen = self.add_weight("updates_seen", shape=(), initializer="zeros", **opts)
        super().build(input_shape)

    def call(self, inputs, training=None):
        x = tf.cast(inputs, tf.float32)
        if training:
            # The first batch sets the range, later ones move it by the moving average.
            m = tf.where(self.updates_seen > 0, self.momentum, 0.0)
            lo = m * self.range_min + (1.0 - m) * tf.minimum(tf.reduce_min(x), 0.0)
            hi = m * self.range_max + (1.0 - m) * tf.maximum(tf.reduce_max(x), 0.0)
            self.range_min.assign(lo)
            self.range_max.assign(hi)
            self.updates_seen.assign_add(1.0)
        lo = tf.minimum(self.range_min, 0.0)
        hi = tf.maximum(self.range_max, lo + 1e-6)
        y = tf.quantization.fake_quant_with_min_max_vars(x, lo, hi, num_bits=self.num_bits)
        return tf.cast(y, inputs.dtype)

    def get_config(self):
        return {**super().get_config(), "momentum": self.momentum, "num_bits": self.num_bits}


@tf.keras.utils.register_keras_serializable(package="bireal_tf")
class Int8Kernel(tf.keras.layers.Layer):
    """Symmetric int8 fake quantization of a weight kernel (a Larq `kernel_quantizer`).

        m_c = max |w[..., c]|                       (c: output channel; one m if per tensor)
        q(w) = round(127 * w / m_c) * m_c / 127     in [-m_c, m_c], 255 levels, 0 exact

    the grid of TFLite's int8 weights (zero point 0, scale m_c / 127). Gradient: straight
    through, m_c held constant (every weight is inside its range).

    Per channel, a later BatchNorm folded in by the converter scales channel c by s_c and
    the converter's grid by |s_c| alike, so the folded int8 weights are exactly the
    fake-quantized ones. Dense kernels are quantized per tensor: LCE's converter rejects a
    per-channel fully-connected from fake quantization ("'tfl.transpose' op has
    mismatched quantized axes").
    """

    precision = 8  # read by Larq's model summary and ModelProfile

    def __init__(self, per_channel: bool = True, **kwargs):
        super().__init__(**kwargs)
        self.per_channel = bool(per_channel)

    def call(self, inputs):
        w = tf.cast(inputs, tf.float32)
        axes = list(range(w.shape.rank - 1)) if self.per_channel else None
        m = tf.stop_gradient(tf.maximum(tf.reduce_max(tf.abs(w), axis=axes), 1e-8))
        if self.per_channel:
            q = tf.quantization.fake_quant_with_min_max_vars_per_channel(w, -m, m, num_bits=8, narrow_range=True)
        else:
            q = tf.quantization.fake_quant_with_min_max_vars(w, -m, m, num_bits=8, narrow_range=True)
        return tf.cast(q, inputs.dtype)

    def get_config(self):
        return {**super().get_config(), "per_channel": self.per_channel}


SUFFIX = "_fq"


def fake_quant_layers(model) -> list:
    """The FakeQuant layers of `model` (nested models included)."""
    found = []
    for layer in model.layers:
        if isinstance(layer, tf.keras.Model):
            found.extend(fake_quant_layers(layer))
        elif isinstance(layer, FakeQuant):
            found.append(layer)
    return found


def _targets(config) -> list:
    """Names of the layers whose output gets a FakeQuant, in config order."""
    consumers = {}
    for lc in config["layers"]:
        for ref in _refs(lc.get("inbound_nodes", [])):
            consumers.setdefault(ref, []).append(lc["class_name"])
    names = []
    for lc in config["layers"]:
        cls, name = lc["class_name"], lc["config"]["name"]
        conv = cls in ("Conv2D", "QuantConv2D", "DepthwiseConv2D")
        if cls in ("InputLayer", "BatchNormalization", "Add", "Dense", "GlobalAveragePooling2D") or (
                conv and consumers.get(name) != ["BatchNormalization"]):
            names.append(name)
    return names


def _refs(nodes):
    """Inbound layer names in a Keras 2 functional config's `inbound_nodes`."""
    if isinstance(nodes, list) and len(nodes) >= 3 and isinstance(nodes[0], str) and isinstance(nodes[1], int):
        yield nodes[0]
    elif isinstance(nodes, list):
        for n in nodes:
            yield from _refs(n)


def _rename(nodes, mapping):
    if isinstance(nodes, list) and len(nodes) >= 3 and isinstance(nodes[0], str) and isinstance(nodes[1], int):
        return [mapping.get(nodes[0], nodes[0])] + list(nodes[1:])
    if isinstance(nodes, list):
        return [_rename(n, mapping) for n in nodes]
    return nodes


def _with_int8_kernel(layer_config):
    """A Conv2D / Dense layer config as Larq's QuantConv2D / QuantDense with an Int8Kernel."""
    quant = {"Conv2D": ("QuantConv2D", True), "Dense": ("QuantDense", False)}
    if layer_config["class_name"] not in quant:
        return layer_config
    cls, per_channel = quant[layer_config["class_name"]]
    kernel = tf.keras.utils.serialize_keras_object(Int8Kernel(per_channel=per_channel))
    lc = {k: v for k, v in layer_config.items() if k != "registered_name"}
    return dict(lc, class_name=cls, module="larq.layers",
                config=dict(layer_config["config"], kernel_quantizer=kernel))


def _zero_padded_binary_convs(config) -> list:
    return [lc["config"]["name"] for lc in config["layers"]
            if lc["class_name"] == "QuantConv2D" and lc["config"].get("input_quantizer")
            and lc["config"].get("padding") == "same" and not lc["config"].get("pad_values")
            and max(lc["config"]["kernel_size"]) > 1]


def int8_model(model, momentum: float = 0.99, pad_with_ones: bool = False) -> tf.keras.Model:
    """`model` (a functional Bi-Real Net) with FakeQuant layers where LCE expects them.

    Same layers (same names), same weights; each FakeQuant is named after the layer
    it follows plus "_fq"; real-valued convs and the classifier become Larq layers
    with an `Int8Kernel` kernel quantizer. The ranges start at [-6, 6]: finetune (e.g.
    `bireal_tf.recipes.int8.finetune_int8`) so they track the activations.

    Binary convs must pad with +1 (`pad_values=1.0`): LCE's optimized int8-output
    binary conv has no zero padding (its interpreter refuses such a file when it
    allocates). A zero-padded model is refused; `pad_with_ones=True` switches its
    binary convs to +1 padding (the network changes at the borders; the int8
    finetune adapts to it).
    """
    if fake_quant_layers(model):
        raise ValueError(f"Model '{model.name}' already has FakeQuant layers; int8_model "
                         "takes the float model.")
    if not isinstance(model, tf.keras.Model) or isinstance(model, tf.keras.Sequential) or not getattr(
            model, "_is_graph_network", False):
        raise ValueError(f"int8_model takes a functional Keras model, got {type(model).__name__}; "
                         "build the network with bireal_tf.bireal_net / BiRealNet18.")
    # Fake quantization needs float32: a bfloat16 kernel cannot hold every int8 level
    # times its scale exactly. A model trained under a mixed policy gets its float32 twin.
    config = float32_config(model.get_config())
    zero_padded = _zero_padded_binary_convs(config)
    if zero_padded and not pad_with_ones:
        raise ValueError(
            f"Model '{model.name}' has {len(zero_padded)} binary convs that pad with 0 (e.g. "
            f"'{zero_padded[0]}'); LCE's int8 binary conv pads with +1 only. Train with "
            "pad_values=1.0 (--pad-values 1; the small-image recipes do), or call "
            "int8_model(model, pad_with_ones=True) and let the int8 finetune adapt.")
    for lc in config["layers"]:
        if lc["config"]["name"] in zero_padded:
            lc["config"]["pad_values"] = 1.0
    targets = _targets(config)
    mapping = {name: name + SUFFIX for name in targets}
    layers = []
    for lc in config["layers"]:
        lc = dict(_with_int8_kernel(lc), inbound_nodes=_rename(lc.get("inbound_nodes", []), mapping))
        layers.append(lc)
        name = lc["config"]["name"]
        if name in mapping:
            fq = tf.keras.utils.serialize_keras_object(FakeQuant(momentum=momentum, name=mapping[name]))
            fq.update(name=mapping[name], inbound_nodes=[[[name, 0, 0, {}]]])
            layers.append(fq)
    config = dict(config, layers=layers, output_layers=_rename(config["output_layers"], mapping))
    with quiet_larq():  # Bi-Real's binary kernels are unconstrained on purpose
        new = model.__class__.from_config(config, custom_objects={
            "QuantConv2D": lq.layers.QuantConv2D, "QuantDense": lq.layers.QuantDense})
    for layer in model.layers:
        new.get_layer(layer.name).set_weights(layer.get_weights())
    return new
