"""What every section shares: settings, round-robin timing, the machine, Markdown tables."""
import datetime
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

REPO = Path(__file__).resolve().parent.parent

# The instruction sets that decide which kernels TF/oneDNN and XNNPACK can use here.
CPU_FLAGS_OF_INTEREST = (
    "avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx_vnni",
    "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8",
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
    # training
    train_batch: int
    train_sizes: Tuple[int, ...]
    lever_size: int  # steps_per_execution is measured at this size only
    repeat_seconds: float  # a timed repeat runs about this long (whole steps)
    steps_per_execution: int
    num_classes: int
    # pipeline
    jpeg_count: int
    jpeg_shape: Tuple[int, int]  # (height, width) of the written JPEGs
    pipeline_size: int
    pipeline_batch: int
    pipeline_batches: int  # batches per timed repeat
    feed_steps: int  # training steps per repeat when the pipeline feeds the model
    # export
    export_depths: Tuple[int, ...]
    export_size: int
    latency_repeats: int
    export_num_classes: int
    # memory: (depth, batch) per process
    memory_jobs: Tuple[Tuple[int, int], ...]
    memory_size: int
    memory_parallel: int  # processes at once (1 for figures that mean something)
    # epoch: time between steps through the training loop
    epoch_epochs: int
    epoch_limit_train: Optional[int]
    epoch_limit_eval: Optional[int]
    epoch_batch: int
    # distill: (size, batch, classes, teachers) per group; teachers of benchmarks.distill
    distill_groups: Tuple[Tuple[int, int, int, Tuple[str, ...]], ...]

    @classmethod
    def full(cls):
        return cls(
            name="full", repeats=5, warmup=1,
            train_batch=32, train_sizes=(128, 224), lever_size=128, repeat_seconds=1.5,
            steps_per_execution=4, num_classes=1000,
            jpeg_count=256, jpeg_shape=(375, 500), pipeline_size=224, pipeline_batch=32,
            pipeline_batches=8, feed_steps=2,
            export_depths=(18, 34, 50), export_size=224, latency_repeats=9,
            export_num_classes=1000,
            memory_jobs=((18, 32), (18, 128), (50, 32), (50, 128)), memory_size=224,
            memory_parallel=1,
            epoch_epochs=3, epoch_limit_train=None, epoch_limit_eval=None, epoch_batch=64,
            distill_groups=((32, 128, 10, ("twin",)), (224, 32, 1000, ("twin", "resnet50"))),
        )

    @classmethod
    def tiny(cls):
        return cls(
            name="tiny", repeats=2, warmup=1,
            train_batch=4, train_sizes=(64,), lever_size=64, repeat_seconds=0.0,
            steps_per_execution=2, num_classes=10,
            jpeg_count=16, jpeg_shape=(96, 128), pipeline_size=64, pipeline_batch=4,
            pipeline_batches=2, feed_steps=1,
            export_depths=(18,), export_size=96, latency_repeats=2, export_num_classes=10,
            memory_jobs=((18, 4), (18, 8)), memory_size=64, memory_parallel=2,
            epoch_epochs=2, epoch_limit_train=128, epoch_limit_eval=64, epoch_batch=32,
            distill_groups=((32, 4, 10, ("twin", "resnet50")),),
        )


# --- timing ---------------------------------------------------------------------------------


def summarize(samples: Sequence[float]) -> dict:
    """Median, range and the samples themselves (rounded for the JSON)."""
    values = [float(v) for v in samples]
    return {"median": round(statistics.median(values), 4), "min": round(min(values), 4),
            "max": round(max(values), 4), "n": len(values), "samples": [round(v, 4) for v in values]}


def round_robin(cases: Dict[str, Callable[[], float]], repeats: int, warmup: int,
                log_each: bool = True) -> Dict[str, List[float]]:
    """Run the cases alternately: `warmup` untimed rounds, then `repeats` rounds A B C A B C ...

    Each callable runs one repeat and returns its figure. Alternating puts the drift of
    a shared machine on every side of a comparison alike. Returns the figures of the
    timed rounds per case, in run order.
    """
    out = {name: [] for name in cases}
    for r in range(warmup + repeats):
        for name, run in cases.items():
            value = run()
            if r >= warmup:
                out[name].append(value)
            if log_each:
                tag = "warm-up" if r < warmup else f"repeat {r - warmup + 1}/{repeats}"
                log(f"    {name:<24} {tag:<13} {value:10.2f}")
    return out


def latency_case(predict: Callable, x) -> Callable[[], float]:
    """A round_robin case: one call of `predict(x)`, in milliseconds."""
    def run() -> float:
        start = time.perf_counter()
        predict(x)
        return (time.perf_counter() - start) * 1000.0

    return run


def log(message: str):
    print(f"[{datetime.datetime.now():%H:%M:%S}] {message}", file=sys.stderr, flush=True)


def now_iso() -> str:
    return datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat()


def load_average():
    return [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None


# --- the machine ------------------------------------------------------------------------------


def _git_commit():
    """Short HEAD, marked when the code (not the run's own outputs) has uncommitted changes."""
    def git(*args):
        return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True,
                              timeout=10).stdout.strip()

    try:
        commit = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "--", ".", ":!BENCHMARKS.md", ":!benchmarks/results.json")
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{commit} (uncommitted changes)" if commit and dirty else commit or None


def machine_info(flags=None) -> dict:
    """This machine; `flags` (default: this CPU's) stand in for /proc/cpuinfo's flags."""
    from bireal_tf.utils import bf16_cpu_flags, cpu_flags, library_versions

    flags = cpu_flags() if flags is None else set(flags)
    return {
        "cpu": cpu_model(),
        "architecture": platform.machine(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "os": f"{platform.system()} {platform.release()}",
        "cpu_flags": [f for f in CPU_FLAGS_OF_INTEREST if f in flags],
        "bf16_cpu_flags": bf16_cpu_flags(flags),
        "tf_enable_onednn_opts": os.environ.get("TF_ENABLE_ONEDNN_OPTS"),
        "load_average_at_start": load_average(),
        "versions": library_versions(),
        "git_commit": _git_commit(),
    }


def cpu_model() -> str:
    """The CPU's model name as /proc/cpuinfo gives it ("" where there is none)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


class Timer:
    """Seconds since construction."""

    def __init__(self):
        self.start = time.perf_counter()

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.start


# --- Markdown -------------------------------------------------------------------------------


def table(header: List[str], rows: List[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join("" if v is None else str(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def f1(value, digits=1) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def times(value, digits=2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}x"


def spread(summary: dict) -> str:
    return f"{summary['min']:.1f}-{summary['max']:.1f}"
