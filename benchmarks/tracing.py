"""Tracing time: Keras 2 (tf_keras) left to AutoGraph or not, for a model's first fit.

    python -m benchmarks.tracing [--rounds 5] [--size 32]

Each sample is a fresh process that imports bireal_tf, builds a Bi-Real-18, compiles it
as the training loop does (steps_per_execution 4) and fits one epoch of 4 steps on
random data: the time a training run, a test or an export spends before its first
step, dominated by tracing the train function. "default" runs with
BIREAL_TF_CONVERT_KERAS=1 (TensorFlow 2.16's rules: AutoGraph transpiles every
tf_keras function it meets), "bireal_tf" without it (tf_keras left unconverted, as
Keras 2 was before TF 2.16; bireal_tf/_keras_setup.py). The two alternate, so both see
the same machine load; the ratio is per pair. Writes benchmarks/tracing.md, which
BENCHMARKS.md includes.
"""

import argparse
import os
import statistics
import subprocess
import sys
from pathlib import Path

OUTPUT = Path(__file__).with_name("tracing.md")
SAMPLE = """
import time, numpy as np
start = time.perf_counter()
import bireal_tf
from bireal_tf.models import bireal_net
from bireal_tf.recipes.loop import compile_for_stage
import tensorflow as tf
imported = time.perf_counter()
model = bireal_net(18, input_shape=({size}, {size}, 3), num_classes=10, pad_values=1.0)
compile_for_stage(model, tf.keras.optimizers.Adam(1e-3))
x = np.random.rand(64, {size}, {size}, 3).astype("float32")
y = tf.one_hot(np.random.randint(0, 10, 64), 10)
model.fit(x, y, batch_size=16, epochs=1, verbose=0)
print("SECONDS", imported - start, time.perf_counter() - imported)
"""


def sample(convert_keras: bool, size: int) -> tuple[float, float]:
    """(import seconds, build + compile + first-fit seconds) of one fresh process."""
    env = dict(os.environ, TF_USE_LEGACY_KERAS="1", TF_CPP_MIN_LOG_LEVEL="2")
    env.pop("BIREAL_TF_CONVERT_KERAS", None)
    if convert_keras:
        env["BIREAL_TF_CONVERT_KERAS"] = "1"
    out = subprocess.run([sys.executable, "-c", SAMPLE.format(size=size)], env=env,
                         capture_output=True, text=True, check=True, timeout=3600).stdout
    line = [l for l in out.splitlines() if l.startswith("SECONDS")][-1]
    _, imported, fit = line.split()
    return float(imported), float(fit)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.tracing", description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--size", type=int, default=32)
    args = p.parse_args(argv)
    from benchmarks.common import load_average, now_iso

    start_load, rows = load_average(), []
    for r in range(args.rounds):
        default, ours = sample(True, args.size), sample(False, args.size)
        rows.append((default[1], ours[1]))
        print(f"round {r + 1}: default {default[1]:.1f} s, bireal_tf {ours[1]:.1f} s", flush=True)
    ratios = [d / o for d, o in rows]
    med_d, med_o = statistics.median(d for d, _ in rows), statistics.median(o for _, o in rows)
    from bireal_tf.utils import atomic_write_text

    atomic_write_text(OUTPUT, "\n".join([
        "## Tracing: Keras 2 left to AutoGraph or not (study)", "",
        f"Measured {now_iso()} by `python -m benchmarks.tracing --rounds {args.rounds} --size "
        f"{args.size}` (1-min load average {start_load[0]} at the start, {load_average()[0]} at "
        "the end; the machine was shared). Each sample: a fresh process builds Bi-Real-18 at "
        f"{args.size} px, compiles it as the training loop does and fits 4 steps of batch 16; "
        "the time from the import to the end of that fit, mostly tracing. The two settings "
        "alternate; the ratio is per pair.", "",
        "| setting | median s | per-round s |", "|---|---|---|",
        f"| TF 2.16 default (AutoGraph converts tf_keras) | {med_d:.1f} | "
        + ", ".join(f"{d:.1f}" for d, _ in rows) + " |",
        f"| bireal_tf (tf_keras unconverted, as Keras 2 before TF 2.16) | {med_o:.1f} | "
        + ", ".join(f"{o:.1f}" for _, o in rows) + " |", "",
        f"Ratio default / bireal_tf: median {statistics.median(ratios):.2f}x (per round "
        f"{min(ratios):.2f}-{max(ratios):.2f}x).", ""]))
    print(f"wrote {OUTPUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
