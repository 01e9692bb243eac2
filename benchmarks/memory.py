"""Section 4: peak memory of a training step, each configuration in its own process.

`tf.config.experimental.get_memory_info("CPU:0")` reports zeros on CPU with
TF 2.16 (checked here), so the measure is the process' resident set:

    baseline = VmRSS after TensorFlow is imported, the model is built and compiled
               and the in-memory batch exists (before the optimizer's slots,
               the traced step and its activations);
    peak     = VmHWM (the resident high-water mark of this process' memory map) after
               `steps` training steps (the first one traces). Not ru_maxrss: Linux
               carries ru_maxrss across exec, so a worker started by a large parent
               would report the parent's size;
    step     = peak - baseline: what training adds on top of the built model --
               Adam's two slots per weight, gradients, the activations kept for
               the backward pass, the traced graph and allocator slack;
    steady   = the peak of steps 2..n alone: VmHWM is reset (write 5 to
               /proc/self/clear_refs) after the first step, so tracing's
               transient memory is left out; steady - baseline is what a
               long run needs above the built model.

Run a worker by hand: python -m benchmarks.memory --depth 18 --batch 32 --size 224
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

from benchmarks.common import REPO, Settings, Stopwatch, log


def _vm_rss_mib() -> float:
    with open("/proc/self/status", encoding="utf-8") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _hwm_mib() -> float:
    """VmHWM: the peak resident set since start or since the last _reset_hwm()."""
    with open("/proc/self/status", encoding="utf-8") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _reset_hwm() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0: write 5 to /proc/self/clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="utf-8") as f:
            f.write("5")
        return True
    except OSError:
        return False


def worker(depth: int, batch: int, size: int, steps: int, num_classes: int, precision: str) -> dict:
    from benchmarks.common import setup_environment

    setup_environment()
    import bireal_tf  # noqa: F401
    from benchmarks.training import (
        TrainConfig,
        build_model,
        compile_like_the_loop,
        in_memory_dataset,
        prebuild,
    )

    watch = Stopwatch()
    cfg = TrainConfig("memory", "ours", size, batch, precision=precision)
    model = build_model(cfg, num_classes, depth)
    compile_like_the_loop(model, cfg, depth)
    iterator = iter(in_memory_dataset(cfg, num_classes))
    baseline = _vm_rss_mib()
    setup_seconds = watch.seconds
    prebuild(model, cfg, num_classes)  # the optimizer's slots: after the baseline, so counted
    fn = model.make_train_function()
    float(fn(iterator)["loss"].numpy())  # traces and runs a step
    peak = _hwm_mib()
    after_first = _vm_rss_mib()
    steady = None
    if steps > 1 and _reset_hwm():
        for _ in range(steps - 1):
            logs = fn(iterator)
        float(logs["loss"].numpy())
        steady = _hwm_mib()
        peak = max(peak, steady)
    return {
        "depth": depth, "batch": batch, "size": size, "steps": steps, "precision": precision,
        "params": int(model.count_params()),
        "baseline_rss_mib": round(baseline, 1),
        "peak_rss_mib": round(peak, 1),
        "step_peak_mib": round(peak - baseline, 1),
        "rss_after_first_step_mib": round(after_first, 1),
        "steady_peak_rss_mib": None if steady is None else round(steady, 1),
        "steady_step_peak_mib": None if steady is None else round(steady - baseline, 1),
        "setup_seconds": round(setup_seconds, 1),
        "seconds": round(watch.seconds, 1),
    }


# A child is killed when its RSS passes this share of MemAvailable (measured before it
# starts), so the machine never runs out of memory; jobs predicted to pass it are skipped.
MEMORY_FRACTION = 0.9


def mem_available_mib() -> float:
    try:
        with open("/proc/meminfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("inf")


def _rss_of(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status", encoding="utf-8") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def predict_peak(depth: int, batch: int, rows) -> "float | None":
    """Peak RSS (MiB) of (depth, batch) extrapolated linearly in the batch size from the
    runs of the same depth at smaller batches; None without any.

    From two runs: the line through them. From one: its baseline (the built model) plus
    its step memory scaled with the batch, an overestimate since part of the step
    memory (optimizer slots, the traced graph) does not grow with the batch.
    """
    done = sorted((r["batch"], r["peak_rss_mib"], r.get("baseline_rss_mib", 0.0)) for r in rows
                  if r.get("depth") == depth and "error" not in r and "skipped" not in r
                  and r["batch"] < batch)
    if not done:
        return None
    if len(done) == 1:
        b, peak, baseline = done[0]
        return baseline + (peak - baseline) * batch / b
    (b1, p1, _), (b2, p2, _) = done[-2], done[-1]
    return p2 + (p2 - p1) / (b2 - b1) * (batch - b2)


def _spawn(depth, batch, settings: Settings, limit_mib: float, precision="float32") -> dict:
    """One worker process, killed if its RSS passes `limit_mib` (so the machine never OOMs)."""
    cmd = [sys.executable, "-m", "benchmarks.memory", "--depth", str(depth), "--batch", str(batch),
           "--size", str(settings.memory_size), "--steps", str(settings.memory_steps),
           "--num-classes", str(settings.num_classes), "--precision", precision]
    env = dict(os.environ, TF_USE_LEGACY_KERAS="1", TF_CPP_MIN_LOG_LEVEL="2",
               PYTHONPATH=os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p))
    watch = Stopwatch()
    base = {"depth": depth, "batch": batch, "size": settings.memory_size}
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True, env=env, cwd=str(REPO))
        killed_at = None
        while proc.poll() is None:
            rss = _rss_of(proc.pid)
            if rss > limit_mib:
                proc.kill()
                killed_at = rss
            elif watch.seconds > 1800:
                proc.kill()
            time.sleep(0.2)
        proc.wait()
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if killed_at is not None:
        log(f"memory: R{depth} batch {batch} stopped at {killed_at:.0f} MiB (limit {limit_mib:.0f} MiB)")
        return {**base, "skipped": f"stopped at {killed_at / 1024:.1f} GiB RSS, over the limit of "
                                   f"{limit_mib / 1024:.1f} GiB ({MEMORY_FRACTION:.0%} of MemAvailable)",
                "limit_mib": round(limit_mib)}
    lines = [line for line in stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (stderr.strip().splitlines() or ["no output"])[-1][:300]
        log(f"memory: R{depth} batch {batch} failed: {tail}")
        return {**base, "error": f"exit {proc.returncode}: {tail}"}
    row = json.loads(lines[-1])
    row["wall_seconds"] = round(watch.seconds, 1)  # with the child's Python and TF imports
    log(f"memory: R{depth} batch {batch}: baseline {row['baseline_rss_mib']:.0f} MiB, peak "
        f"{row['peak_rss_mib']:.0f} MiB, step +{row['step_peak_mib']:.0f} MiB "
        f"({watch.seconds:.0f} s)")
    return row


def _step_line(runs):
    """(fixed s, s per image) of the first step (trace + step) through two runs of a depth."""
    (b1, t1), (b2, t2) = sorted((r["batch"], r["seconds"] - r["setup_seconds"]) for r in runs)[-2:]
    per_image = max(0.0, (t2 - t1) / (b2 - b1)) if b2 != b1 else 0.0
    return max(0.0, t2 - per_image * b2), per_image


def _estimated_seconds(depth, batch, rows) -> float:
    """A guess of a job's wall time from the finished jobs (60 s without any).

    wall = (wall - worker time of a finished run: imports) + setup + first step, where
    the first step is mostly tracing, a fixed cost, plus a part that grows with the
    batch. That split comes from two runs of the same depth, else from two runs of
    another depth (as a fraction), else the whole step is taken to grow (pessimistic).
    """
    done = [r for r in rows if "seconds" in r and "setup_seconds" in r]
    same = [r for r in done if r["depth"] == depth]
    if not same:
        return 2.5 * max(r.get("wall_seconds", r["seconds"]) for r in done) if done else 60.0
    last = max(same, key=lambda r: r["batch"])
    overhead = last.get("wall_seconds", last["seconds"]) - last["seconds"]
    step = last["seconds"] - last["setup_seconds"]
    if len({r["batch"] for r in same}) >= 2:
        fixed, per_image = _step_line(same)
        step = fixed + per_image * batch
    else:
        others = {}
        for r in done:
            others.setdefault(r["depth"], []).append(r)
        pairs = [runs for runs in others.values() if len({r["batch"] for r in runs}) >= 2]
        if pairs:
            fixed, per_image = _step_line(pairs[0])
            b0 = min(r["batch"] for r in pairs[0])
            grows = per_image * b0 / (fixed + per_image * b0)  # share of the step that scales
            step *= (1 - grows) + grows * batch / last["batch"]
        else:
            step *= max(1.0, batch / last["batch"])
    return overhead + last["setup_seconds"] + step


def _job(depth, batch, settings: Settings, rows, deadline=None) -> dict:
    predicted = predict_peak(depth, batch, rows)
    if deadline is not None:
        needed = _estimated_seconds(depth, batch, rows)
        left = deadline - time.monotonic()
        if needed > left:
            log(f"memory: R{depth} batch {batch} skipped: about {needed:.0f} s needed, {left:.0f} s left")
            row = {"depth": depth, "batch": batch, "size": settings.memory_size,
                   "skipped": (f"time budget: about {needed:.0f} s needed, {max(0, left):.0f} s "
                               "left of the run's budget")}
            if predicted is not None:
                row["predicted_peak_rss_mib"] = round(predicted)
            return row
    available = mem_available_mib()
    limit = MEMORY_FRACTION * available
    # The prediction overestimates (see predict_peak), so it only rules out what cannot
    # fit at all; the watchdog in _spawn enforces the limit on the real run.
    if predicted is not None and predicted > available:
        log(f"memory: R{depth} batch {batch} skipped: predicted {predicted:.0f} MiB > "
            f"{available:.0f} MiB available")
        return {"depth": depth, "batch": batch, "size": settings.memory_size,
                "skipped": (f"predicted peak {predicted / 1024:.1f} GiB (extrapolated in the batch "
                            f"from the smaller batches) exceeds the {available / 1024:.1f} GiB "
                            "available"),
                "predicted_peak_rss_mib": round(predicted), "limit_mib": round(limit)}
    row = _spawn(depth, batch, settings, limit)
    if predicted is not None:
        row["predicted_peak_rss_mib"] = round(predicted)
    return row


def run(settings: Settings, deadline=None) -> dict:
    """`deadline` (a time.monotonic() value) skips the jobs that would not finish before it."""
    watch = Stopwatch()
    jobs = sorted(settings.memory_jobs)
    rows = []
    if settings.memory_parallel > 1:
        with ThreadPoolExecutor(max_workers=settings.memory_parallel) as pool:
            rows = list(pool.map(lambda job: _job(job[0], job[1], settings, []), jobs))
    else:
        for depth, batch in jobs:  # ascending batch per depth: each run predicts the next
            rows.append(_job(depth, batch, settings, rows, deadline))
    return {
        "method": ("one subprocess per configuration; peak = VmHWM (not ru_maxrss, which Linux "
                   "carries over from the parent across exec), minus VmRSS after "
                   "model build + compile; steady = VmHWM of steps 2..n (reset via "
                   "/proc/self/clear_refs) minus the same baseline. "
                   "tf.config.experimental.get_memory_info reports zeros on CPU. A run is "
                   "skipped when its peak, extrapolated in the batch size from the smaller "
                   "batches, exceeds MemAvailable, and stopped when its RSS passes "
                   f"{MEMORY_FRACTION:.0%} of MemAvailable"),
        "steps": settings.memory_steps,
        "precision": "float32",
        "mem_available_gib_at_start": round(mem_available_mib() / 1024, 1),
        "runs": rows,
        "seconds": round(watch.seconds, 1),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description="Peak memory of training steps (one config).")
    parser.add_argument("--depth", type=int, default=18)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--num-classes", type=int, default=1000)
    parser.add_argument("--precision", default="float32")
    args = parser.parse_args(argv)
    row = worker(args.depth, args.batch, args.size, args.steps, args.num_classes, args.precision)
    print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
