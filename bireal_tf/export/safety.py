"""Open an untrusted .tflite in a child process first, so a corrupt file cannot kill this one.

TFLite's C++ interpreter (and LCE's, built on it) trusts the flatbuffer it is
given: an offset or a shape changed by one byte can make it read out of bounds
and die of SIGSEGV, or allocate gigabytes. Neither TF 2.16, LCE 0.16 nor the
`flatbuffers` package offers the schema's verifier to Python, and a verifier
would not catch a valid-looking shape that no kernel checks. So
`probe_interpreter` runs the real thing where a crash costs nothing: a child
Python that loads only LCE's interpreter extension and numpy (no TensorFlow),
under an address-space limit, and that

1. builds the interpreter from the bytes (parse, resolve ops, allocate tensors),
2. runs it once on zeros,

reporting each stage on stdout. A signal, an error or a timeout in the child
comes back as a `ProbeResult`; `bireal_tf.export.files.check_tflite` turns it
into a `ModelFileError`. Limits: one run on zeros cannot prove that every input
is safe (a gather whose indices come from the input), and RLIMIT_AS is not
enforced on macOS (crashes are still caught there).

This module imports nothing of bireal_tf: `python -P safety.py` is the child.
"""

import importlib.machinery
import importlib.util
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

__all__ = ["ProbeResult", "memory_limit_bytes", "probe_interpreter", "timeout_seconds"]

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
