"""A restricted reader of PyTorch's zip checkpoint format, without torch.

The format (`torch.save`'s default since PyTorch 1.6) is a zip archive with one
top folder: `<top>/data.pkl` holds the object, pickled; `<top>/data/<key>` the raw
bytes of each storage; `<top>/byteorder` "little" or "big". In the pickle a tensor
is `torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)` and a
storage is the persistent id `("storage", torch.<Type>Storage, key, location, numel)`.

Safety: unpickling calls only what `find_class` returns. Here it returns this
module's own constructors for the tensor names above and `collections.OrderedDict`;
any other global is refused by name before anything is called. The result holds
only NumPy arrays, dicts, lists, tuples, numbers, strings, booleans and None.
"""

import collections
import pickle
import zipfile
import zlib

import numpy as np

__all__ = ["CheckpointError", "read_torch_zip"]


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the network."""


# torch.<Name>Storage -> NumPy dtype ("bfloat16" is widened to float32).
_STORAGES = {
    "FloatStorage": np.float32,
    "DoubleStorage": np.float64,
    "HalfStorage": np.float16,
    "BFloat16Storage": "bfloat16",
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


class _StorageType:
    __slots__ = ("name", "dtype")

    def __init__(self, name):
        self.name = name
        self.dtype = _STORAGES[name]


def _rebuild_tensor(storage, offset, size, stride, *_ignored):
    """The array of `size` viewed in `storage` from `offset` with `stride` (in elements)."""
    if not isinstance(storage, np.ndarray):
        raise CheckpointError(f"a tensor refers to {type(storage).__name__}, not a storage")
    size, stride = tuple(size), tuple(stride)
    if len(size) != len(stride) or not all(isinstance(v, int) and v >= 0 for v in size + stride):
        raise CheckpointError(f"a tensor has an invalid size {size} / stride {stride}")
    if not isinstance(offset, int) or offset < 0:
        raise CheckpointError(f"a tensor has an invalid storage offset {offset!r}")
    if 0 in size:
        return np.zeros(size, storage.dtype)
    last = offset + sum((n - 1) * s for n, s in zip(size, stride))
    if last >= storage.size:  # as_strided does not check bounds: we must
        raise CheckpointError(
            f"a tensor of size {size} reaches element {last} of a storage of {storage.size}"
        )
    view = np.lib.stride_tricks.as_strided(
        storage[offset:], shape=size, strides=[s * storage.itemsize for s in stride]
    )
    return np.array(view)  # a contiguous, writable copy


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None):
    return data


_ALLOWED = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
}


class _Unpickler(pickle.Unpickler):
    def __init__(self, data, archive, top, byteorder, where):
        super().__init__(data)
        self._archive, self._top, self._where = archive, top, where
        self._order = "<" if byteorder == "little" else ">"
        self._storages = {}

    def find_class(self, module, name):
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        if module == "torch" and name in _STORAGES:
            return _StorageType(name)
        raise CheckpointError(
            f"{self._where}: refused: its pickle asks for '{module}.{name}', which is not a "
            "tensor, dict, list, number or string. Loading it with a plain unpickler could run "
            "code; this reader calls nothing outside PyTorch's tensor constructors. Re-save "
            "only the state dict (torch.save(model.state_dict(), path)) from a trusted copy."
        )

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType) and isinstance(pid[2], str)):
            raise CheckpointError(f"{self._where}: unknown persistent id {pid!r:.80}")
        _, kind, key, _location, numel = pid
        if key not in self._storages:
            raw = self._archive.read(f"{self._top}/data/{key}")
            if kind.dtype == "bfloat16":
                half = np.frombuffer(raw, self._order + "u2")
                array = (half.astype(np.uint32) << 16).view(np.float32)
            else:
                array = np.frombuffer(raw, np.dtype(kind.dtype).newbyteorder(self._order))
            if array.size < numel:
                raise CheckpointError(
                    f"{self._where}: storage {key} holds {array.size} elements, expected {numel}"
                )
            self._storages[key] = array.astype(array.dtype.newbyteorder("="))
        return self._storages[key]


def _legacy_error(path):
    return CheckpointError(
        f"{path} is in PyTorch's old (pre-1.6, non-zip) format, which this reader does not "
        "read. Re-save it with a current torch (torch.save(torch.load(path, weights_only=True),"
        " new_path)), or install torch, which reads it."
    )


def read_torch_zip(path):
    """Read a PyTorch zip checkpoint into NumPy arrays, dicts and lists, running no code.

    Raises:
        CheckpointError: not a checkpoint, the old non-zip format, truncated or
            corrupt, or a pickle asking for anything but tensors (named).
    """
    path = str(path)
    try:
        with open(path, "rb") as f:
            head = f.read(512)
    except OSError as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {e}") from e
    if not head:
        raise CheckpointError(f"{path} is empty.")
    if not head.startswith(b"PK\x03\x04"):
        if head[:1] == b"\x80" or head[257:262] == b"ustar":
            raise _legacy_error(path)
        raise CheckpointError(f"{path} is not a PyTorch checkpoint (no zip or pickle header).")
    try:
        with zipfile.ZipFile(path) as archive:
            pickles = [n for n in archive.namelist() if n.endswith("/data.pkl")]
            if len(pickles) != 1:
                raise CheckpointError(
                    f"{path} is a zip file but not a PyTorch checkpoint "
                    f"(expected one <top>/data.pkl, found {len(pickles)})."
                )
            top = pickles[0][: -len("/data.pkl")]
            names = set(archive.namelist())
            order = "little"
            if f"{top}/byteorder" in names:
                order = archive.read(f"{top}/byteorder").decode().strip()
            data = archive.open(pickles[0])
            return _Unpickler(data, archive, top, order, path).load()
    except CheckpointError:
        raise
    except (zipfile.BadZipFile, EOFError, zlib.error, OSError, KeyError,
            pickle.UnpicklingError) as e:
        raise CheckpointError(
            f"{path} is truncated or corrupt ({type(e).__name__}: {e}). Copy it again from "
            "where it was saved."
        ) from e
