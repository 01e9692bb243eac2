"""Writers of PyTorch's two checkpoint formats, so tests make checkpoints without torch.

    write_torch_zip(obj, path)      torch.save's zip format (PyTorch >= 1.6)
    write_torch_legacy(obj, path)   torch.save(..., _use_new_zipfile_serialization=False),
                                    the format of PyTorch < 1.6

`obj` holds dicts, lists, tuples, numbers, strings and NumPy arrays; each array becomes a
tensor with a storage of its own. Their pickles are byte for byte torch's (protocol 2,
torch's persistent ids and memo order: tests/test_checkpoint_reader.py compares them
with the files torch wrote in tests/fixtures). To forge a file, `obj` may also hold:

    Tensor(storage, size, stride, offset)     any view of a Storage, shared or not
    Storage(values, type_name, numel, key, raw)  its declared count and bytes may lie
    Global(module, name), Call(Global, args)  a global, and a call of one

and `pickled=(data_pkl_bytes, {key: Storage})` replaces the pickle altogether.
"""

import collections
import io
import pickle
import struct
import zipfile

import numpy as np

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001
LEGACY_SYS_INFO = {"protocol_version": LEGACY_PROTOCOL, "little_endian": True,
                   "type_sizes": {"short": 2, "int": 4, "long": 4}}  # what torch 2.x writes

_TYPE_NAMES = {
    np.dtype(np.float32): "FloatStorage", np.dtype(np.float64): "DoubleStorage",
    np.dtype(np.float16): "HalfStorage", np.dtype(np.int64): "LongStorage",
    np.dtype(np.int32): "IntStorage", np.dtype(np.int16): "ShortStorage",
    np.dtype(np.int8): "CharStorage", np.dtype(np.uint8): "ByteStorage",
    np.dtype(np.bool_): "BoolStorage",
}


class Global:
    """`module.name` as a pickle names it; never resolved here."""

    def __init__(self, module, name):
        self.module, self.name = module, name

    def __call__(self, *args):  # pickle's save_reduce wants a callable; never called
        raise NotImplementedError


class Call:
    """`func(*args)` in the pickle (REDUCE): what the reader would call."""

    def __init__(self, func, args):
        self.func, self.args = func, tuple(args)


class Storage:
    """One storage: 1-D `values` (its bytes little-endian, or `raw`), its torch type name,
    the element count its persistent id declares, and its key (default: its rank)."""

    def __init__(self, values, type_name=None, numel=None, key=None, raw=None):
        values = np.ascontiguousarray(values).reshape(-1)
        self.type_name = type_name or _TYPE_NAMES[values.dtype]
        if raw is None and self.type_name == "BFloat16Storage":  # the high half of float32
            raw = (values.astype("<f4").view("<u4") >> 16).astype("<u2").tobytes()
        self.raw = raw if raw is not None else values.astype(values.dtype.newbyteorder("<")).tobytes()
        self.numel = values.size if numel is None else numel
        self.count = values.size  # the legacy format's element count before the bytes
        self.key = key


class Tensor:
    """torch._utils._rebuild_tensor_v2(storage, offset, size, stride, False, OrderedDict())."""

    def __init__(self, storage, size, stride, offset=0):
        self.storage, self.size, self.stride, self.offset = storage, size, stride, offset

    @classmethod
    def of(cls, array):
        array = np.asarray(array)
        strides = np.array(array, order="C").strides  # (ascontiguousarray makes 0-d 1-d)
        return cls(Storage(array), tuple(array.shape),
                   tuple(s // array.itemsize for s in strides))


class _Key(str):
    """A storage key: its own object, so the memo refers to it only where torch's does."""


class _Pickler(pickle._Pickler):  # the Python pickler: its dispatch table can be extended
    dispatch = dict(pickle._Pickler.dispatch)

    def __init__(self, file, legacy):
        super().__init__(file, protocol=2)
        self.legacy, self.storages, self.globals = legacy, {}, {}

    def persistent_id(self, obj):
        if not isinstance(obj, Storage):
            return None
        if id(obj) not in self.storages:
            self.storages[id(obj)] = (_Key(obj.key or len(self.storages)), obj)
        key = self.storages[id(obj)][0]
        if self.legacy:  # torch < 1.6 made the key string anew at each mention
            return ("storage", Global("torch", obj.type_name), _Key(key), "cpu", obj.numel, None)
        return ("storage", Global("torch", obj.type_name), key, "cpu", obj.numel)

    def save_key(self, key):
        encoded = str.encode(key, "utf-8")
        self.write(pickle.BINUNICODE + struct.pack("<I", len(encoded)) + encoded)
        self.memoize(key)

    def save_global_ref(self, g):  # one GLOBAL per name, then the memo, as for real globals
        if (g.module, g.name) in self.globals:
            self.write(self.get(self.globals[(g.module, g.name)]))
            return
        self.write(pickle.GLOBAL + f"{g.module}\n{g.name}\n".encode())
        self.memoize(g)
        self.globals[(g.module, g.name)] = self.memo[id(g)][0]

    def save_tensor(self, t):
        args = (t.storage, t.offset, tuple(t.size), tuple(t.stride), False,
                collections.OrderedDict())
        self.save_reduce(Global("torch._utils", "_rebuild_tensor_v2"), args, obj=t)

    def save_array(self, array):
        self.save(Tensor.of(array))

    def save_call(self, call):
        self.save_reduce(call.func, call.args, obj=call)

    dispatch[_Key] = save_key
    dispatch[Global] = save_global_ref
    dispatch[Tensor] = save_tensor
    dispatch[np.ndarray] = save_array
    dispatch[Call] = save_call


def torch_pickle(obj, legacy=False):
    """(the pickle of `obj` as torch writes it, {key: Storage} in order of first use)."""
    buffer = io.BytesIO()
    pickler = _Pickler(buffer, legacy)
    pickler.dump(obj)
    return buffer.getvalue(), {str(key): storage for key, storage in pickler.storages.values()}


def write_torch_zip(obj, path, *, pickled=None, compress=False, byteorder="little"):
    """torch.save's zip layout (`compress`: its storage entries deflated, as torch never does;
    `byteorder` "big": as a big-endian machine writes, each storage then given by `raw`)."""
    data, storages = pickled or torch_pickle(obj)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", data)
        z.writestr("archive/byteorder", byteorder)
        for key, storage in storages.items():
            z.writestr(f"archive/data/{key}", storage.raw,
                       zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED)
        z.writestr("archive/version", "3\n")


def legacy_bytes(obj, *, pickled=None):
    """The bytes of `obj` in the legacy format: the five pickles, then the storages."""
    data, storages = pickled or torch_pickle(obj, legacy=True)
    out = io.BytesIO()
    for header in (LEGACY_MAGIC, LEGACY_PROTOCOL, LEGACY_SYS_INFO):
        pickle.dump(header, out, protocol=2)
    out.write(data)
    keys = sorted(storages)
    pickle.dump(keys, out, protocol=2)
    for key in keys:
        out.write(int(storages[key].count).to_bytes(8, "little", signed=True))
        out.write(storages[key].raw)
    return out.getvalue()


def write_torch_legacy(obj, path, *, pickled=None):
    """torch.save(obj, path, _use_new_zipfile_serialization=False), without torch."""
    with open(path, "wb") as f:
        f.write(legacy_bytes(obj, pickled=pickled))
