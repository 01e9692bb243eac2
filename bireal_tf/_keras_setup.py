"""Bind `tf.keras` to Keras 2 (tf-keras) before anything touches it.

Larq 0.14 is written for Keras 2. TensorFlow 2.16 binds `tf.keras` lazily on
first access, to Keras 3 unless `TF_USE_LEGACY_KERAS=1` is set by then. We set
the variable ourselves; if Keras 3 was already bound (the variable set to 0,
or `tf.keras` used before importing us), we refuse with instructions instead
of letting Larq fail deep inside.
"""

import os

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
    return keras_module
