"""What every section shares: settings, round-robin timing, machine facts, atomic writes."""
import datetime
import gc
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

REPO = Path(__file__).resolve().parent.parent

# Flags of /proc/cpuinfo that decide which kernels TF/oneDNN and XNNPACK can use.
CPU_FLAGS = (
    "avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx_vnni",
    "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8",
)
LIBRARIES = (
    "tensorflow", "tf-keras", "larq", "larq-zoo", "larq-compute-engine", "numpy", "keras",
)


def setup_environment():
    """Keras 2 for Larq and quiet TF logs; call before TensorFlow is imported."""
    os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


@dataclass(frozen=True)
class Settings:
    """How much each section measures. `full()` is `make bench`; `tiny()` is the CI smoke run."""

    name: str
    repeats: int
    warmup: int
    # 1. training
    train_batch: int
    train_sizes: Tuple[int, ...]
    lever_size: int  # the size the levers are measured at (bf16 is measured at every size)
    repeat_seconds: float  # a timed repeat runs about this long (whole steps)
    steps_per_execution: int
    num_classes: int
    # 2. input pipeline
    jpeg_count: int
    jpeg_shape: Tuple[int, int]  # (height, width) of the written JPEGs
    pipeline_size: int
    pipeline_batch: int
    pipeline_batches: int  # batches per timed repeat
    feed_steps: int  # training steps per repeat when the pipeline feeds the model
    # 3. export
    export_depths: Tuple[int, ...]
    export_size: int
    latency_repeats: Dict[int, int] = field(default_factory=dict)  # by depth
    export_num_classes: int = 1000
    # 4. memory
    memory_jobs: Tuple[Tuple[int, int], ...] = ((18, 32), (18, 128), (50, 32), (50, 128))
    memory_size: int = 224
    memory_steps: int = 2
    memory_parallel: int = 1
    memory_in_background: bool = False  # tiny: run the memory processes while the rest runs
    # Lever cases besides ours/zoo: at every size, and at `lever_size` only (training.LEVERS).
    every_size_cases: Tuple[str, ...] = ("ours_bf16", "zoo_bf16")
    lever_cases: Tuple[str, ...] = ("ours_wheregrad", "ours_spe", "ours_xla", "ours_nchw",
                                    "ours_where")
    lce_check: bool = True  # convert R18 with the tf.where quantizer forward (about 40 s)
    memory_budget_seconds: float = 5 * 60  # the memory section skips jobs that would end later

    @classmethod
    def full(cls):
        return cls(
            name="full", repeats=5, warmup=1,
            train_batch=32, train_sizes=(128, 224), lever_size=128, repeat_seconds=1.5,
            steps_per_execution=4, num_classes=1000,
            jpeg_count=256, jpeg_shape=(375, 500), pipeline_size=224, pipeline_batch=32,
            pipeline_batches=8, feed_steps=2,
            export_depths=(18, 34, 50), export_size=224, latency_repeats={18: 9, 34: 5, 50: 5},
            memory_jobs=((18, 32), (18, 128), (50, 32), (50, 128)), memory_size=224,
            memory_steps=1,
        )

    @classmethod
    def tiny(cls):
        return cls(
            name="tiny", repeats=2, warmup=1,
            train_batch=4, train_sizes=(64,), lever_size=64, repeat_seconds=0.0,
            steps_per_execution=2, num_classes=10,
            jpeg_count=16, jpeg_shape=(96, 128), pipeline_size=64, pipeline_batch=4,
            pipeline_batches=2, feed_steps=1,
            export_depths=(18,), export_size=96, latency_repeats={18: 2}, export_num_classes=10,
            memory_jobs=((18, 4), (18, 8)), memory_size=64, memory_steps=2,
            memory_parallel=2, memory_in_background=True,
            every_size_cases=("ours_bf16",), lever_cases=(), lce_check=False,
        )


# --- statistics and timing ---------------------------------------------------------------


def summarize(samples: Sequence[float]) -> dict:
    """Median, spread and the samples themselves (rounded for the JSON)."""
    values = [float(v) for v in samples]
    return {
        "median": round(statistics.median(values), 4),
        "min": round(min(values), 4),
        "max": round(max(values), 4),
        "n": len(values),
        "samples": [round(v, 4) for v in values],
    }


def ratio(a: dict, b: dict) -> float:
    """Ratio of two summaries' medians."""
    return round(a["median"] / b["median"], 4) if b["median"] else float("nan")


def round_robin(cases: Dict[str, Callable[[], float]], repeats: int, warmup: int,
                settle: Optional[Callable[[], None]] = None, log=None) -> Dict[str, List[float]]:
    """Run the cases alternately: warm-up round(s), then `repeats` timed rounds A B C A B C ...

    Each callable runs one repeat and returns its figure (e.g. images/s). `settle`
    runs before every repeat, untimed (e.g. let a prefetch buffer refill). Returns
    the timed figures per case, in run order.
    """
    out = {name: [] for name in cases}
    for r in range(warmup + repeats):
        for name, run in cases.items():
            if settle is not None:
                settle()
            value = run()
            if r >= warmup:
                out[name].append(value)
            if log:
                tag = "warm-up" if r < warmup else f"repeat {r - warmup + 1}/{repeats}"
                log(f"    {name:<28} {tag:<13} {value:10.2f}")
    return out


class Stopwatch:
    def __init__(self):
        self.start = time.perf_counter()

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.start


def log(message: str):
    stamp = datetime.datetime.now().strftime("%H:%M:%S")
    print(f"[{stamp}] {message}", file=sys.stderr, flush=True)


def collect():
    gc.collect()


# --- the machine and the software --------------------------------------------------------


def _cpuinfo() -> Tuple[str, set]:
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name":
                    model = value.strip()
                elif key == "flags" and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    return model, flags


def _meminfo_gib() -> Optional[float]:
    try:
        with open("/proc/meminfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def _versions() -> dict:
    from importlib import metadata

    out = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def _git_commit() -> Optional[str]:
    try:
        result = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                                capture_output=True, text=True, timeout=10)
        commit = result.stdout.strip() or None
        # The run's own outputs (BENCHMARKS.md, results.json) do not make the code dirty.
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--", ".",
                                ":!BENCHMARKS.md", ":!benchmarks/results.json"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return f"{commit}{' (uncommitted changes)' if dirty else ''}" if commit else None
    except (OSError, subprocess.SubprocessError):
        return None


def load_average() -> Optional[List[float]]:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def machine_info() -> dict:
    model, flags = _cpuinfo()
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    onednn = None
    try:
        from tensorflow.python.util import _pywrap_util_port

        onednn = bool(_pywrap_util_port.IsMklEnabled())
    except Exception:  # pragma: no cover - private TF API
        pass
    return {
        "cpu_model": model,
        "architecture": platform.machine(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": usable,
        "cpu_flags": {flag: flag in flags for flag in CPU_FLAGS},
        "memory_gib": _meminfo_gib(),
        "os": f"{platform.system()} {platform.release()}",
        "onednn_enabled": onednn,
        "tf_enable_onednn_opts": os.environ.get("TF_ENABLE_ONEDNN_OPTS"),
        "load_average_at_start": load_average(),
        "versions": _versions(),
        "git_commit": _git_commit(),
    }


def now_iso() -> str:
    return datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat()


# --- files --------------------------------------------------------------------------------


def atomic_write_text(path, text: str) -> Path:
    """bireal_tf's atomic write (temp file, then os.replace), creating the directory first."""
    from bireal_tf.export.files import atomic_write_text as write

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write(path, text)


def as_dict(obj):
    return asdict(obj)
