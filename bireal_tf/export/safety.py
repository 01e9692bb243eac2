"""The checks an untrusted .tflite passes before TFLite's interpreter opens it in this process.

TFLite's C++ interpreter (and LCE's, built on it) trusts the flatbuffer it is
given: an offset or a shape changed by one byte can make it read out of bounds
and die of SIGSEGV, or allocate gigabytes. An out-of-bounds read is undefined
behaviour: it may pass in one process and crash another (the fuzz test found a
vtable offset that a child process survived and the evaluating process did not).
So, in order:

1. `verify_flatbuffer`: the file's structure, refused deterministically.
   - LiteRT's own flatbuffer verifier (the schema's C++ `Verifier`: every offset of
     every table, vector, string and union inside the file, at most 1,000,000 tables,
     64 levels deep). Python cannot call it alone: it runs when
     `ai_edge_litert.interpreter.Interpreter` loads a model, which goes on to build
     the interpreter, so it runs in a child process (`_litert_verifies`).
   - The flexbuffer options of LCE's ops (`LceBconv2d`, ...), which LCE's C++ code
     reads unchecked and which LiteRT's verifier sees as plain bytes
     (`_verify_custom_options`).
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

Measured on the fuzz corpus of tests/test_hostile_files.py (213 files: its three
crashers, its mutants of seeds 20 and 2020, its two hand-made bad offsets): LiteRT's
verifier refuses 143; a hand-written walker of the schema's tables, which this module
held before, refused 139 of those and nothing else. The LCE options check refuses 2
that LiteRT's verifier passes (one crashes LCE's interpreter with SIGSEGV). 68 pass
both and meet the interpreter probe. LiteRT's schema is newer than LCE's: one mutant
it refuses runs in LCE's interpreter. Constant data kept after the flatbuffer (a
buffer's `offset` and `size`) is outside the verifier's view, but both interpreters
refuse an offset past the file when they build (tried: offset 10^9 in a 12 KB file,
an error, no crash).

The child processes import nothing of bireal_tf: `python -P safety.py` is the child.
"""

import bisect
import importlib.machinery
import importlib.util
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

__all__ = ["MAX_VALUES", "ProbeResult", "UnsafeFlatbuffer", "memory_limit_bytes",
           "probe_interpreter", "timeout_seconds", "verify_flatbuffer"]

# --- 1. the structure ---------------------------------------------------------------------

class UnsafeFlatbuffer(ValueError):
    """An offset of the flatbuffer leads outside it, or it holds too many values."""


MAX_VALUES = 1_000_000  # values of a flexbuffer, as the C++ Verifier's limit on tables
_NOT_VALID = "not a valid Flatbuffer"  # how LiteRT says its verifier refused the model


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
        if depth > 64 or self.values > MAX_VALUES:
            raise UnsafeFlatbuffer(f"{self.what}: nested more than 64 deep or more than "
                                   f"{MAX_VALUES:,} values")
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
    """The flexbuffer options of LCE's ops (LceBconv2d, ...), whose C++ code reads them.
    The file's own structure must be verified first."""
    from bireal_tf.export.schema import read_model, text

    try:
        model = read_model(data)
    except Exception as err:  # the reader raises assorted errors on garbage
        raise UnsafeFlatbuffer(f"the schema's reader cannot read it ({type(err).__name__})") from err
    lce = {i for i, code in enumerate(model.operatorCodes or []) if text(code.customCode).startswith("Lce")}
    for g, graph in enumerate(model.subgraphs or []):
        for o, op in enumerate(graph.operators or []):
            if op.opcodeIndex in lce and op.customOptions is not None and len(op.customOptions):
                options = bytes(bytearray(op.customOptions))
                _Flexbuffer(options, f"the options of operator {o} (subgraph {g})").root()


def _litert_verifies(data: bytes) -> None:
    """UnsafeFlatbuffer when LiteRT's flatbuffer verifier refuses `data`.

    A child process loads the model with LiteRT (memory and time capped as for the
    probe); only the verifier's own refusal counts here: whatever building the
    interpreter does afterwards (an unresolved custom op, an error, a crash) is the
    interpreter probe's to judge.
    """
    address_space = memory_limit_bytes() + _CHILD_OVERHEAD + 3 * len(data)
    command = [sys.executable, *_ISOLATE, __file__, "litert-verify", str(address_space)]
    try:
        done = subprocess.run(command, input=data, capture_output=True, timeout=timeout_seconds(),
                              check=False)
    except subprocess.TimeoutExpired:
        return  # not a refusal; the probe meets the same file with the same limit
    if done.returncode == _REFUSED:
        raise UnsafeFlatbuffer("LiteRT's flatbuffer verifier refuses it: an offset leads outside "
                               "the file, or a table or vector is malformed")


def verify_flatbuffer(flatbuffer: bytes) -> None:
    """UnsafeFlatbuffer unless the file has TFLite's identifier, LiteRT's verifier accepts its
    structure, and the options of its LCE ops stay inside them."""
    from bireal_tf.export.schema import has_tflite_identifier

    data = bytes(flatbuffer)
    if not has_tflite_identifier(data):
        raise UnsafeFlatbuffer("not a TFLite flatbuffer (no 'TFL3' at bytes 4-8)")
    _litert_verifies(data)
    _verify_custom_options(data)


# --- 2. the interpreter, in a child process ------------------------------------------------

MEMORY_ENV = "BIREAL_TF_TFLITE_MEMORY_MB"
TIMEOUT_ENV = "BIREAL_TF_TFLITE_TIMEOUT_S"
DEFAULT_MEMORY_MB = 2048
DEFAULT_TIMEOUT_S = 300.0
# The child's own Python, numpy and LCE extension take ~135 MB of address space
# (VmPeak, measured here); the interpreter keeps two copies of the file.
_CHILD_OVERHEAD = 512 << 20
# -P: the child's sys.path gets neither this directory nor the working directory.
_ISOLATE = ["-P"] if sys.version_info >= (3, 11) else []
_REFUSED = 4  # the exit status of a child whose LiteRT verifier refused the model
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
    command = [sys.executable, *_ISOLATE, __file__, _interpreter_extension(), str(address_space),
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


def _limit_address_space(address_space):
    try:
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (address_space, address_space))
    except (ImportError, ValueError, OSError):
        pass  # no address-space limit on this OS; crashes are still contained


def _litert_verify_child(address_space):
    """The verifier's child side: stdin holds the flatbuffer; exit _REFUSED if LiteRT's
    verifier refuses it, 0 otherwise (building the interpreter may fail: not our concern)."""
    _limit_address_space(address_space)
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    try:
        Interpreter(model_content=sys.stdin.buffer.read(),
                    experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
    except ValueError as error:
        if _NOT_VALID in str(error):
            sys.exit(_REFUSED)
    except Exception:  # e.g. an unresolved custom op (LCE's): verified, then not built
        pass


def _child(extension, address_space, num_threads, use_reference_bconv):
    """The probe's child side: stdin holds the flatbuffer; exit 0 after one run on zeros."""
    _limit_address_space(address_space)
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


if __name__ == "__main__" and sys.argv[1] == "litert-verify":
    _litert_verify_child(int(sys.argv[2]))
elif __name__ == "__main__":
    try:
        _child(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1")
    except BaseException as error:  # one line for the parent; the exit code says "error"
        message = (str(error).strip().splitlines() or [""])[0][:300]
        print(f"error: {type(error).__name__}: {message}", file=sys.stderr, flush=True)
        sys.exit(3)
