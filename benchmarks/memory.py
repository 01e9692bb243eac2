"""Peak memory of a training step, each configuration in its own process.

`tf.config.experimental.get_memory_info("CPU:0")` reports zeros on CPU with TF
2.16, so the measure is the process' resident set (Linux /proc/self/status):

    build = VmRSS once TensorFlow is imported, the model built and compiled and
            the batch made (before the optimizer's slots, the traced step and
            its activations);
    peak  = VmHWM, the resident high-water mark, after one training step, which
            traces the train function as the first step of a real run does.
            (Not ru_maxrss: Linux carries it across exec, so a worker started by
            a large parent would report the parent's size.)

peak - build is what training adds to the built model: Adam's two slots per
weight, the gradients, the activations kept for the backward pass, the traced
graph and allocator slack. A worker is killed when its RSS passes
`MEMORY_FRACTION` of the MemAvailable before it started, so the measurement
never runs the shared machine out of memory.

One worker by hand: python -m benchmarks.memory --depth 18 --batch 32 --size 224
"""
import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from benchmarks.common import REPO, Timer, f1, log, table

TITLE = "Training-step memory"
MEMORY_FRACTION = 0.9
METHOD = ("one subprocess per configuration; peak = VmHWM after one training step (which "
          "traces, as a run's first step does), build = VmRSS after the model is built and "
          "compiled; tf.config.experimental.get_memory_info reports zeros on CPU. A worker "
          f"is stopped when its RSS passes {MEMORY_FRACTION:.0%} of MemAvailable")


def _proc_mib(path: str, field: str) -> float:
    """A `field:  N kB` line of a /proc file (status, meminfo), in MiB; 0 when absent."""
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def worker(depth: int, batch: int, size: int, num_classes: int) -> dict:
    from benchmarks.common import setup_environment

    setup_environment()
    import bireal_tf  # noqa: F401  (binds tf.keras to Keras 2)
    from benchmarks.training import TrainConfig, build_model, compile_like_training, in_memory_dataset, prebuild

    timer = Timer()
    cfg = TrainConfig("memory", "ours", size, batch)
    model = build_model(cfg, num_classes, depth)
    compile_like_training(model, cfg, depth)
    iterator = iter(in_memory_dataset(cfg, num_classes))
    build = _proc_mib("/proc/self/status", "VmRSS")
    prebuild(model, size, num_classes)  # the optimizer's slots: after the build figure, so counted
    float(model.make_train_function()(iterator)["loss"].numpy())  # traces and runs one step
    peak = _proc_mib("/proc/self/status", "VmHWM")
    return {"depth": depth, "batch": batch, "size": size, "params": int(model.count_params()),
            "baseline_rss_mib": round(build, 1), "peak_rss_mib": round(peak, 1),
            "step_peak_mib": round(peak - build, 1), "seconds": round(timer.seconds, 1)}


def _spawn(depth: int, batch: int, settings) -> dict:
    """Run one worker process; stop it if its RSS passes the limit."""
    cmd = [sys.executable, "-m", "benchmarks.memory", "--depth", str(depth), "--batch", str(batch),
           "--size", str(settings.memory_size), "--num-classes", str(settings.num_classes)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p))
    limit = MEMORY_FRACTION * _proc_mib("/proc/meminfo", "MemAvailable")
    row = {"depth": depth, "batch": batch, "size": settings.memory_size}
    # The worker prints one JSON line at its end (stdout cannot fill its pipe meanwhile);
    # its stderr is this process', so a failure shows its traceback in the log.
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env, cwd=str(REPO))
    while proc.poll() is None:
        rss = _proc_mib(f"/proc/{proc.pid}/status", "VmRSS")
        if rss > limit:
            proc.kill()
            proc.wait()
            log(f"memory: R{depth} batch {batch} stopped at {rss:.0f} MiB (limit {limit:.0f} MiB)")
            return {**row, "skipped": f"stopped at {rss / 1024:.1f} GiB RSS, over {MEMORY_FRACTION:.0%} "
                                      f"of the {limit / MEMORY_FRACTION / 1024:.1f} GiB available"}
        time.sleep(0.2)
    lines = [line for line in proc.stdout.read().splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"memory worker R{depth} batch {batch} failed (exit {proc.returncode}, "
                           f"traceback above); by hand: python {' '.join(cmd[1:])}")
    row = json.loads(lines[-1])
    log(f"memory: R{depth} batch {batch}: build {row['baseline_rss_mib']:.0f} MiB, peak "
        f"{row['peak_rss_mib']:.0f} MiB, step +{row['step_peak_mib']:.0f} MiB")
    return row


def run(settings, sections=None) -> dict:
    with ThreadPoolExecutor(max_workers=settings.memory_parallel) as pool:
        runs = list(pool.map(lambda job: _spawn(*job, settings), settings.memory_jobs))
    return {"precision": "float32", "parallel": settings.memory_parallel,
            "mem_available_gib_at_start": round(_proc_mib("/proc/meminfo", "MemAvailable") / 1024, 1),
            "runs": runs}


def markdown(r: dict) -> str:
    rows = []
    for m in r["runs"]:
        row = [f"Bi-Real-{m['depth']}", m["batch"], f"{m['size']}x{m['size']}"]
        if "skipped" in m:
            rows.append(row + ["", "", "", f"not run: {m['skipped']}"])
        else:
            rows.append(row + [f1(m["baseline_rss_mib"], 0), f1(m["peak_rss_mib"], 0),
                               f1(m["step_peak_mib"], 0), f1(m["seconds"], 0)])
    overlap = (f" ({r['parallel']} processes at once, so these figures mean little.)"
               if r.get("parallel", 1) > 1 else "")
    return "\n\n".join([
        f"{METHOD}. {r['precision']}. MemAvailable at the start: "
        f"{r['mem_available_gib_at_start']} GiB.{overlap}",
        table(["network", "batch", "input", "RSS after build MiB", "peak RSS MiB (incl. tracing)",
               "peak - build MiB", "process s / note"], rows),
    ])


def findings(r: dict) -> list:
    parts = [f"R{m['depth']} batch {m['batch']}: peak RSS {m['peak_rss_mib']:.0f} MiB, "
             f"+{m['step_peak_mib']:.0f} MiB over the built model" for m in r["runs"] if "skipped" not in m]
    if not parts:
        return []
    size = r["runs"][0]["size"]
    return [f"Training-step memory at {size}x{size}: " + "; ".join(parts) + "."]


def main(argv=None):
    parser = argparse.ArgumentParser(description="Peak memory of one training step (one config).")
    parser.add_argument("--depth", type=int, default=18)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--num-classes", type=int, default=1000)
    args = parser.parse_args(argv)
    print(json.dumps(worker(args.depth, args.batch, args.size, args.num_classes)), flush=True)


if __name__ == "__main__":
    main()
