"""int8 for the layers that are not binary: fake-quant placement for LCE (issue 12).

`int8_model(model)` returns the same network with the same weights and a
`FakeQuant` layer (bireal_tf.fake_quant) after every tensor that LCE's converter
must store as int8, the placement of LCE's own int8 test model
(larq_compute_engine/tests/end2end_test.py, `toy_model_int8`):

- the image input;
- every BatchNormalization (after the conv it folds into: stem, 1x1 shortcuts,
  and each binary conv, so LceBconv2d writes int8), and every conv not followed
  by one;
- every Add (the residual stream that each LceQuantize reads);
- the global average pool and the classifier (Dense).

The real-valued convs and the classifier become Larq `QuantConv2D` / `QuantDense`
with an `Int8Kernel` kernel quantizer: they train on the int8 grid TFLite stores
their weights on (per output channel for convs, per tensor for the classifier),
so the Keras model computes what the .tflite computes. On Fashion-MNIST (R18,
32 px, 1,000 test images, ranges from 30 training batches, no finetune) this
raised top-1 agreement with the .tflite from 0.970 to 0.988.

Pooling, padding and the final activation keep their input's scale (TFLite's
same-scale ops) and need no range of their own. The ranges start at [-6, 6]
and are tracked while training (`FakeQuant`): finetune a few epochs before
exporting with `export_tflite(..., io_type="int8")`.
"""

import tensorflow as tf

from bireal_tf.fake_quant import FakeQuant, Int8Kernel

__all__ = ["FakeQuant", "Int8Kernel", "fake_quant_layers", "int8_model", "SUFFIX"]

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
    from bireal_tf.export.convert import _float32_config

    # Fake quantization needs float32: a bfloat16 kernel cannot hold every int8 level
    # times its scale exactly. A model trained under a mixed policy gets its float32 twin.
    config = _float32_config(model.get_config())
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
    import larq as lq

    new = model.__class__.from_config(config, custom_objects={
        "QuantConv2D": lq.layers.QuantConv2D, "QuantDense": lq.layers.QuantDense})
    for layer in model.layers:
        new.get_layer(layer.name).set_weights(layer.get_weights())
    return new


def int8_check(model, graph):
    """Int8Check of a converted model: its integer ops and the float ops left, by name.

    An op is a float op when it reads or writes a float32 activation (its
    constant float parameters, such as LceBconv2d's folded BatchNorm, aside).
    """
    from collections import Counter

    from bireal_tf.export.report import Int8Check

    float_ops = Counter(op.name for op in graph.float_ops())
    return Int8Check(len(fake_quant_layers(model)), len(graph.ops) - sum(float_ops.values()),
                     dict(sorted(float_ops.items())))


def int8_size_floor(model):
    """SizeCheck (file_bytes 0) against the int8 floor of a model with fake-quant ops.

        floor_bits = 1 * binary_params + 8 * (float_params + batchnorm_params)
                     + 32 * scale_params

    binary_params, float_params, batchnorm_params as in `size_floor` (BatchNorm
    folded to 2 per channel); scale_params: one float32 scale per output channel of
    each real-valued conv and dense kernel (TFLite's per-channel int8 weights).
    """
    import math

    from bireal_tf.export.convert import size_floor
    from bireal_tf.models import binary_conv_layers

    size = size_floor(model)
    binary = {layer.name for layer in binary_conv_layers(model)}
    scales = sum(1 if len(layer.kernel.shape) == 2 else int(layer.kernel.shape[-1])
                 for layer in model.layers if hasattr(layer, "kernel") and layer.name not in binary)
    bits = size.binary_params + 8 * (size.float_params + size.batchnorm_params) + 32 * scales
    size.floor_bytes, size.weight_bits, size.scale_params = math.ceil(bits / 8), 8, scales
    return size
