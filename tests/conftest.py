"""Shared test set-up: Keras 2 before anything imports TensorFlow, quiet logs, helpers."""
import os

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import bireal_tf  # noqa: E402,F401  (binds tf.keras to Keras 2)


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "slow: a slow test (LCE conversion of the large nets, end-to-end runs); CI runs it"
    )
