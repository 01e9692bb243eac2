"""Time between steps: an epoch's wall time against the steps it ran, through the real loop.

`make bench` section "epoch".

    ratio = epoch seconds / (train steps x median train step + eval steps x median eval step)

1.0 means every second of the epoch went into steps; the target is <= 1.10. The
epochs are those of `bireal_tf.recipes.train` (one `fit` per stage, per-epoch
validation, metrics row and checkpoint), run on the embedded Fashion-MNIST subset
as `make demo` runs it. The first epoch pays for tracing, so the ratio is taken
over the later ones (median).
"""

import statistics
import tempfile
import time

from benchmarks.common import log

TITLE = "Time between steps (epoch wall time / time in steps)"
TARGET = 1.10


def _step_timer():
    import tensorflow as tf

    class StepTimer(tf.keras.callbacks.Callback):
        """Seconds per executed call of the train and test functions, and epoch walls."""

        def __init__(self):
            super().__init__()
            self.train, self.test, self.epochs = [], [], []

        def on_epoch_begin(self, epoch, logs=None):
            self.train.append([])
            self.test.append([])
            self.epoch_start = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            self.epochs.append(time.perf_counter() - self.epoch_start)

        def on_train_batch_begin(self, batch, logs=None):
            self.t = time.perf_counter()

        def on_train_batch_end(self, batch, logs=None):
            self.train[-1].append((batch, time.perf_counter() - self.t))

        def on_test_batch_begin(self, batch, logs=None):
            self.t = time.perf_counter()

        def on_test_batch_end(self, batch, logs=None):
            self.test[-1].append((batch, time.perf_counter() - self.t))

    return StepTimer()


def _per_step(calls, total_steps):
    """Median seconds per step from (last batch index, seconds) of each executed call."""
    per_step, previous = [], -1
    for batch, seconds in calls:
        per_step.append(seconds / max(1, batch - previous))
        previous = batch
    return statistics.median(per_step) if per_step else 0.0


def measure(epochs, limit_train, limit_eval, batch_size, verbose=0):
    """Run r18_adam on the embedded subset for `epochs`; the ratio per epoch and its parts."""
    from bireal_tf.recipes import get_recipe
    from bireal_tf.recipes import train_recipe

    recipe, _ = get_recipe("r18_adam").fit_to_data("fashion_mnist_embedded")
    recipe = recipe.with_overrides(dataset="fashion_mnist_embedded", epochs=epochs,
                                   batch_size=batch_size)
    timer = _step_timer()
    with tempfile.TemporaryDirectory() as out:
        train_recipe(recipe, out, limit_train=limit_train, limit_eval=limit_eval, verbose=verbose,
              callbacks=[timer])
    rows = []
    for epoch, wall in enumerate(timer.epochs):
        train_steps = timer.train[epoch][-1][0] + 1 if timer.train[epoch] else 0
        eval_steps = timer.test[epoch][-1][0] + 1 if timer.test[epoch] else 0
        step = _per_step(timer.train[epoch], train_steps)
        eval_step = _per_step(timer.test[epoch], eval_steps)
        busy = train_steps * step + eval_steps * eval_step
        rows.append({"epoch": epoch + 1, "wall_s": round(wall, 2), "train_steps": train_steps,
                     "median_step_s": round(step, 4), "eval_steps": eval_steps,
                     "median_eval_step_s": round(eval_step, 4), "ratio": round(wall / busy, 3)})
        log(f"epoch: epoch {epoch + 1} {wall:.1f} s, {train_steps} x {step:.3f} s + "
            f"{eval_steps} x {eval_step:.3f} s, ratio {rows[-1]['ratio']}")
    later = [r["ratio"] for r in rows[1:]] or [rows[0]["ratio"]]
    return {"epochs": rows, "median_ratio_after_first": round(statistics.median(later), 3),
            "target": TARGET, "batch_size": batch_size, "limit_train": limit_train,
            "limit_eval": limit_eval}


def run(settings, sections=None) -> dict:
    return measure(settings.epoch_epochs, settings.epoch_limit_train, settings.epoch_limit_eval,
                   settings.epoch_batch)


def markdown(r: dict) -> str:
    lines = [
        "r18_adam on the embedded Fashion-MNIST subset (32 px, batch "
        f"{r['batch_size']}, {r['limit_train'] or 10000} training and {r['limit_eval'] or 2000} "
        "test images, validation every epoch) through `bireal_tf.recipes.train`. Per epoch: "
        "wall time from the epoch's start to its end (metrics row and checkpoint included) "
        "against train steps x median step + eval steps x median eval step, the steps timed "
        "by a callback around each call of the compiled functions. The first epoch pays for "
        "tracing; the verdict is the median over the later ones.",
        "",
        "| epoch | wall (s) | train steps x median (s) | eval steps x median (s) | ratio |",
        "|---|---|---|---|---|",
    ]
    for e in r["epochs"]:
        lines.append(f"| {e['epoch']} | {e['wall_s']} | {e['train_steps']} x {e['median_step_s']} "
                     f"| {e['eval_steps']} x {e['median_eval_step_s']} | {e['ratio']} |")
    lines += ["", f"Median ratio after the first epoch: **{r['median_ratio_after_first']}** "
                  f"(target <= {r['target']})."]
    return "\n".join(lines)


def findings(r: dict) -> list:
    met = "meets" if r["median_ratio_after_first"] <= r["target"] else "misses"
    return [f"Time between steps: an epoch takes {r['median_ratio_after_first']}x the time of "
            f"its train and eval steps (median after the first epoch; {met} the <= "
            f"{r['target']} target)."]
