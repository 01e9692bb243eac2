"""Bind `tf.keras` to Keras 2 (tf-keras) before anything touches it.

Larq 0.14 is written for Keras 2. TensorFlow 2.16 binds `tf.keras` lazily on
first access, to Keras 3 unless `TF_USE_LEGACY_KERAS=1` is set by then. We set
the variable ourselves; if Keras 3 was already bound (the variable set to 0,
or `tf.keras` used before importing us), we refuse with instructions instead
of letting Larq fail deep inside.

AutoGraph: TF 2.16's AutoGraph leaves the package named `keras` unconverted but
not `tf_keras`, Keras 2's new name, so every trace (fit, evaluate, LCE conversion)
transpiles Keras' own layers, metrics and optimizers from source. Keras 2 was never
converted before (TF <= 2.15), and its code does not rely on it; our own and Larq's
layer `call`s are still converted, as Keras asks. Measured here: building a
Bi-Real-18 and its first fit took 2.3-2.7x less time (three paired runs on a loaded
machine: 352 vs 152 s, 353 vs 129 s, 1007 vs 349 s; `python -m benchmarks.tracing`
repeats the comparison).
`BIREAL_TF_CONVERT_KERAS=1` keeps TensorFlow's default (for that benchmark, or if a
Keras release ever needs it).

oneDNN: TensorFlow 2.16 turns its oneDNN kernels on by default only on CPUs with
AVX512_VNNI, AVX512_BF16 or AMX. On an AVX2-only CPU (a 2-core AMD EPYC of
early December 2026) a Bi-Real-18 training step at 32 px, batch 64, took 2.49 s
without them and 0.54 s with them (the gradient ops run on one core otherwise).
We set `TF_ENABLE_ONEDNN_OPTS=1` unless the user chose a value; TensorFlow reads it
once, at import, so it only takes effect when bireal_tf is imported first (the CLI
always is; `make` exports it as well).
"""

import os
import sys

_HOW_TO_FIX = (
    "bireal_tf needs Keras 2 (the tf-keras package), because Larq does not "
    "support Keras 3. Set the environment variable TF_USE_LEGACY_KERAS=1 before "
    "Python starts (for example `export TF_USE_LEGACY_KERAS=1`), or import "
    "bireal_tf before anything touches `tf.keras`, and make sure tf-keras==2.16.0 "
    "is installed (`pip install tf-keras==2.16.0`)."
)


def ensure_keras2():
    """Arrange Keras 2 and return the `tf.keras` module; raise ImportError otherwise."""
    flag = os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
    if "tensorflow" not in sys.modules:
        os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")
    if flag.strip().lower() not in ("1", "true", "yes"):
        raise ImportError(f"TF_USE_LEGACY_KERAS is set to {flag!r}. " + _HOW_TO_FIX)
    try:
        import tf_keras
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("tf-keras is not installed. " + _HOW_TO_FIX) from err

    import tensorflow as tf

    keras_module = tf.keras
    if keras_module.layers.Layer is not tf_keras.layers.Layer:
        where = getattr(keras_module, "__file__", repr(keras_module))
        raise ImportError(f"tf.keras is already bound to Keras 3 ({where}). " + _HOW_TO_FIX)
    _leave_keras_unconverted()
    return keras_module


def _leave_keras_unconverted():
    """Add `tf_keras` to AutoGraph's do-not-convert rules, as `keras` already is (see above)."""
    if os.environ.get("BIREAL_TF_CONVERT_KERAS", "").strip() in ("1", "true", "yes"):
        return
    try:
        from tensorflow.python.autograph.core import config, config_lib
    except ImportError:  # pragma: no cover - another TF layout: keep its default
        return
    rule = config_lib.DoNotConvert("tf_keras")
    if not any(getattr(r, "_prefix", None) == "tf_keras" for r in config.CONVERSION_RULES):
        config.CONVERSION_RULES = (rule,) + tuple(config.CONVERSION_RULES)
