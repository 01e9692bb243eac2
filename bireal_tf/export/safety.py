"""The checks an untrusted .tflite passes before TFLite's interpreter opens it in this process.

TFLite's C++ interpreter (and LCE's, built on it) trusts the flatbuffer it is
given: an offset or a shape changed by one byte can make it read out of bounds
and die of SIGSEGV, or allocate gigabytes. Neither TF 2.16, LCE 0.16 nor the
`flatbuffers` package offers the schema's verifier to Python. So, in order:

1. `verify_flatbuffer`: every offset the interpreter follows (tables, vectors,
   strings, unions of the TFLite schema) must land inside the file; what the C++
   `Verifier` checks, in pure Python, with its limit of 1,000,000 tables; and the
   same for the flexbuffer options of LCE's ops, which their C++ code reads. An
   out-of-bounds read is undefined behaviour: it may pass in one process and
   crash another (found by the fuzz test: a quantization table's vtable offset
   that a child process survived and the evaluating process did not), so it is
   refused here, deterministically.
2. `probe_interpreter`: the real interpreter where a crash costs nothing, a
   child Python that loads only LCE's interpreter extension and numpy (no
   TensorFlow), under an address-space limit. It builds the interpreter from
   the bytes (parse, resolve ops, allocate tensors) and runs it once on zeros,
   reporting each stage on stdout. This catches what a structure check cannot:
   a kernel that fails on shapes or options that are well-formed but wrong.

`bireal_tf.export.files.check_tflite` runs both and turns what they find into
a `ModelFileError`. Limits: one run on zeros cannot prove every input safe (a
gather whose indices come from the input), and RLIMIT_AS is not enforced on
macOS (crashes are still contained there).

This module imports nothing of bireal_tf: `python -P safety.py` is the child.
"""

import bisect
import importlib.machinery
import importlib.util
import os
import signal
import struct
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

__all__ = ["ProbeResult", "UnsafeFlatbuffer", "memory_limit_bytes", "probe_interpreter",
           "timeout_seconds", "verify_flatbuffer"]

# --- 1. the structure ---------------------------------------------------------------------

class UnsafeFlatbuffer(ValueError):
    """An offset of the flatbuffer leads outside it, or it holds too many tables."""


# The TFLite schema (tensorflow/lite/schema/schema.fbs, as TF 2.16 and LCE 0.16 ship it),
# field index -> what it holds: a scalar's size in bytes, "string", ("vector", element
# size), ("table", type), ("tables", type: a vector of tables), or ("union", index of the
# type field, {type code: table type}); a union named by a string is checked by the
# generated Python reader of that name (the builtin options: leaf tables of numbers).
_SCHEMA = {
    "Model": {0: 4, 1: ("tables", "OperatorCode"), 2: ("tables", "SubGraph"), 3: "string",
              4: ("tables", "Buffer"), 5: ("vector", 4), 6: ("tables", "Metadata"),
              7: ("tables", "SignatureDef")},
    "OperatorCode": {0: 1, 1: "string", 2: 4, 3: 4},
    "SubGraph": {0: ("tables", "Tensor"), 1: ("vector", 4), 2: ("vector", 4),
                 3: ("tables", "Operator"), 4: "string"},
    "Tensor": {0: ("vector", 4), 1: 1, 2: 4, 3: "string", 4: ("table", "QuantizationParameters"),
               5: 1, 6: ("table", "SparsityParameters"), 7: ("vector", 4), 8: 1,
               9: ("tables", "VariantSubType")},
    "QuantizationParameters": {0: ("vector", 4), 1: ("vector", 4), 2: ("vector", 4),
                               3: ("vector", 8), 4: 1,
                               5: ("union", 4, {1: "CustomQuantization"}), 6: 4},
    "CustomQuantization": {0: ("vector", 1)},
    "SparsityParameters": {0: ("vector", 4), 1: ("vector", 4), 2: ("tables", "DimensionMetadata")},
    "DimensionMetadata": {0: 1, 1: 4, 2: 1, 4: 1,
                          3: ("union", 2, {1: "Int32Vector", 2: "Uint16Vector", 3: "Uint8Vector"}),
                          5: ("union", 4, {1: "Int32Vector", 2: "Uint16Vector", 3: "Uint8Vector"})},
    "Int32Vector": {0: ("vector", 4)},
    "Uint16Vector": {0: ("vector", 2)},
    "Uint8Vector": {0: ("vector", 1)},
    "VariantSubType": {0: ("vector", 4), 1: 1, 2: 1},
    "Operator": {0: 4, 1: ("vector", 4), 2: ("vector", 4), 3: 1, 4: ("union", 3, "BuiltinOptions"),
                 5: ("vector", 1), 6: 1, 7: ("vector", 1), 8: ("vector", 4), 9: 8, 10: 8, 11: 1,
                 12: ("union", 11, "BuiltinOptions2")},
    "Buffer": {0: ("vector", 1), 1: 8, 2: 8},
    "Metadata": {0: "string", 1: 4},
    "SignatureDef": {0: ("tables", "TensorMap"), 1: ("tables", "TensorMap"), 2: "string", 4: 4},
    "TensorMap": {0: "string", 1: 4},
    # The two options tables with strings, which the generated reader slices unchecked.
    "VarHandleOptions": {0: "string", 1: "string"},
    "StablehloCustomCallOptions": {0: "string", 2: "string"},
}
MAX_TABLES = 1_000_000  # the C++ Verifier's default


class _Verifier:
    """Walks a TFLite flatbuffer from its root and checks every offset against its size."""

    def __init__(self, data: bytes):
        self.data, self.size, self.tables = data, len(data), 0

    def _need(self, pos, length, what):
        if pos < 0 or length < 0 or pos + length > self.size:
            raise UnsafeFlatbuffer(f"{what} at byte {pos} (+{length}) lies outside the "
                                   f"{self.size}-byte file")

    def _int(self, fmt, pos, what):
        self._need(pos, struct.calcsize(fmt), what)
        return struct.unpack_from(fmt, self.data, pos)[0]

    def _target(self, pos, what):
        """Where the unsigned offset stored at `pos` leads."""
        return pos + self._int("<I", pos, what)

    def _fields(self, pos, name):
        """{field index: its position} of the table at `pos`, its vtable checked."""
        self.tables += 1
        if self.tables > MAX_TABLES:
            raise UnsafeFlatbuffer(f"more than {MAX_TABLES:,} tables")
        vtable = pos - self._int("<i", pos, f"{name} table")
        vtable_size = self._int("<H", vtable, f"{name} vtable")
        table_size = self._int("<H", vtable + 2, f"{name} vtable")
        if vtable_size < 4 or vtable_size % 2:
            raise UnsafeFlatbuffer(f"{name} vtable at byte {vtable} has the size {vtable_size}")
        self._need(vtable, vtable_size, f"{name} vtable")
        self._need(pos, max(table_size, 4), f"{name} table")
        slots = struct.unpack_from(f"<{vtable_size // 2 - 2}H", self.data, vtable + 4)
        return {i: pos + o for i, o in enumerate(slots) if o}

    def _vector(self, pos, element, what):
        """(start, length) of the vector at `pos`, all of it inside the file."""
        length = self._int("<I", pos, what)
        self._need(pos + 4, length * element, what)
        return pos + 4, length

    def table(self, pos, name):
        fields = self._fields(pos, name)
        for index, kind in _SCHEMA[name].items():
            at = fields.get(index)
            if at is None:
                continue
            what = f"{name} field {index}"
            if isinstance(kind, int):
                self._need(at, kind, what)
            elif kind == "string":
                start, length = self._vector(self._target(at, what), 1, what)
                self._need(start + length, 1, what + " (terminator)")
            elif kind[0] == "vector":
                self._vector(self._target(at, what), kind[1], what)
            elif kind[0] == "table":
                self.table(self._target(at, what), kind[1])
            elif kind[0] == "tables":
                start, length = self._vector(self._target(at, what), 4, what)
                for i in range(length):
                    self.table(self._target(start + 4 * i, what), kind[1])
            else:  # a union: its type code sits in another field
                code_at = fields.get(kind[1])
                code = self._int("<B", code_at, what) if code_at is not None else 0
                if code:
                    self._union(self._target(at, what), code, kind[2], what)

    def _union(self, pos, code, members, what):
        if isinstance(members, dict):
            if code in members:
                self.table(pos, members[code])
            return
        from flatbuffers.table import Table
        from larq_compute_engine.mlir.python import tflite_schema  # TFLite's generated reader

        self._fields(pos, what)  # its vtable, before the generated reader follows it
        try:  # the generated reader checks its reads (a negative offset is a TypeError)
            getattr(tflite_schema, members + "Creator")(code, Table(self.data, pos))
        except Exception as err:  # struct.error, TypeError, ValueError: out of bounds
            raise UnsafeFlatbuffer(f"{what} (options {code}) cannot be read: {err}") from err
        name = {v: k for k, v in vars(getattr(tflite_schema, members)).items()}.get(code)
        if name in _SCHEMA:  # but not the length of a string
            self.table(pos, name)

    def model(self):
        self.table(self._target(0, "root offset"), "Model")
        # Buffers may keep their data after the flatbuffer, at an offset into the file.
        model = self._fields(self._target(0, "root offset"), "Model")
        if 4 in model:
            start, length = self._vector(self._target(model[4], "buffers"), 4, "buffers")
            for i in range(length):
                fields = self._fields(self._target(start + 4 * i, "buffers"), "Buffer")
                offset = self._int("<Q", fields[1], "Buffer offset") if 1 in fields else 0
                size = self._int("<Q", fields[2], "Buffer size") if 2 in fields else 0
                if offset > 1:
                    self._need(offset, size, f"buffer {i}'s data")


class _Flexbuffer:
    """Walks a flexbuffer (LCE ops keep their options in one, read by the op's C++ code)
    from its root, and checks every offset against its size.

    A value is referred to by its position, the width of the slot holding it, and a
    packed type byte (type << 2 | log2 of its own width). Offsets point backwards.
    """

    FIXED_LENGTH = {16: 2, 17: 2, 18: 2, 19: 3, 20: 3, 21: 3, 22: 4, 23: 4, 24: 4}

    def __init__(self, buf: bytes, what: str):
        self.buf, self.what, self.values = buf, what, 0
        self.zeros = [i for i, byte in enumerate(buf) if byte == 0]  # where keys can end

    def _span(self, pos, length):
        if pos < 0 or length < 0 or pos + length > len(self.buf):
            raise UnsafeFlatbuffer(f"{self.what}: byte {pos} (+{length}) lies outside its "
                                   f"{len(self.buf)} bytes")

    def _uint(self, pos, width):
        self._span(pos, width)
        return int.from_bytes(self.buf[pos:pos + width], "little")

    def _key(self, pos):
        """A key is a C string: it must end inside the buffer."""
        self._span(pos, 1)
        if bisect.bisect_left(self.zeros, pos) == len(self.zeros):
            raise UnsafeFlatbuffer(f"{self.what}: the key at byte {pos} has no end")

    def root(self):
        if len(self.buf) < 3:
            raise UnsafeFlatbuffer(f"{self.what}: {len(self.buf)} bytes, too short")
        width = self.buf[-1]
        if width not in (1, 2, 4, 8):
            raise UnsafeFlatbuffer(f"{self.what}: root width {width}")
        self.value(len(self.buf) - 2 - width, width, self.buf[-2], 0)

    def value(self, pos, slot, packed, depth):
        self.values += 1
        if depth > 64 or self.values > MAX_TABLES:
            raise UnsafeFlatbuffer(f"{self.what}: nested more than 64 deep or more than "
                                   f"{MAX_TABLES:,} values")
        kind, width = packed >> 2, 1 << (packed & 3)
        offset = self._uint(pos, slot)
        if kind in (0, 1, 2, 3, 26):  # null, int, uint, float, bool: inline
            return
        target = pos - offset
        if kind == 4:  # key
            self._key(target)
        elif kind in (5, 25):  # string (with a terminator), blob
            self._span(target, self._uint(target - width, width) + (kind == 5))
        elif kind in (6, 7, 8):  # indirect int, uint, float
            self._span(target, width)
        elif kind in (9, 10):  # map, vector: the values, then one packed type byte each
            size = self._uint(target - width, width)
            self._span(target, size * (width + 1))
            for i in range(size):
                self.value(target + i * width, width, self.buf[target + size * width + i],
                           depth + 1)
            if kind == 9:  # a map's keys: a vector of keys, its offset and width before
                keys_width = self._uint(target - 2 * width, width)
                if keys_width not in (1, 2, 4, 8):
                    raise UnsafeFlatbuffer(f"{self.what}: key width {keys_width}")
                keys = target - 3 * width - self._uint(target - 3 * width, width)
                self._typed(keys, keys_width, 4, self._uint(keys - keys_width, keys_width))
        elif 11 <= kind <= 15 or kind == 36:  # typed vectors
            self._typed(target, width, kind, self._uint(target - width, width))
        elif kind in self.FIXED_LENGTH:
            self._span(target, self.FIXED_LENGTH[kind] * width)
        else:
            raise UnsafeFlatbuffer(f"{self.what}: unknown value type {kind}")

    def _typed(self, pos, width, kind, size):
        self._span(pos, size * width)
        for i in range(size if kind in (4, 14, 15) else 0):  # keys, strings: offsets
            at = pos + i * width
            target = at - self._uint(at, width)
            if kind == 15:
                self._span(target, self._uint(target - width, width) + 1)
            else:
                self._key(target)


def _verify_custom_options(data: bytes):
    """The flexbuffer options of LCE's ops (LceBconv2d, ...), whose C++ code reads them."""
    from larq_compute_engine.mlir.python import tflite_schema

    model = tflite_schema.Model.GetRootAsModel(data, 0)  # bounds checked by now
    lce = {i for i in range(model.OperatorCodesLength())
           if (model.OperatorCodes(i).CustomCode() or b"").startswith(b"Lce")}
    for g in range(model.SubgraphsLength()):
        graph = model.Subgraphs(g)
        for o in range(graph.OperatorsLength()):
            op = graph.Operators(o)
            if op.OpcodeIndex() in lce and op.CustomOptionsLength():
                options = bytes(op.CustomOptionsAsNumpy())
                _Flexbuffer(options, f"the options of operator {o} (subgraph {g})").root()


def verify_flatbuffer(flatbuffer: bytes) -> None:
    """UnsafeFlatbuffer unless every offset that TFLite's interpreter, or an LCE op reading
    its options, follows stays in the file."""
    data = bytes(flatbuffer)
    if len(data) < 8 or data[4:8] != b"TFL3":
        raise UnsafeFlatbuffer("not a TFLite flatbuffer (no 'TFL3' at bytes 4-8)")
    _Verifier(data).model()
    _verify_custom_options(data)


# --- 2. the interpreter, in a child process ------------------------------------------------

MEMORY_ENV = "BIREAL_TF_TFLITE_MEMORY_MB"
TIMEOUT_ENV = "BIREAL_TF_TFLITE_TIMEOUT_S"
DEFAULT_MEMORY_MB = 2048
DEFAULT_TIMEOUT_S = 300.0
# The child's own Python, numpy and LCE extension take ~135 MB of address space
# (VmPeak, measured here); the interpreter keeps two copies of the file.
_CHILD_OVERHEAD = 512 << 20
_STAGES = {"start": "starting", "load": "loading it (parse, ops, tensor allocation)",
           "invoke": "running it once on zeros", "done": "finishing"}


def memory_limit_bytes() -> int:
    """Bytes the model's tensors may take: $BIREAL_TF_TFLITE_MEMORY_MB, default 2048 MB."""
    return int(float(os.environ.get(MEMORY_ENV) or DEFAULT_MEMORY_MB) * (1 << 20))


def timeout_seconds() -> float:
    """Seconds the child may take: $BIREAL_TF_TFLITE_TIMEOUT_S, default 300."""
    return float(os.environ.get(TIMEOUT_ENV) or DEFAULT_TIMEOUT_S)


@dataclass(frozen=True)
class ProbeResult:
    """What LCE's interpreter did with a flatbuffer in a child process.

    `stage` is the last stage the child reached ("start", "load", "invoke",
    "done"); `errors` holds TFLite's `ERROR:` lines and the child's own error.
    """

    returncode: int | None  # None: killed after the timeout
    stage: str
    errors: tuple[str, ...]
    seconds: float

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and self.stage == "done"

    @property
    def signal(self) -> str | None:
        """The name of the signal that killed the child ("SIGSEGV"), or None."""
        if self.returncode is None or self.returncode >= 0:
            return None
        try:
            return signal.Signals(-self.returncode).name
        except ValueError:
            return f"signal {-self.returncode}"

    @property
    def doing(self) -> str:
        """What the child was doing when it stopped, in words."""
        return _STAGES.get(self.stage, self.stage)


def _interpreter_extension() -> str:
    """The path of LCE's interpreter extension, found without importing LCE (and TF)."""
    spec = importlib.util.find_spec("larq_compute_engine")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("larq_compute_engine is not installed; `pip install "
                          "larq-compute-engine==0.16.0` (x86-64 Linux, macOS).")
    for root in spec.submodule_search_locations:
        for suffix in importlib.machinery.EXTENSION_SUFFIXES:
            path = Path(root, "tflite", "python", "interpreter_wrapper_lite" + suffix)
            if path.is_file():
                return str(path)
    raise ImportError("LCE's interpreter extension (larq_compute_engine/tflite/python/"
                      "interpreter_wrapper_lite) is missing; reinstall larq-compute-engine.")


def probe_interpreter(flatbuffer: bytes, *, memory_limit: int | None = None,
                      timeout: float | None = None, num_threads: int = 1,
                      use_reference_bconv: bool = False) -> ProbeResult:
    """Load `flatbuffer` with LCE's interpreter and run it once on zeros, in a child process.

    The child's address space is capped at `memory_limit` (default
    `memory_limit_bytes()`) plus its own overhead and the file's copies; it is
    killed after `timeout` seconds (default `timeout_seconds()`).
    """
    memory_limit = memory_limit_bytes() if memory_limit is None else int(memory_limit)
    timeout = timeout_seconds() if timeout is None else float(timeout)
    address_space = memory_limit + _CHILD_OVERHEAD + 3 * len(flatbuffer)
    # -P: the child's sys.path gets neither this directory nor the working directory.
    isolate = ["-P"] if sys.version_info >= (3, 11) else []
    command = [sys.executable, *isolate, __file__, _interpreter_extension(), str(address_space),
               str(int(num_threads)), "1" if use_reference_bconv else "0"]
    start = time.perf_counter()
    try:
        done = subprocess.run(command, input=bytes(flatbuffer), capture_output=True,
                              timeout=timeout, check=False)
        returncode, out, err = done.returncode, done.stdout, done.stderr
    except subprocess.TimeoutExpired as expired:  # run() has killed the child
        returncode, out, err = None, expired.stdout or b"", expired.stderr or b""
    stages = [line[6:] for line in out.decode(errors="replace").splitlines()
              if line.startswith("stage ")]
    errors = tuple(line.strip() for line in err.decode(errors="replace").splitlines()
                   if line.startswith(("ERROR", "error:")))
    return ProbeResult(returncode, stages[-1] if stages else "start", errors,
                       time.perf_counter() - start)


def _stage(name):
    print("stage", name, flush=True)


def _child(extension, address_space, num_threads, use_reference_bconv):
    """The child side: stdin holds the flatbuffer; exit 0 after one run on zeros."""
    try:
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (address_space, address_space))
    except (ImportError, ValueError, OSError):
        pass  # no address-space limit on this OS; crashes are still contained
    import numpy as np

    spec = importlib.util.spec_from_file_location("interpreter_wrapper_lite", extension)
    lite = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(lite)  # LCE's extension alone: no TensorFlow in the child
    flatbuffer = sys.stdin.buffer.read()
    _stage("load")
    interpreter = lite.LiteInterpreter(flatbuffer, num_threads, use_reference_bconv, False, False)
    _stage("invoke")
    interpreter.predict([np.zeros(shape, dtype) for shape, dtype
                         in zip(interpreter.input_shapes, interpreter.input_types)])
    _stage("done")


if __name__ == "__main__":
    try:
        _child(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1")
    except BaseException as error:  # one line for the parent; the exit code says "error"
        message = (str(error).strip().splitlines() or [""])[0][:300]
        print(f"error: {type(error).__name__}: {message}", file=sys.stderr, flush=True)
        sys.exit(3)
