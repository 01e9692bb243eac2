"""A restricted reader of PyTorch checkpoints, both formats of `torch.save`, without torch.

The zip format (the default since PyTorch 1.6) is a zip archive with one top folder:
`<top>/data.pkl` holds the object, pickled; `<top>/data/<key>` the raw bytes of each
storage, stored uncompressed; `<top>/byteorder` "little" or "big" (little if absent).

The legacy format (before 1.6, so what the Bi-Real and ReActNet authors' torch 1.3 / 1.4
wrote) is one file of five consecutive pickles: the magic number 0x1950a86a20f9469cfc6c,
the protocol version 1001, a sys-info dict, the object, and the sorted list of storage
keys. Then, for each key in that order, its element count (int64, little-endian) and its
bytes (little-endian).

In both pickles a tensor is `torch._utils._rebuild_tensor_v2(storage, offset, size,
stride, ...)` (offset, size and stride in elements), and a storage is the persistent id
`("storage", torch.<Type>Storage, key, location, numel[, view])`; the legacy `view`,
`(key, offset, numel)` or None, names a slice of the storage.

Safety, for files from anywhere:
- No code runs. Unpickling calls only what `find_class` returns: this module's own
  constructors for the tensor names above and for `collections.OrderedDict`. Any other
  global is refused by name before anything is called. The result holds only NumPy
  arrays, dicts, lists, tuples, numbers, strings, booleans and None; anything else
  (a bare storage, a set, a function) is refused by name.
- Memory and reading are bounded by the file. Each pickle is first scanned opcode by
  opcode, so that no length it declares runs past its end and no memo index exceeds its
  opcode count (CPython's unpickler allocates both before reading: a 12-byte pickle can
  otherwise take gigabytes). A storage's byte size must equal its element count times
  its item size, and all storages together must fit in the file, before a byte of them
  is read. Zip entries must be stored, not compressed, as torch.save writes them.
- A tensor is a view of its storage, never a copy (tensors that share a storage share
  memory, as in torch), and may not hold more elements than its storage: a view declared
  40000 x 40000 over one float is refused.
- Every failure is one `CheckpointError` of one line that names the file and the cause.
"""

import collections
import io
import math
import pickle
import pickletools
import struct
import zipfile
import zlib

import numpy as np

__all__ = ["CheckpointError", "read_torch_checkpoint", "read_torch_zip"]

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001
_MAX_DIMS = 32  # NumPy 1.x holds at most 32 dimensions
_MAX_INDEX = 2**63  # sizes, strides and offsets are int64 in torch
# Everything the standard library and NumPy raise on malformed input; anything else is a bug.
_FILE_ERRORS = (pickle.UnpicklingError, EOFError, zipfile.BadZipFile, zipfile.LargeZipFile,
                zlib.error, struct.error, OSError, LookupError, TypeError, ValueError,
                AttributeError, ArithmeticError, MemoryError, RuntimeError)


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the network."""


class _Bad(Exception):
    """A defect of the file, said without the file's name (the reader adds it)."""


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


class _StorageType(collections.namedtuple("_StorageType", "name itemsize")):
    """torch.<Name>Storage named in a pickle: a marker, immutable, never called."""

    __slots__ = ()

    @classmethod
    def named(cls, name):
        dtype = _STORAGES[name]
        return cls(name, 2 if dtype == "bfloat16" else np.dtype(dtype).itemsize)

    def __call__(self, *args):
        raise _Bad(f"its pickle calls torch.{self.name}; a storage may only be referred to")

    def decode(self, raw, order):
        """The storage's values from its raw bytes in byte order `order` ("<" or ">")."""
        dtype = _STORAGES[self.name]
        if dtype == "bfloat16":  # the high half of a float32
            return (np.frombuffer(raw, order + "u2").astype(np.uint32) << 16).view(np.float32)
        if dtype == np.bool_:
            return np.frombuffer(raw, np.uint8) != 0
        return np.frombuffer(raw, np.dtype(dtype).newbyteorder(order)).astype(dtype)


class _Storage(collections.namedtuple("_Storage", "size array")):
    """A storage of `size` elements as the pickle sees it: immutable; `array` is its 1-D
    values, or None while only its declaration is known (the legacy format's first pass)."""

    __slots__ = ()

    @classmethod
    def of(cls, array):
        return cls(array.size, array)  # the bounds of its tensors: what was read, not declared

    def slice(self, offset, size):
        return _Storage(size, None if self.array is None else self.array[offset:offset + size])


def _is_index(value):
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < _MAX_INDEX


def _clip(text, limit=80):
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _short(value, depth=0):
    """A short repr of a pickled value for an error message: bounded in length and depth."""
    if isinstance(value, int) and not -2**64 < value < 2**64:
        return f"<an integer of {value.bit_length()} bits>"
    if isinstance(value, (str, bytes, int, float, type(None))):
        return _clip(repr(value))
    if isinstance(value, (tuple, list)) and depth < 2:
        items = [_short(v, depth + 1) for v in value[:8]] + (["..."] if len(value) > 8 else [])
        text = ", ".join(items)
        return _clip(f"({text})" if isinstance(value, tuple) else f"[{text}]")
    return f"<a {type(value).__name__}>"


def _rebuild_tensor(storage, offset, size, stride, *_ignored):
    """The tensor of `size` in `storage` from `offset` with `stride` (in elements): a view."""
    if not isinstance(storage, _Storage):
        raise _Bad(f"a tensor refers to {_short(storage)}, not to a storage")
    if not (isinstance(size, (tuple, list)) and isinstance(stride, (tuple, list))
            and len(size) == len(stride) <= _MAX_DIMS
            and all(_is_index(v) for v in (offset, *size, *stride))):
        raise _Bad(f"a tensor has size {_short(size)}, stride {_short(stride)}, offset "
                   f"{_short(offset)}: expected two tuples of at most {_MAX_DIMS} integers "
                   "in [0, 2**63) and an offset in that range")
    numel = math.prod(size)
    if numel > storage.size:
        raise _Bad(f"a tensor of size {tuple(size)} holds {numel} elements, more than its "
                   f"storage's {storage.size}")
    if math.prod(n for n in size if n) >= 2**60:  # only an empty tensor gets here
        raise _Bad(f"a tensor of size {tuple(size)} is too large for any array")
    if numel:
        last = offset + sum((n - 1) * s for n, s in zip(size, stride))
        if last >= storage.size:  # as_strided does not check bounds: we must
            raise _Bad(f"a tensor of size {tuple(size)}, stride {tuple(stride)} and offset "
                       f"{offset} reaches element {last} of a storage of {storage.size}")
    if storage.array is None:
        return None
    values = storage.array
    if not numel:
        return np.zeros(size, values.dtype)
    # A dimension of one element never moves: its stride may be anything, NumPy's may not.
    steps = [s * values.itemsize if n > 1 else 0 for n, s in zip(size, stride)]
    return np.lib.stride_tricks.as_strided(values[offset:], shape=tuple(size), strides=steps)


def _rebuild_parameter(data, *_ignored):
    return data


def _ordered_dict(*args):
    """collections.OrderedDict(pairs): the one container torch's pickles build by a call."""
    if len(args) > 1 or (args and not isinstance(args[0], (list, tuple, dict))):
        raise _Bad("its pickle builds an OrderedDict from "
                   f"{', '.join(_short(a) for a in args)}, not from one sequence of pairs")
    try:
        return collections.OrderedDict(*args)
    except (TypeError, ValueError) as e:
        raise _Bad(f"its pickle builds an OrderedDict from items that are not pairs ({e})") from e


_ALLOWED = {
    ("collections", "OrderedDict"): _ordered_dict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
}


def _scan_pickle(stream, what):
    """Check the pickle at `stream`'s position before the unpickler sees it; return its length.

    CPython's unpickler allocates what a pickle declares before it reads: the bytes of a
    BINBYTES8 / BYTEARRAY8, and a memo table up to the largest PUT index (zero-filled).
    pickletools reads every opcode and its argument without building anything, and fails
    on a length past the end; a memo index is bounded by the number of opcodes.
    """
    start, opcodes, top = stream.tell(), 0, -1
    try:
        for opcode, arg, _ in pickletools.genops(stream):
            opcodes += 1
            if opcode.name in ("PUT", "BINPUT", "LONG_BINPUT"):
                top = max(top, arg)
    except ValueError as e:  # a length past the end, an unknown opcode, no STOP
        raise _Bad(f"{what} is truncated or corrupt ({str(e)[:200]})") from e
    if top >= opcodes:
        raise _Bad(f"{what} stores memo entry {top} in {opcodes} opcodes: corrupt or forged")
    return stream.tell() - start


class _Unpickler(pickle.Unpickler):
    """One pickle of a checkpoint; `storage(key, kind, numel)` gives the storages."""

    def __init__(self, data, storage):
        super().__init__(io.BytesIO(data), encoding="utf-8")  # utf-8 as torch.load
        self._storage = storage

    def find_class(self, module, name):
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        if module in ("torch", "torch.cuda") and name in _STORAGES:
            return _StorageType.named(name)
        raise _Bad(
            f"refused: its pickle asks for '{_clip(f'{module}.{name}')}', which "
            "is not a tensor, dict, list, number or string. Loading it with a plain unpickler "
            "could run code; this reader calls nothing outside PyTorch's tensor constructors. "
            "Re-save only the state dict (torch.save(model.state_dict(), path)) from a "
            "trusted copy."
        )

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) in (5, 6) and pid[0] == "storage"):
            raise _Bad(f"its pickle has an unknown persistent id {_short(pid)}")
        _, kind, key, _location, numel, *view = pid
        if not isinstance(kind, _StorageType):
            raise _Bad(f"a storage has the type {_short(kind)}, not torch.<Type>Storage")
        if not isinstance(key, str) or not _is_index(numel):
            raise _Bad(f"a storage has key {_short(key)} and element count {_short(numel)}: "
                       "expected a string and an integer in [0, 2**63)")
        storage = self._storage(key, kind, numel)
        if not view or view[0] is None:
            return storage
        if not (isinstance(view[0], tuple) and len(view[0]) == 3
                and all(_is_index(v) for v in view[0][1:])
                and view[0][1] + view[0][2] <= storage.size):
            raise _Bad(f"storage {key} has the view {_short(view[0])}, not (key, offset, "
                       f"count) within its {storage.size} elements")
        return storage.slice(view[0][1], view[0][2])


class _Declarations:
    """Storages known by declaration only: each key's type and element count, checked to be
    the same at every mention."""

    def __init__(self):
        self.kinds = {}

    def __call__(self, key, kind, numel):
        if self.kinds.setdefault(key, (kind, numel)) != (kind, numel):
            first = self.kinds[key]
            raise _Bad(f"storage {key} is declared as {first[1]} x {first[0].name} and as "
                       f"{numel} x {kind.name}")
        return _Storage(numel, None)


class _ZipStorages(_Declarations):
    """The entries of a zip checkpoint, each storage read once, after its entry is checked
    against its declaration, and all of them within the file's size."""

    def __init__(self, archive, top, file_size):
        super().__init__()
        self.archive, self.top, self.file_size = archive, top, file_size
        self.order, self.declared_bytes, self.loaded = "<", 0, {}

    def entry(self, name, nbytes=None):
        """The bytes of entry `name`: stored, and `nbytes` long when that is given."""
        try:
            info = self.archive.getinfo(name)
        except KeyError:
            raise _Bad(f"it has no entry {name}") from None
        if info.compress_type != zipfile.ZIP_STORED:
            raise _Bad(f"its entry {name} is compressed (zip method {info.compress_type}); "
                       "torch.save stores every entry uncompressed, and this reader does not "
                       "inflate data of unchecked size")
        if nbytes is not None and info.file_size != nbytes:
            raise _Bad(f"its entry {name} holds {info.file_size} bytes, its declaration needs "
                       f"{nbytes}")
        self.declared_bytes += max(info.file_size, info.compress_size)
        if self.declared_bytes > self.file_size:
            raise _Bad(f"its entries declare {self.declared_bytes} bytes or more, beyond the "
                       f"file's {self.file_size} (at entry {name})")
        data = self.archive.read(name)
        if len(data) != info.file_size:  # a stored entry's directory sizes can disagree
            raise _Bad(f"its entry {name} holds {len(data)} bytes, its directory says "
                       f"{info.file_size}")
        return data

    def __call__(self, key, kind, numel):
        super().__call__(key, kind, numel)
        if key not in self.loaded:
            raw = self.entry(f"{self.top}/data/{key}", numel * kind.itemsize)
            self.loaded[key] = _Storage.of(kind.decode(raw, self.order))
        return self.loaded[key]


def _read_zip(path, file_size):
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        pickles = [n for n in names if n.endswith("/data.pkl")]
        if len(pickles) != 1:
            raise _Bad("a zip file but not a PyTorch checkpoint (expected one <top>/data.pkl, "
                       f"found {len(pickles)})")
        top = pickles[0][: -len("/data.pkl")]
        storages = _ZipStorages(archive, top, file_size)
        if f"{top}/byteorder" in names:
            order = storages.entry(f"{top}/byteorder").strip()
            if order not in (b"little", b"big"):
                raise _Bad(f"its byteorder entry says {_short(order[:20])}, not little or big")
            storages.order = "<" if order == b"little" else ">"
        data = storages.entry(pickles[0])
        _scan_pickle(io.BytesIO(data), "its data.pkl")
        return _Unpickler(data, storages).load()


def _no_storage(key, kind, numel):
    raise _Bad(f"a storage ({key}) in the legacy format's header")


def _read_legacy(data):
    """The object of a legacy checkpoint in `data` (its bytes), in two passes.

    The storages' bytes come after the object's pickle, so the first pass unpickles it
    only to collect and check each storage's declaration; the second builds the tensors.
    """
    stream = io.BytesIO(data)

    def next_pickle(what):
        start = stream.tell()
        return data[start:start + _scan_pickle(stream, what)]

    try:
        magic = _Unpickler(next_pickle("magic number"), _no_storage).load()
    except (_Bad, *_FILE_ERRORS):
        magic = None
    if magic != LEGACY_MAGIC:
        raise _Bad("not a PyTorch checkpoint: neither a zip archive (torch >= 1.6) nor "
                   "torch's legacy format (its magic number)")
    version = _Unpickler(next_pickle("the protocol version"), _no_storage).load()
    if version != LEGACY_PROTOCOL:
        raise _Bad(f"legacy format of protocol version {_short(version)}, expected "
                   f"{LEGACY_PROTOCOL}")
    _Unpickler(next_pickle("the sys-info dict"), _no_storage).load()  # byte order: always little
    obj = next_pickle("the object's pickle")
    keys = _Unpickler(next_pickle("the storage key list"), _no_storage).load()
    if not (isinstance(keys, list) and all(isinstance(k, str) for k in keys)
            and len(set(keys)) == len(keys)):
        raise _Bad(f"its storage key list is {_short(keys)}, not a list of distinct strings")

    declared = _Declarations()
    _Unpickler(obj, declared).load()
    if set(keys) != set(declared.kinds):
        raise _Bad(f"its storage key list ({len(keys)} keys) does not match the "
                   f"{len(declared.kinds)} storages its pickle refers to")
    at, storages = stream.tell(), {}
    for key in keys:
        kind, numel = declared.kinds[key]
        nbytes = numel * kind.itemsize
        if at + 8 + nbytes > len(data):
            raise _Bad(f"truncated: storage {key} needs {8 + nbytes} bytes at byte {at}, "
                       f"{len(data) - at} remain")
        (count,) = struct.unpack_from("<q", data, at)
        if count != numel:
            raise _Bad(f"storage {key} holds {count} elements, its declaration says {numel}")
        storages[key] = _Storage.of(kind.decode(data[at + 8:at + 8 + nbytes], "<"))
        at += 8 + nbytes
    return _Unpickler(obj, lambda key, kind, numel: storages[key]).load()


_PLAIN = (np.ndarray, str, bytes, int, float, bool, type(None))


def _check_result(result):
    """Refuse, by name, anything in the result but arrays, containers, numbers and strings."""
    todo, seen = [result], set()
    while todo:
        value = todo.pop()
        if isinstance(value, _PLAIN) or id(value) in seen:
            continue
        seen.add(id(value))
        if isinstance(value, dict):
            todo.extend(value.keys())
            todo.extend(value.values())
        elif isinstance(value, (list, tuple)) and not isinstance(value, (_Storage, _StorageType)):
            todo.extend(value)
        else:
            what = "a storage outside any tensor" if isinstance(value, _Storage) else (
                f"torch.{value.name} as a value" if isinstance(value, _StorageType)
                else f"a {type(value).__name__}")
            raise _Bad(f"refused: its object holds {what}, not a tensor, dict, list, tuple, "
                       "number or string")
    return result


def read_torch_checkpoint(path):
    """Read a PyTorch checkpoint (zip or legacy format) into NumPy arrays, dicts and lists.

    Runs no code and reads at most the file. Tensors are NumPy views of their storages
    (bfloat16 as float32).

    Raises:
        CheckpointError: not a checkpoint, truncated or corrupt, sizes that do not fit,
            or a pickle asking for anything but tensors (named); one line naming the file.
    """
    path = str(path)
    try:
        with open(path, "rb") as f:
            size = f.seek(0, io.SEEK_END)
            f.seek(0)
            head = f.read(512)
            f.seek(0)
            data = None if head.startswith(b"PK\x03\x04") else f.read()
    except OSError as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {e}") from e
    try:
        if not head:
            raise _Bad("empty")
        if head[257:262] == b"ustar":
            raise _Bad("PyTorch's first format (a tar archive), which this reader does not "
                       "read; load it with torch and save it again")
        return _check_result(_read_zip(path, size) if data is None else _read_legacy(data))
    except _Bad as e:
        raise CheckpointError(f"{path}: {e}") from None
    except _FILE_ERRORS as e:
        cause = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        raise CheckpointError(
            f"{path} is truncated or corrupt ({type(e).__name__}{': ' if cause else ''}{cause})."
            " Copy it again from where it was saved."
        ) from e


read_torch_zip = read_torch_checkpoint  # its name before it read the legacy format too
