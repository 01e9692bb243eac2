"""The restricted PyTorch checkpoint reader (bireal_tf/interop/torch_reader.py).

- Files torch wrote (tests/fixtures, both formats) read as torch wrote them.
- The tests' writers (tests/torch_files.py) write torch's bytes, so full-size checkpoints
  are made here: a legacy-format Bi-Real-18 loads with from_pytorch.
- Hostile files, each built here from bytes: five that used to end in a raw exception,
  and those found while fixing them. Each gives one CheckpointError line naming the file,
  within a memory bound.
- Fuzzing (Hypothesis) of the committed fixtures: bytes, zip entries, pickle opcodes and
  the integers in them (sizes, strides, offsets, element counts).
"""
import collections
import contextlib
import functools
import io
import pickle
import pickletools
import re
import resource
import tracemalloc
import warnings
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bireal_tf.interop import CheckpointError, from_pytorch, load_checkpoint, read_torch_checkpoint
from tests.test_interop import authors_wrapper, random_state
from tests.torch_files import (Call, Global, Storage, Tensor, legacy_bytes, torch_pickle,
                               write_torch_legacy, write_torch_zip)

FIXTURES = Path(__file__).parent / "fixtures"
MARKER = "BIREAL_TF_PICKLE_RAN_CODE"
FORMATS = ("zip", "legacy")
WRITE = {"zip": write_torch_zip, "legacy": write_torch_legacy}
MiB = 2**20


@contextlib.contextmanager
def address_space_cap(extra=512 * MiB):
    """Cap this process's address space at its present size + `extra` (Linux), so that a
    reader that regressed meets a MemoryError here rather than exhausting the machine."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[0])
    except OSError:
        yield
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    cap = pages * resource.getpagesize() + extra
    resource.setrlimit(resource.RLIMIT_AS, (cap if hard == resource.RLIM_INFINITY
                                            else min(cap, hard), hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def peak_memory(fn):
    """(fn(), the peak of Python and NumPy allocations while it ran, in bytes), under the cap."""
    tracing = tracemalloc.is_tracing()
    if not tracing:
        tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    tracemalloc.reset_peak()
    try:
        with address_space_cap():
            result = fn()
    finally:
        peak = tracemalloc.get_traced_memory()[1] - base
        if not tracing:
            tracemalloc.stop()
    return result, peak


def refused(path, pattern, memory=1 * MiB):
    """The reader's CheckpointError for `path`: one line, naming the file, matching `pattern`,
    raised within `memory` bytes of allocations."""
    def read():
        with pytest.raises(CheckpointError) as err:
            read_torch_checkpoint(path)
        return str(err.value)

    text, peak = peak_memory(read)
    assert "\n" not in text and str(path) in text and "MemoryError" not in text, text
    assert re.search(pattern, text), text
    assert peak < memory, f"{peak / MiB:.1f} MiB for: {text}"
    return text


class StorageKeys(pickle.Unpickler):
    """Storage declarations (type, key, count) of one of OUR fixtures' pickles, in order.
    (Test-side only: the globals resolve to inert stand-ins that call nothing.)"""

    def __init__(self, data):
        super().__init__(io.BytesIO(data))
        self.declared = {}

    def find_class(self, module, name):
        if name.endswith("Storage"):
            return name
        return lambda *args: type("Anything", (dict,), {})()

    def persistent_load(self, pid):
        self.declared.setdefault(pid[2], (pid[1], pid[4]))


def legacy_parts(data):
    """The legacy file `data` as [(what, bytes)]: its five pickles, then each storage."""
    stream, parts = io.BytesIO(data), []
    for what in ("magic", "version", "sys info", "object", "keys"):
        start = stream.tell()
        for _ in pickletools.genops(stream):
            pass
        parts.append((what, data[start:stream.tell()]))
    keys = pickle.loads(parts[-1][1])
    declared = StorageKeys(parts[3][1])
    declared.load()
    itemsize = {"FloatStorage": 4, "DoubleStorage": 8, "HalfStorage": 2, "BFloat16Storage": 2,
                "LongStorage": 8, "IntStorage": 4, "ShortStorage": 2, "CharStorage": 1,
                "ByteStorage": 1, "BoolStorage": 1}
    at = stream.tell()
    for key in keys:
        kind, numel = declared.declared[key]
        end = at + 8 + numel * itemsize[kind]
        parts.append((f"storage {key}", data[at:end]))
        at = end
    assert b"".join(p for _, p in parts) == data
    return parts


# --- files torch wrote ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def expected():
    return dict(np.load(FIXTURES / "torch_expected.npz"))


@pytest.mark.parametrize("name", ["torch_tensors.pt", "torch_tensors_legacy.pt"])
def test_torchs_files_read_as_torch_wrote_them(name, expected):
    got = read_torch_checkpoint(FIXTURES / name)
    paths = [p for p in expected if p.split("/")[0] in got and p != "shared/whole"]
    assert len(paths) == 22  # the others are the wrapper's, and the views' whole storage
    for path in paths:
        node = got
        for part in path.split("/"):
            node = node[int(part)] if isinstance(node, list) else node[part]
        array = expected[path]
        assert isinstance(node, np.ndarray) and node.shape == array.shape, path
        np.testing.assert_array_equal(node, array, err_msg=path)
        assert node.dtype == (np.float32 if path == "dtypes/bfloat16" else array.dtype), path
    assert got["nested"]["list"][1:] == [7, 2.5, "text"] and got["flags"] == (True, False, None)
    assert int(got["count"]) == 123456789012 and got["count"].shape == ()
    # A real state dict: an OrderedDict with its _metadata, as torch.load gives it.
    assert type(got["module"]) is collections.OrderedDict
    assert got["module"]._metadata["1"] == {"version": 2}
    # Views of one storage share its memory, as in torch.
    assert np.shares_memory(got["shared"]["middle"], got["shared"]["every_other"])


def test_the_authors_wrapper_reads_the_same_in_both_formats():
    zipped = load_checkpoint(FIXTURES / "torch_wrapper.pth.tar", reader="restricted")
    legacy = load_checkpoint(FIXTURES / "torch_wrapper_legacy.pth.tar", reader="restricted")
    assert set(zipped) == set(legacy) and len(zipped) == 4
    for key in zipped:
        np.testing.assert_array_equal(zipped[key], legacy[key])
    raw = read_torch_checkpoint(FIXTURES / "torch_wrapper_legacy.pth.tar")
    assert raw["epoch"] == 3 and raw["optimizer"]["param_groups"][0]["lr"] == 0.001


def test_a_big_endian_zip_reads_the_same_values(tmp_path):
    values = {"f": np.array([1.5, -2.0, 3e-3], np.float32), "i": np.array([1, -2**40], np.int64),
              "h": np.array([0.5, -4.0], np.float16)}
    obj = {k: Tensor(Storage(v, raw=v.astype(v.dtype.newbyteorder(">")).tobytes()), v.shape, (1,))
           for k, v in values.items()}
    write_torch_zip(obj, tmp_path / "big.pt", byteorder="big")
    got = read_torch_checkpoint(tmp_path / "big.pt")
    for key, array in values.items():
        np.testing.assert_array_equal(got[key], array)
        assert got[key].dtype == array.dtype and got[key].dtype.isnative


def test_the_code_running_legacy_pickle_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    refused(FIXTURES / "torch_runs_code_legacy.pt", r"refused: its pickle asks for 'posix\.system'")
    assert not (tmp_path / MARKER).exists()


# --- the tests' writers write torch's bytes --------------------------------------------------

def fixture_object(keys, expected, metadata):
    """make_torch_fixtures.py's `tensors`, as Tensor / Storage objects with torch's keys."""
    keys = iter(keys)

    def tensor(array, type_name=None):
        t = Tensor.of(array)
        t.storage = Storage(array, type_name=type_name, key=next(keys))
        return t

    b = expected["nested/b"]
    obj = {"a": tensor(expected["a"]), "nested": {"b": tensor(b)}}
    obj["nested"]["bt"] = Tensor(Storage(b, key=next(keys)), (5, 3, 2), (1, 5, 15))
    obj["nested"]["list"] = [tensor(expected["a"][0]), 7, 2.5, "text"]
    obj["count"] = tensor(np.array(123456789012, np.int64))
    obj["dtypes"] = {name: tensor(expected[f"dtypes/{name}"],
                                  "BFloat16Storage" if name == "bfloat16" else None)
                     for name in ("float64", "float16", "bfloat16", "int32", "int16", "int8",
                                  "uint8", "bool")}
    whole = Storage(expected["shared/whole"], key=next(keys))
    obj["shared"] = {"middle": Tensor(whole, (3,), (1,), 2),
                     "every_other": Tensor(whole, (5,), (2,), 1)}
    module = collections.OrderedDict(
        (k, tensor(expected[f"module/{k}"])) for k in ("0.weight", "0.bias", "1.weight",
                                                       "1.bias", "1.running_mean",
                                                       "1.running_var", "1.num_batches_tracked"))
    module._metadata = metadata
    obj["module"] = module
    obj["flags"] = (True, False, None)
    return obj


def test_legacy_writer_writes_torchs_file_byte_for_byte(expected):
    data = (FIXTURES / "torch_tensors_legacy.pt").read_bytes()
    declared = StorageKeys(legacy_parts(data)[3][1])
    declared.load()
    metadata = read_torch_checkpoint(FIXTURES / "torch_tensors_legacy.pt")["module"]._metadata
    assert legacy_bytes(fixture_object(declared.declared, expected, metadata)) == data


def test_zip_writer_writes_torchs_pickle_and_storages(expected):
    with zipfile.ZipFile(FIXTURES / "torch_tensors.pt") as z:
        top = z.namelist()[0].split("/")[0]
        data = z.read(f"{top}/data.pkl")
        declared = StorageKeys(data)
        declared.load()
        metadata = read_torch_checkpoint(FIXTURES / "torch_tensors.pt")["module"]._metadata
        ours, storages = torch_pickle(fixture_object(declared.declared, expected, metadata))
        assert ours == data
        assert list(storages) == [str(i) for i in range(21)]
        for key, storage in storages.items():
            assert z.read(f"{top}/data/{key}") == storage.raw, key


# --- a Bi-Real-18 checkpoint as the authors' torch 1.3 saved it ------------------------------

def in_torch_layout(layer):
    """{authors' key: array} of a Keras layer's weights, mapped back to PyTorch's layouts."""
    prefix = re.sub(r"^(layer\d)_(\d+)_", r"\1.\2.", layer.name).replace("downsample_", "downsample.")
    weights = layer.get_weights()
    if len(weights) == 4:  # BatchNormalization
        names = ("weight", "bias", "running_mean", "running_var")
    elif len(weights) == 2:  # the classifier: (F, C) kernel and bias
        names, weights = ("weight", "bias"), [weights[0].T, weights[1]]
    elif layer.name.endswith("binary_conv"):  # the 18/34 code's flat (O*I*k*k, 1) parameter
        names, weights = ("weights",), [weights[0].transpose(3, 2, 0, 1).reshape(-1, 1)]
    else:  # HWIO -> OIHW
        names, weights = ("weight",), [weights[0].transpose(3, 2, 0, 1)]
    return {f"{prefix}.{name}": value for name, value in zip(names, weights)}


def test_legacy_bireal18_checkpoint_loads_every_tensor_into_its_layer(tmp_path):
    state = random_state(18, num_classes=5, seed=7)
    path = tmp_path / "checkpoint.pth.tar"
    write_torch_legacy(authors_wrapper(state), path)  # 45 MB, as torch 1.3's train.py saved it
    read = load_checkpoint(path, reader="restricted")
    assert set(read) == set(state)
    for key in state:
        np.testing.assert_array_equal(read[key], state[key], err_msg=key)

    model = from_pytorch(path, 18, input_shape=(32, 32, 3))  # torch's reader where installed
    landed = {}
    for layer in model.layers:
        if layer.weights:
            landed.update(in_torch_layout(layer))
    assert set(landed) == {k for k in state if not k.endswith("num_batches_tracked")}
    for key, value in landed.items():
        np.testing.assert_array_equal(value, state[key], err_msg=key)


# --- hostile files: five that used to raise raw exceptions, and those found while fixing them ---

ONE_FLOAT = np.ones(1, np.float32)


def hostile(fmt, obj, tmp_path, **kwargs):
    path = tmp_path / f"hostile_{fmt}.pt"
    WRITE[fmt](obj, path, **kwargs)
    return path


@pytest.mark.parametrize("fmt", FORMATS)
def test_stride0_view_larger_than_its_storage_is_refused_before_allocating(fmt, tmp_path):
    # 484 bytes that made the old reader allocate 6.4 GB (40000 x 40000 views of one float).
    path = hostile(fmt, {"w": Tensor(Storage(ONE_FLOAT), (40000, 40000), (0, 0))}, tmp_path)
    refused(path, r"size \(40000, 40000\) holds 1600000000 elements, more than its storage's 1")


def test_compressed_storage_is_refused_before_inflating(tmp_path):
    # 64 MiB of zeros deflate to 64 KiB; the old reader inflated it all.
    path = hostile("zip", {"w": np.zeros(16 * MiB, np.float32)}, tmp_path, compress=True)
    assert path.stat().st_size < MiB
    refused(path, r"entry archive/data/0 is compressed .*torch\.save stores every entry "
                  r"uncompressed")


ISSUE_CASES = {  # five files that used to raise raw exceptions: name -> (object, expected message)
    "calls a storage type": ({"w": Call(Global("torch", "FloatStorage"), (4,))},
                             r"its pickle calls torch\.FloatStorage"),
    "element count is a string": ({"w": Tensor(Storage(np.ones(3, np.float32), numel="3"),
                                               (3,), (1,))},
                                  r"element count '3': expected a string and an integer"),
    "OrderedDict of a non-iterable": ({"w": Call(Global("collections", "OrderedDict"), (5,))},
                                      r"builds an OrderedDict from 5, not from one sequence"),
    "byte size overflows": ({"w": Tensor(Storage(np.ones(4, np.float32)), (2**62, 2**62),
                                         (1, 1))},
                            r"holds 21267647932558653966460912964485513216 elements, more than"),
    "empty but too large": ({"w": Tensor(Storage(np.ones(4, np.float32)), (0, 2**62, 2**62),
                                         (1, 1, 1))},
                            r"size \(0, 4611686018427387904, 4611686018427387904\) is too large"),
}


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("case", sorted(ISSUE_CASES))
def test_issue_cases_give_one_named_error(case, fmt, tmp_path):
    obj, pattern = ISSUE_CASES[case]
    refused(hostile(fmt, obj, tmp_path), pattern)


@pytest.mark.parametrize("fmt", FORMATS)
def test_storage_bytes_that_do_not_fit_the_declaration_are_refused(fmt, tmp_path):
    # 7 bytes for two floats: a byte length not a multiple of the item size.
    storage = Storage(np.ones(2, np.float32), raw=b"\x00" * 7)
    path = hostile(fmt, {"w": Tensor(storage, (2,), (1,))}, tmp_path)
    refused(path, {"zip": r"entry archive/data/0 holds 7 bytes, its declaration needs 8",
                   "legacy": r"truncated: storage 0 needs 16 bytes at byte \d+, 15 remain"}[fmt])


def test_legacy_count_that_contradicts_the_declaration_is_refused(tmp_path):
    storage = Storage(np.ones(2, np.float32))
    storage.count = 2**40
    path = hostile("legacy", {"w": Tensor(storage, (2,), (1,))}, tmp_path)
    refused(path, r"storage 0 holds 1099511627776 elements, its declaration says 2")


def test_legacy_storage_declared_larger_than_the_file_is_refused(tmp_path):
    storage = Storage(ONE_FLOAT, numel=2**40)
    storage.count = 2**40
    path = hostile("legacy", {"w": Tensor(storage, (1,), (1,))}, tmp_path)
    refused(path, r"truncated: storage 0 needs 4398046511112 bytes")


def forge_directory(path, name, **sizes):
    """Rewrite entry `name`'s sizes ("compressed", "uncompressed") in the zip's central directory."""
    data = bytearray(path.read_bytes())
    at = data.index(b"PK\x01\x02")
    while data[at + 46:at + 46 + len(name)] != name.encode():
        at = data.index(b"PK\x01\x02", at + 4)
    for field, offset in (("compressed", 20), ("uncompressed", 24)):
        if field in sizes:
            data[at + offset:at + offset + 4] = sizes[field].to_bytes(4, "little")
    path.write_bytes(bytes(data))


def test_zip_entries_larger_than_the_file_are_refused_before_reading(tmp_path):
    # A central directory that claims 1 GiB for a storage declared as 2**28 floats.
    path = hostile("zip", {"w": Tensor(Storage(ONE_FLOAT, numel=2**28), (1,), (1,))}, tmp_path)
    forge_directory(path, "archive/data/0", compressed=2**30, uncompressed=2**30)
    refused(path, r"entries declare \d+ bytes or more, beyond the file's \d+ \(at entry "
                  r"archive/data/0\)")


def test_zip_storage_shorter_than_its_directory_says_is_refused(tmp_path):
    # Found here: of a stored entry, zipfile returns the compressed size's bytes, even when
    # the uncompressed size says more (their CRC matches): a tensor would read past them.
    path = hostile("zip", {"w": Tensor(Storage(np.ones(2, np.float32), numel=4), (4,), (1,))},
                   tmp_path)
    forge_directory(path, "archive/data/0", uncompressed=16)
    refused(path, r"entry archive/data/0 holds 8 bytes, its directory says 16")


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("case", ["memo index", "declared length"])
def test_pickles_that_declare_gigabytes_are_refused_before_unpickling(case, fmt, tmp_path):
    # Found here: CPython's unpickler makes its memo as large as a PUT index says, zero-filled
    # (index 4e8: 6.4 GB resident from 12 bytes; 5e7 here), and allocates a BINBYTES8 first.
    pickled = {"memo index": b"\x80\x02K\x01r" + (50_000_000).to_bytes(4, "little") + b".",
               "declared length": b"\x80\x02\x8e" + (3 * 10**9).to_bytes(8, "little") + b"xx."}
    path = hostile(fmt, None, tmp_path, pickled=(pickled[case], {}))
    refused(path, {"memo index": r"stores memo entry 50000000 in 4 opcodes",
                   "declared length": r"truncated or corrupt \(expected 3000000000 bytes"}[case])


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_tensor_outside_its_storage_is_refused(fmt, tmp_path):
    path = hostile(fmt, {"w": Tensor(Storage(np.ones(4, np.float32)), (2, 2), (2, 1), 1)},
                   tmp_path)
    refused(path, r"size \(2, 2\), stride \(2, 1\) and offset 1 reaches element 4 of a storage "
                  r"of 4")


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("case", ["set", "function", "bare storage"])
def test_values_that_are_not_data_are_refused_by_name(case, fmt, tmp_path):
    objects = {"function": {"f": Global("collections", "OrderedDict")},
               "bare storage": {"s": Storage(np.ones(2, np.float32))}}
    # {"s": set()}: EMPTY_SET needs no global
    pickled = (b"\x80\x02}q\x00X\x01\x00\x00\x00s\x8fs.", {}) if case == "set" else None
    path = hostile(fmt, objects.get(case), tmp_path, pickled=pickled)
    refused(path, {"set": r"refused: its object holds a set, not a tensor",
                   "function": r"refused: its object holds a function",
                   "bare storage": r"refused: its object holds a storage outside any tensor"}[case])


def test_not_a_checkpoint_and_truncated_files_are_named(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    refused(tmp_path / "notes.txt", r"not a PyTorch checkpoint: neither a zip archive")
    (tmp_path / "empty.pt").write_bytes(b"")
    refused(tmp_path / "empty.pt", r"empty\.pt: empty")
    legacy = (FIXTURES / "torch_tensors_legacy.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(legacy[: len(legacy) - 10])
    refused(tmp_path / "cut.pt", r"truncated: storage \d+ needs \d+ bytes")


# --- fuzzing ----------------------------------------------------------------------------------

FUZZED = ("torch_tensors.pt", "torch_tensors_legacy.pt", "torch_wrapper.pth.tar",
          "torch_wrapper_legacy.pth.tar", "torch_runs_code.pt", "torch_runs_code_legacy.pt")
FUZZ_MEMORY = 4 * MiB  # the fixtures are 3-12 KB; the blow-ups fixed here were gigabytes
INTEGERS = st.one_of(st.integers(-3, 70), st.integers(-2**70, 2**70), st.sampled_from(
    [255, 256, 65535, 65536, 2**31 - 1, 2**31, 2**32, 40000, 2**60, 2**62, 2**63 - 1, 2**63,
     2**64, -2**63]))
INDEX = st.integers(0, 10**6)  # taken modulo the number of candidates
MUTATION = st.one_of(
    st.tuples(st.just("integer"), INDEX, INTEGERS),  # sizes, strides, offsets, memo indices
    st.tuples(st.just("opcode"), INDEX, st.integers(0, 255)),
    st.tuples(st.just("drop opcode"), INDEX),
    st.tuples(st.just("repeat opcode"), INDEX),
    st.tuples(st.just("part"), INDEX, st.sampled_from(["drop", "repeat", "grow", "shrink",
                                                       "deflate", "rename", "corrupt"])),
    st.tuples(st.just("storage count"), INDEX, INTEGERS),  # the legacy format's counts
    st.tuples(st.just("byte"), INDEX, st.integers(0, 255)),
    st.tuples(st.just("truncate"), INDEX),
)


@functools.lru_cache(maxsize=None)
def fixture_parts(name):
    """(format, [(entry name or part, bytes)], index of the object's pickle) of a fixture."""
    data = (FIXTURES / name).read_bytes()
    if data.startswith(b"PK"):
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            parts = [(n, z.read(n)) for n in z.namelist()]
        return "zip", parts, next(i for i, (n, _) in enumerate(parts) if n.endswith("data.pkl"))
    return "legacy", legacy_parts(data), 3


INTEGER_OPS = ("BININT", "BININT1", "BININT2", "LONG1")
MEMO_OPS = {"BINPUT": pickle.LONG_BINPUT, "LONG_BINPUT": pickle.LONG_BINPUT,
            "BINGET": pickle.LONG_BINGET, "LONG_BINGET": pickle.LONG_BINGET}


def encode_int(value):
    if 0 <= value < 256:
        return pickle.BININT1 + bytes([value])
    if 0 <= value < 65536:
        return pickle.BININT2 + value.to_bytes(2, "little")
    if -2**31 <= value < 2**31:
        return pickle.BININT + value.to_bytes(4, "little", signed=True)
    encoded = pickle.encode_long(value)
    return pickle.LONG1 + bytes([len(encoded)]) + encoded


def mutate_pickle(data, mutation):
    ops = []
    try:  # up to where an earlier mutation broke it
        ops.extend((op, pos) for op, _, pos in pickletools.genops(data))
    except ValueError:
        pass
    ends = [pos for _, pos in ops[1:]] + [len(data)]
    spans = [(op, start, end) for (op, start), end in zip(ops, ends)]
    kind, index, *value = mutation
    if kind == "integer":  # a number, or a memo index
        spans = [s for s in spans if s[0].name in INTEGER_OPS or s[0].name in MEMO_OPS]
    if not spans:
        return data
    op, start, end = spans[index % len(spans)]
    replacement = {"integer": lambda: encode_int(value[0]) if op.name in INTEGER_OPS else
                   MEMO_OPS[op.name] + (value[0] % 2**32).to_bytes(4, "little"),
                   "opcode": lambda: bytes(value) + data[start + 1:end],
                   "drop opcode": lambda: b"",
                   "repeat opcode": lambda: data[start:end] * 2}[kind]()
    return data[:start] + replacement + data[end:]


def mutate_part(content, change):
    return {"drop": None, "repeat": content, "grow": content + b"\x00\x01\x02\x03",
            "shrink": content[:-3], "deflate": zlib.compress(content), "rename": content,
            "corrupt": content[:1] + bytes([content[1] ^ 0x40]) + content[2:]
            if len(content) > 1 else content}[change]


def mutated_file(name, mutations):
    fmt, parts, obj = fixture_parts(name)
    parts, compressed = list(parts), set()
    for mutation in [m for m in mutations if m[0] in ("integer", "opcode", "drop opcode",
                                                      "repeat opcode")]:
        parts[obj] = (parts[obj][0], mutate_pickle(parts[obj][1], mutation))
    for kind, index, *value in mutations:
        if kind == "part":
            at = index % len(parts)
            part_name, content = parts[at]
            changed = mutate_part(content, value[0])
            if value[0] == "drop":
                del parts[at]
            elif value[0] == "repeat":  # in a zip: two entries of one name
                parts.insert(at, (part_name, content))
            elif value[0] == "deflate" and fmt == "zip":
                compressed.add(part_name)
            elif value[0] == "rename":
                parts[at] = (part_name + "x" if fmt == "zip" else part_name, changed)
            else:
                parts[at] = (part_name, changed)
        elif kind == "storage count" and fmt == "legacy":
            counts = [i for i, (n, _) in enumerate(parts) if n.startswith("storage")]
            if counts:
                at = counts[index % len(counts)]
                data = (value[0] % 2**64).to_bytes(8, "little") + parts[at][1][8:]
                parts[at] = (parts[at][0], data)
    if fmt == "zip":
        out = io.BytesIO()
        with warnings.catch_warnings(), zipfile.ZipFile(out, "w") as z:
            warnings.simplefilter("ignore")  # "Duplicate name"
            for part_name, content in parts:
                z.writestr(part_name, content, zipfile.ZIP_DEFLATED
                           if part_name in compressed else zipfile.ZIP_STORED)
        data = out.getvalue()
    else:
        data = b"".join(content for _, content in parts)
    for kind, index, *value in mutations:
        if kind == "byte" and data:
            at = index % len(data)
            data = data[:at] + bytes(value) + data[at + 1:]
        elif kind == "truncate":
            data = data[: index % (len(data) + 1)]
    return data


ALLOWED = (np.ndarray, dict, list, tuple, str, bytes, int, float, bool, type(None))


def only_data(value):
    todo, seen = [value], set()
    while todo:
        value = todo.pop()
        if not isinstance(value, ALLOWED):
            return False
        if isinstance(value, (dict, list, tuple)) and id(value) not in seen:
            seen.add(id(value))
            todo.extend(list(value.keys()) + list(value.values()) if isinstance(value, dict)
                        else value)
    return True


def fuzz(directory, examples):
    """Read `examples` mutated fixtures; every outcome data or one named CheckpointError."""
    outcomes, peaks = collections.Counter(), []
    path = directory / "mutated.pt"

    @settings(max_examples=examples, derandomize=True, database=None, deadline=2000,
              suppress_health_check=list(HealthCheck))
    @given(name=st.sampled_from(FUZZED), mutations=st.lists(MUTATION, min_size=1, max_size=3))
    def read_mutated(name, mutations):
        path.write_bytes(mutated_file(name, mutations))

        def read():
            try:
                return read_torch_checkpoint(path)
            except CheckpointError as e:
                return e

        result, peak = peak_memory(read)
        peaks.append(peak)
        assert peak < FUZZ_MEMORY, (name, mutations, peak)
        if isinstance(result, CheckpointError):
            text = str(result)  # (a MemoryError: an allocation beyond the cap was tried)
            assert "\n" not in text and str(path) in text and "MemoryError" not in text, text
            outcomes["error: " + re.sub(r"\d+", "N", str(result)[len(str(path)):][:40])] += 1
            return
        assert only_data(result), (name, mutations)
        outcomes["read"] += 1
        if isinstance(result, dict):  # and the mapping's entry: a state dict or its error
            try:
                load_checkpoint(result)
            except CheckpointError:
                pass

    read_mutated()
    assert not Path(MARKER).exists()
    return outcomes, peaks


def fuzz_report(outcomes, peaks, capsys):
    with capsys.disabled():
        print(f"\n[fuzz] {sum(outcomes.values())} mutated checkpoints: {outcomes['read']} read, "
              f"{sum(outcomes.values()) - outcomes['read']} refused; peak memory median "
              f"{np.median(peaks) / 1024:.0f} KiB, max {max(peaks) / 1024:.0f} KiB; "
              f"{len(outcomes) - 1} kinds of error, most common: {outcomes.most_common(4)}")


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


def test_fuzzed_checkpoints_load_or_fail_cleanly_within_memory(fuzz_dir, capsys):
    outcomes, peaks = fuzz(fuzz_dir, examples=300)
    fuzz_report(outcomes, peaks, capsys)
    assert sum(outcomes.values()) >= 250 and outcomes["read"] > 0 and len(outcomes) > 5


@pytest.mark.slow
def test_fuzzed_checkpoints_longer_run(fuzz_dir, capsys):
    outcomes, peaks = fuzz(fuzz_dir, examples=4000)
    fuzz_report(outcomes, peaks, capsys)
    assert sum(outcomes.values()) >= 3600 and outcomes["read"] > 0
