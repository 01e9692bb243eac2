"""Files in and out of the export: load a saved Keras model, write outputs atomically."""

import logging
import os
import tempfile
from pathlib import Path

__all__ = [
    "ExportError",
    "ModelFileError",
    "atomic_write_bytes",
    "atomic_write_text",
    "check_output_path",
    "load_keras_model",
    "read_flatbuffer_file",
]

PathLike = str | os.PathLike

_SAVED_BY = (
    "Pass a model saved by the training CLI or by `model.save(...)`: a `.keras` or "
    "`.h5` file, or a SavedModel directory."
)


class ExportError(RuntimeError):
    """The model cannot be exported as asked; the message names the cause and the fix."""


class ModelFileError(ExportError, ValueError):
    """A model or output file is missing, corrupt or of the wrong kind."""


def check_output_path(path: PathLike, what: str = "output file") -> Path:
    """The output path as a Path; raise ModelFileError when it cannot be written.

    The parent directory must exist: it is not created silently, so a typo in a
    directory name does not scatter files.
    """
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
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


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: PathLike, data: bytes) -> Path:
    """Write `data` to `path` through a temp file in the same directory and os.replace.

    Readers see either the old file or the complete new one; on any error the
    temp file is removed and an existing file at `path` is left untouched.
    """
    path = check_output_path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual mode
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


def atomic_write_text(path: PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def _first_line(err: BaseException, limit: int = 300) -> str:
    text = str(err).strip().splitlines()
    line = text[0] if text else ""
    return f"{type(err).__name__}: {line[:limit]}"


def load_keras_model(path: PathLike):
    """Load a Keras model saved by the training CLI; ModelFileError with the fix otherwise.

    Accepts `.keras` / `.h5` files and SavedModel directories. The project's
    custom layers and quantizers are registered with Keras by importing
    `bireal_tf`, so no `custom_objects` are needed. Loaded with `compile=False`:
    export and evaluation need the forward pass only.
    """
    import tensorflow as tf

    import bireal_tf  # noqa: F401  (registers the custom objects)

    path = Path(path)
    if not path.exists():
        raise ModelFileError(f"Model file '{path}' does not exist. {_SAVED_BY}")
    if path.is_dir():
        if not (path / "saved_model.pb").exists() and not (path / "saved_model.pbtxt").exists():
            raise ModelFileError(
                f"'{path}' is a directory but not a SavedModel (no saved_model.pb in it). {_SAVED_BY}"
            )
    elif path.suffix.lower() == ".tflite":
        raise ModelFileError(
            f"'{path}' is already a .tflite flatbuffer; this needs the Keras model it was "
            f"converted from. {_SAVED_BY}"
        )
    elif path.suffix.lower() not in (".keras", ".h5", ".hdf5"):
        raise ModelFileError(
            f"'{path}' has the suffix '{path.suffix}', which is not a Keras model format. {_SAVED_BY}"
        )
    elif path.stat().st_size == 0:
        raise ModelFileError(f"Model file '{path}' is empty (0 bytes). Save the model again. {_SAVED_BY}")

    larq_logger = logging.getLogger("larq.layers_base")
    level = larq_logger.level
    larq_logger.setLevel(logging.ERROR)  # Bi-Real's binary kernels have no constraint on purpose
    try:
        model = tf.keras.models.load_model(path, compile=False)
    except Exception as err:
        hint = ""
        if "No model config found" in str(err) or "model_config" in str(err):
            hint = (
                " It looks like a weights-only file: build the network with "
                "`bireal_tf.models.bireal_net(depth, ..., weights=PATH)` and pass the model "
                "object, or save the whole model with `model.save('model.keras')`."
            )
        raise ModelFileError(
            f"Could not load a Keras model from '{path}' ({_first_line(err)}). The file may be "
            f"truncated, corrupt or not a Keras model.{hint or ' ' + _SAVED_BY}"
        ) from err
    finally:
        larq_logger.setLevel(level)
    if not isinstance(model, tf.keras.Model):
        raise ModelFileError(
            f"'{path}' holds a {type(model).__name__}, not a Keras model. {_SAVED_BY}"
        )
    return model


def read_flatbuffer_file(path: PathLike) -> bytes:
    """The bytes of a .tflite file; ModelFileError when missing, empty or not a flatbuffer."""
    from bireal_tf.export.flatbuffer import FlatbufferError, read_graph

    path = Path(path)
    if not path.exists():
        raise ModelFileError(f"TFLite file '{path}' does not exist.")
    if path.is_dir():
        raise ModelFileError(f"'{path}' is a directory, not a .tflite file.")
    data = path.read_bytes()
    try:
        read_graph(data)
    except FlatbufferError as err:
        raise ModelFileError(
            f"'{path}' is not a valid TFLite flatbuffer ({err}); the file may be truncated or "
            "corrupt. Export it again with `python -m bireal_tf.export MODEL -o OUT.tflite`."
        ) from err
    return data
