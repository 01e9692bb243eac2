"""Files in and out of the export: errors, the output path check, loading saved models.

Writing goes through `bireal_tf.utils.atomic_write_*` (temp file + os.replace).
"""

import os
from pathlib import Path

from bireal_tf.utils import quiet_larq

__all__ = ["ExportError", "ModelFileError", "check_output_path", "load_keras_model",
           "read_flatbuffer_file"]

_SAVED_BY = (
    "Pass a model saved by the training CLI or by `model.save(...)`: a `.keras` or "
    "`.h5` file, or a SavedModel directory."
)


class ExportError(RuntimeError):
    """The model cannot be exported as asked; the message names the cause and the fix."""


class ModelFileError(ExportError, ValueError):
    """A model or output file is missing, corrupt or of the wrong kind."""


def check_output_path(path, what: str = "output file") -> Path:
    """`path` as a Path; ModelFileError when it cannot be written.

    The parent directory must exist: it is not created silently, so a typo in a
    directory name does not scatter files.
    """
    path = Path(path)
    parent = path.parent
    if path.is_dir():
        raise ModelFileError(
            f"The {what} '{path}' is a directory; give a file name, e.g. '{path / 'model.tflite'}'."
        )
    if not parent.is_dir():
        raise ModelFileError(
            f"The directory '{parent}' of the {what} '{path}' does not exist. Create it "
            f"first (`mkdir -p {parent}`) or choose another path."
        )
    if not os.access(parent, os.W_OK):
        raise ModelFileError(f"The directory '{parent}' of the {what} '{path}' is not writable.")
    return path


def first_line(err: BaseException, limit: int = 300) -> str:
    """`TypeName: first line of the message`, for one-line error reports."""
    return f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[0][:limit]}"


def load_keras_model(path):
    """Load a Keras model saved by the training CLI; ModelFileError with the fix otherwise.

    Accepts `.keras` / `.h5` files and SavedModel directories, loaded with
    `compile=False` (export and evaluation need the forward pass only).
    """
    import tensorflow as tf

    import bireal_tf  # registers the custom objects

    path = Path(path)
    if not path.exists():
        raise ModelFileError(f"Model file '{path}' does not exist. {_SAVED_BY}")
    if path.suffix.lower() == ".tflite":
        raise ModelFileError(f"'{path}' is already a .tflite flatbuffer; this needs the Keras "
                             f"model it was converted from. {_SAVED_BY}")
    try:
        with quiet_larq(), bireal_tf.custom_objects():  # .h5 configs name our classes bare
            model = tf.keras.models.load_model(path, compile=False)
    except Exception as err:
        hint = " " + _SAVED_BY
        if "model_config" in str(err) or "No model config found" in str(err):
            hint = (" It looks like a weights-only file: build the network with "
                    "`bireal_tf.models.bireal_net(depth, ..., weights=PATH)` and pass the model "
                    "object, or save the whole model with `model.save('model.keras')`.")
        raise ModelFileError(
            f"Could not load a Keras model from '{path}' ({first_line(err)}). The file may be "
            f"truncated, corrupt or not a Keras model.{hint}"
        ) from err
    if not isinstance(model, tf.keras.Model):
        raise ModelFileError(f"'{path}' holds a {type(model).__name__}, not a Keras model. {_SAVED_BY}")
    return model


def read_flatbuffer_file(path) -> bytes:
    """The bytes of a .tflite file; ModelFileError when missing, empty or not a flatbuffer."""
    from bireal_tf.export.flatbuffer import FlatbufferError, TFLiteGraph

    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"TFLite file '{path}' does not exist or is not a file.")
    data = path.read_bytes()
    try:
        TFLiteGraph(data)
    except FlatbufferError as err:
        raise ModelFileError(
            f"'{path}' is not a valid TFLite flatbuffer ({err}); the file may be truncated or "
            "corrupt. Export it again with `python -m bireal_tf.export MODEL -o OUT.tflite`."
        ) from err
    return data
