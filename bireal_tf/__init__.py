"""Bi-Real Net on Larq: networks, training recipes and verified LCE export.

Importing this package binds `tf.keras` to Keras 2 (tf-keras), which Larq needs.
"""

from bireal_tf._keras_setup import ensure_keras2

ensure_keras2()

from bireal_tf import quantizers  # noqa: E402  (registers them with Keras)
from bireal_tf import metrics  # noqa: E402,F401  (registers them with Keras)
from bireal_tf.quantizers import custom_objects  # noqa: E402
from bireal_tf.models import BiRealNet18, BiRealNet34, BiRealNet50, bireal_net  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "BiRealNet18",
    "BiRealNet34",
    "BiRealNet50",
    "__version__",
    "bireal_net",
    "custom_objects",
    "quantizers",
]
