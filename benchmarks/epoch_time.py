"""Time between steps: an epoch's wall time against the steps it ran, through the real loop.

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


def measure(epochs=3, limit_train=None, limit_eval=None, batch_size=64, verbose=0):
    """Run r18_adam on the embedded subset for `epochs`; the ratio per epoch and its parts."""
    from bireal_tf.recipes import get_recipe, train

    recipe, _ = get_recipe("r18_adam").fit_to_data("fashion_mnist_embedded")
    recipe = recipe.with_overrides(dataset="fashion_mnist_embedded", epochs=epochs,
                                   batch_size=batch_size)
    timer = _step_timer()
    with tempfile.TemporaryDirectory() as out:
        train(recipe, out, limit_train=limit_train, limit_eval=limit_eval, verbose=verbose,
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
    later = [r["ratio"] for r in rows[1:]] or [rows[0]["ratio"]]
    return {"epochs": rows, "median_ratio_after_first": round(statistics.median(later), 3),
            "target": 1.10}


if __name__ == "__main__":
    import json

    import bireal_tf  # noqa: F401

    print(json.dumps(measure(), indent=2))
