"""Files in and out of the export: errors, the output path check, loading saved models.

Writing goes through `bireal_tf.utils.atomic_write_*` (temp file + os.replace).
"""

import os
from pathlib import Path

from bireal_tf.utils import quiet_larq

__all__ = ["ExportError", "ModelFileError", "check_output_path", "check_tflite",
           "load_keras_model", "read_flatbuffer_file"]

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
    `compile=False` (export and evaluation need the forward pass only). Keras'
    safe mode stays on for every format: a Lambda layer holding Python code (a
    `lambda`, stored as bytecode) is refused, since loading it would run that code.
    Keras applies safe mode to `.keras` files only; the legacy readers (`.h5`,
    SavedModel) get it here through Keras' `SafeModeScope`.
    """
    import tensorflow as tf
    from tf_keras.src.saving.serialization_lib import SafeModeScope

    import bireal_tf  # registers the custom objects

    path = Path(path)
    if not path.exists():
        raise ModelFileError(f"Model file '{path}' does not exist. {_SAVED_BY}")
    if path.suffix.lower() == ".tflite":
        raise ModelFileError(f"'{path}' is already a .tflite flatbuffer; this needs the Keras "
                             f"model it was converted from. {_SAVED_BY}")
    try:
        # custom_objects: .h5 configs name our classes bare
        with quiet_larq(), bireal_tf.custom_objects(), SafeModeScope(True):
            model = tf.keras.models.load_model(path, compile=False, safe_mode=True)
    except Exception as err:
        if "Lambda layer" in str(err) and "safe_mode" in str(err):
            raise ModelFileError(
                f"'{path}' holds a Lambda layer with Python code (a `lambda` stored as bytecode): "
                "loading it would run that code, so it is refused (Keras' safe mode). Bi-Real "
                "models have no Lambda layer. If you made the file and trust it, load it "
                "yourself (`tf.keras.models.load_model(path, compile=False, safe_mode=False)`) "
                "and pass the model object instead of the path."
            ) from err
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
    """The bytes of a .tflite file that LCE's interpreter loads and runs without dying.

    ModelFileError when the file is missing or fails `check_tflite`.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"TFLite file '{path}' does not exist or is not a file.")
    data = path.read_bytes()
    check_tflite(data, str(path))
    return data


_EXPORT_AGAIN = ("Export it again with `python -m bireal_tf.export MODEL -o OUT.tflite`, or copy "
                 "it again from where it was made.")
_CHECKED = set()  # (sha256, memory limit, reference bconv) of flatbuffers that passed


def check_tflite(flatbuffer: bytes, source: str = "<in-memory .tflite>", *,
                 use_reference_bconv: bool = False) -> None:
    """ModelFileError unless the flatbuffer is safe to open in this process.

    Every path that hands bytes to a TFLite interpreter here calls it (through
    `read_flatbuffer_file` and `TFLiteRunner`). In order:

    1. its structure passes LiteRT's flatbuffer verifier, and the options of its LCE ops
       stay inside them (`safety.verify_flatbuffer`); it parses as a model (`TFLiteGraph`);
    2. its activation tensors declare at most the memory limit in total
       (`safety.memory_limit_bytes()`, $BIREAL_TF_TFLITE_MEMORY_MB, default 2048 MB);
    3. LCE's interpreter, in a child process capped at that memory, loads it and runs it
       once on zeros (`safety.probe_interpreter`) without a signal, an error or a timeout.

    A flatbuffer that passed is remembered by its SHA-256, so the export's and
    evaluation's further runners do not probe it again.
    """
    import hashlib

    from bireal_tf.export.flatbuffer import FlatbufferError, TFLiteGraph
    from bireal_tf.export.safety import (MEMORY_ENV, TIMEOUT_ENV, UnsafeFlatbuffer,
                                         memory_limit_bytes, probe_interpreter, timeout_seconds,
                                         verify_flatbuffer)

    limit, timeout = memory_limit_bytes(), timeout_seconds()
    key = (hashlib.sha256(flatbuffer).digest(), limit, bool(use_reference_bconv))
    if key in _CHECKED:
        return
    try:
        verify_flatbuffer(flatbuffer)
        graph = TFLiteGraph(flatbuffer)
    except (UnsafeFlatbuffer, FlatbufferError) as err:
        raise ModelFileError(f"'{source}' is not a valid TFLite flatbuffer ({err}); the file may "
                             f"be truncated or corrupt. {_EXPORT_AGAIN}") from err
    raise_limit = (f"If the file is trusted and needs more, set {MEMORY_ENV} (now "
                   f"{limit >> 20} MB).")
    try:
        activations = [t for i, t in enumerate(graph.tensors) if not graph.is_constant(i)]
    except Exception as err:  # a buffer index out of range reads garbage offsets
        raise ModelFileError(f"'{source}' is not a valid TFLite flatbuffer (unreadable buffer "
                             f"table: {first_line(err)}). {_EXPORT_AGAIN}") from err
    declared = sum(map(_tensor_bytes, activations))
    if declared > limit:
        largest = max(activations, key=_tensor_bytes)
        raise ModelFileError(
            f"'{source}' declares {declared >> 20:,} MB of activation tensors (the largest "
            f"{'x'.join(map(str, largest.shape))} {largest.type}), more than the "
            f"{limit >> 20} MB allowed: the file is corrupt or hostile, or far larger than a "
            f"Bi-Real Net at ImageNet size. {_EXPORT_AGAIN} {raise_limit}")
    probe = probe_interpreter(flatbuffer, memory_limit=limit, timeout=timeout,
                              use_reference_bconv=use_reference_bconv)
    said = "; ".join(probe.errors[-3:])
    if probe.returncode is None:
        raise ModelFileError(
            f"LCE's interpreter did not finish loading '{source}' and running it once within "
            f"{timeout:g} s (in a child process; it was {probe.doing}): the file may be corrupt, "
            f"or this host very slow. If the file is trusted, set {TIMEOUT_ENV} (seconds).")
    if probe.signal:
        raise ModelFileError(
            f"'{source}': the file crashed the TFLite interpreter: it is corrupt. LCE's "
            f"interpreter, run on it in a child process (memory capped at {limit >> 20} MB for "
            f"its tensors), died of {probe.signal} while {probe.doing}"
            + (f" ({said})" if said else "") + f". {_EXPORT_AGAIN}")
    if not probe.ok:
        memory = "MemoryError" in said or "bad_alloc" in said
        raise ModelFileError(
            f"LCE's interpreter cannot load and run '{source}' ({said or 'no message'}; while "
            f"{probe.doing}): " + (f"it needs more memory than the {limit >> 20} MB allowed. "
                                   f"{raise_limit}" if memory
                                   else f"the file may be corrupt. {_EXPORT_AGAIN}"))
    _CHECKED.add(key)


def _tensor_bytes(tensor) -> int:
    """Bytes a tensor of this shape and type takes (unknown dims count as 1)."""
    import numpy as np

    try:
        item = np.dtype(tensor.type).itemsize
    except TypeError:  # string, resource, bfloat16, int4 ...: at least a byte
        item = 1
    item = max(item, 1)
    count = 1
    for d in tensor.shape:
        count *= max(int(d), 1)
    return count * item
