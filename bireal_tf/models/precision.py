"""Mixed precision and a model's float32 form.

A model trained under a mixed policy (`mixed_bfloat16`, `mixed_float16`) computes in
16 bits with float32 variables. TFLite converts float32 graphs, and fake int8
quantization needs float32 kernels (a bfloat16 kernel cannot hold every int8 level
times its scale exactly), so both rebuild the model from a config in which every
mixed policy is float32.
"""

__all__ = ["float32_config", "mixed_precision_policies"]


def mixed_precision_policies(model) -> set:
    """The mixed dtype policies (e.g. {"mixed_bfloat16"}) of `model`'s layers; empty if none."""
    import tensorflow as tf

    layers = [model] + [m for m in model.submodules if isinstance(m, tf.keras.layers.Layer)]
    return {layer.dtype_policy.name for layer in layers if layer.dtype_policy.name.startswith("mixed_")}


def float32_config(config):
    """A Keras model or layer config with every mixed dtype policy replaced by "float32"."""
    if isinstance(config, list):
        return [float32_config(c) for c in config]
    if not isinstance(config, dict):
        return config
    if "Policy" in str(config.get("class_name")) and str(
            config.get("config", {}).get("name")).startswith("mixed_"):
        return "float32"
    return {k: float32_config(v) for k, v in config.items()}
