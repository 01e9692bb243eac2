"""The training loop every recipe shares: Keras `fit`, stage by stage, resumable.

Output directory of a run:

    run.json                 which recipe and config the directory belongs to
    stages/<i>_<stage>/      per stage: checkpoints/ (every epoch), model.keras (done)
    logs/<stage>/            TensorBoard
    metrics.csv              one row per epoch of every stage
    model.keras              the final model
    summary.json             recipe, config, top-1/top-5, wall time, images/s, versions
    curves.png               training curves

Resuming: a stage with a `model.keras` is done and skipped; a stage with
checkpoints continues after its last completed epoch, with the optimizer state
and step counter restored. Each epoch's data order and augmentation are drawn
from (seed, stage, epoch), so a resumed run sees the same batches as an
uninterrupted one.
"""
import csv
import io
import json
import math
import os
import platform
import shutil
import sys
import time

import larq as lq
import numpy as np
import tensorflow as tf

from bireal_tf import models
from bireal_tf.data import load_dataset
from bireal_tf.export.files import atomic_write_text
from bireal_tf.recipes.recipe import make_optimizer

STRATEGIES = ("default", "one_device", "mirrored", "multi_worker", "tpu")
MIXED_PRECISION = ("float16", "bfloat16")
# Train steps per call of the compiled train function: the same steps, with less Python
# and dispatch overhead between them (1.04-1.13x at batch 32 on 2 CPU cores, BENCHMARKS.md).
STEPS_PER_EXECUTION = 4
METRIC_COLUMNS = ("stage", "epoch", "loss", "top1", "top5", "val_loss", "val_top1", "val_top5",
                  "lr", "seconds", "images_per_second")  # fmt: skip


class TrainingError(RuntimeError):
    """Training cannot go on; the message says why and what was kept."""


class RunDirError(TrainingError):
    """The output directory belongs to another run."""


# --- small helpers ---------------------------------------------------------------------


def atomic_write(path, text):
    """Write a text file through a temp file and a rename: a crash never leaves half a file."""
    atomic_write_text(path, text)


def save_model_atomic(model, path):
    tmp = os.path.join(os.path.dirname(path), f".tmp-{os.getpid()}-{os.path.basename(path)}")
    model.save(tmp)
    os.replace(tmp, path)


def library_versions():
    import larq_compute_engine
    import larq_zoo
    import tf_keras

    return {
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
        "tf_keras": tf_keras.__version__,
        "larq": lq.__version__ if hasattr(lq, "__version__") else "unknown",
        "larq_zoo": getattr(larq_zoo, "__version__", "unknown"),
        "larq_compute_engine": getattr(larq_compute_engine, "__version__", "unknown"),
        "numpy": np.__version__,
    }


def make_strategy(name, tpu=None):
    """A tf.distribute strategy by name (see STRATEGIES)."""
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "one_device":
        gpus = tf.config.list_logical_devices("GPU")
        return tf.distribute.OneDeviceStrategy(gpus[0].name if gpus else "/cpu:0")
    if name == "mirrored":
        gpus = tf.config.list_logical_devices("GPU")
        devices = [d.name for d in gpus] or [d.name for d in tf.config.list_logical_devices("CPU")]
        return tf.distribute.MirroredStrategy(devices)
    if name == "multi_worker":
        if "TF_CONFIG" not in os.environ:
            raise TrainingError(
                "--strategy multi_worker needs the TF_CONFIG environment variable describing "
                'the cluster, e.g. {"cluster": {"worker": ["host1:port", "host2:port"]}, '
                '"task": {"type": "worker", "index": 0}}.'
            )
        return tf.distribute.MultiWorkerMirroredStrategy()
    if name == "tpu":
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu or "")
        tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
        return tf.distribute.TPUStrategy(resolver)
    raise ValueError(f"Unknown strategy {name!r}; valid strategies: {', '.join(STRATEGIES)}.")


def worker_info(strategy):
    """(is_chief, task_id) of this process in a multi-worker cluster; (True, 0) otherwise."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return True, 0
    task_type, task_id = resolver.task_type, resolver.task_id
    is_chief = task_type == "chief" or (task_type == "worker" and task_id == 0
                                        and "chief" not in resolver.cluster_spec().as_dict())
    return is_chief, task_id


# --- callbacks -------------------------------------------------------------------------


class NaNGuard(tf.keras.callbacks.Callback):
    """Stop at a non-finite loss and remember where, so nothing bad is saved.

    The logged loss is a running mean, so once non-finite it stays so; checking
    every `every` batches (and at the epoch's end) finds it without forcing a
    device sync on every step.
    """

    def __init__(self, every=10):
        super().__init__()
        self.every = every
        self.bad_step = None
        self._next = 0

    def _check(self, batch, logs):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(float(loss)):
            self.bad_step = batch
            self.model.stop_training = True

    def on_train_batch_end(self, batch, logs=None):
        # With steps_per_execution = k, Keras calls this every k steps (batch k-1, 2k-1, ...).
        if batch >= self._next:
            self._next = batch + self.every
            self._check(batch, logs)

    def on_epoch_begin(self, epoch, logs=None):
        self._next = 0

    def on_epoch_end(self, epoch, logs=None):
        if self.bad_step is None:
            self._check("end", logs)


# --- the loop --------------------------------------------------------------------------


class Trainer:
    """Runs a recipe's stages into an output directory. See the module docstring."""

    def __init__(
        self,
        recipe,
        output_dir,
        *,
        data_dir=None,
        start_stage=None,
        init_weights=None,
        overwrite=False,
        strategy="default",
        tpu=None,
        mixed_precision=None,
        steps_per_execution=STEPS_PER_EXECUTION,
        deterministic=False,
        limit_train=None,
        limit_eval=None,
        validate=True,
        verbose=1,
    ):
        self.recipe = recipe
        self.output_dir = os.path.abspath(output_dir)
        self.data_dir = data_dir
        self.start_stage = start_stage
        self.init_weights = init_weights
        self.overwrite = overwrite
        self.strategy_name = strategy
        self.tpu = tpu
        self.mixed_precision = mixed_precision
        self.steps_per_execution = int(steps_per_execution)
        self.deterministic = deterministic
        self.limit_train = limit_train
        self.limit_eval = limit_eval
        self.validate = validate
        self.verbose = verbose
        if start_stage is not None:
            recipe.stage(start_stage)  # validates the name
        if mixed_precision not in (None, *MIXED_PRECISION):
            raise ValueError(f"mixed_precision must be one of {MIXED_PRECISION} or None.")
        if self.steps_per_execution < 1:
            raise ValueError(f"steps_per_execution must be >= 1, got {steps_per_execution}.")

    # -- set-up --

    def _claim_output_dir(self):
        """Refuse a directory that holds another recipe's run, unless told to overwrite."""
        marker = os.path.join(self.write_dir, "run.json")
        if os.path.exists(marker):
            with open(marker) as f:
                previous = json.load(f)
            if previous.get("recipe") != self.recipe.name:
                if not self.overwrite:
                    raise RunDirError(
                        f"{self.write_dir} holds a run of recipe {previous.get('recipe')!r}, "
                        f"not {self.recipe.name!r}. Choose another --output-dir, or pass "
                        "--overwrite to delete that run."
                    )
                shutil.rmtree(self.write_dir)
            elif self.overwrite:
                shutil.rmtree(self.write_dir)
        elif os.path.isdir(self.write_dir) and os.listdir(self.write_dir) and not self.overwrite:
            raise RunDirError(
                f"{self.write_dir} is not empty and holds no bireal_tf run. Choose another "
                "--output-dir, or pass --overwrite to use it anyway."
            )
        os.makedirs(self.write_dir, exist_ok=True)
        atomic_write(marker, json.dumps({"recipe": self.recipe.name,
                                         "config": self.recipe.to_dict()}, indent=2))

    def _dataset(self, split, augmentation, seed, limit, batch_size):
        return load_dataset(
            self.recipe.dataset,
            split,
            batch_size=batch_size,
            image_size=self.recipe.image_size,
            augmentation=augmentation,
            data_dir=self.data_dir,
            shuffle=split == "train",
            seed=seed,
            repeat=split == "train",
            drop_remainder=split == "train",
            limit=limit,
        )

    def _one_hot(self, spec):
        n = spec.num_classes
        return spec.dataset.map(lambda x, y: (x, tf.one_hot(y, n)),
                                num_parallel_calls=tf.data.AUTOTUNE)

    def build_model(self, stage, num_classes, image_size):
        quantizer = None if stage.kernel_quantizer == "magnitude_aware" else "ste_sign"
        model = models.bireal_net(
            self.recipe.depth,
            input_shape=(image_size, image_size, 3),
            num_classes=num_classes,
            activation=stage.activation,
            padding=self.recipe.padding,
            pad_values=self.recipe.pad_values,
            kernel_quantizer=quantizer,
        )
        if stage.train_only_batchnorm:
            for layer in model.layers:
                if not isinstance(layer, tf.keras.layers.BatchNormalization):
                    layer.trainable = False
        return model

    def _load_initial_weights(self, model, path):
        """Weights of a saved model or weights file, matched by layer name."""
        if path == "larq_zoo":  # larq-zoo's ImageNet Bi-Real-18, fetched through larq-zoo
            from bireal_tf.interop import load_larq_zoo_weights

            return self._say(load_larq_zoo_weights(model))
        if not os.path.exists(path):
            raise TrainingError(f"--init-weights {path} does not exist.")
        if path.endswith(".keras") or os.path.isdir(path):
            source = tf.keras.models.load_model(path, compile=False)
            by_name = {layer.name: layer for layer in source.layers}
            copied = 0
            for layer in model.layers:
                if layer.weights and layer.name in by_name:
                    layer.set_weights(by_name[layer.name].get_weights())
                    copied += 1
            if copied == 0:
                raise TrainingError(f"{path} shares no layer names with the {model.name} model.")
        else:
            model.load_weights(path, by_name=path.endswith(".h5"))

    # -- running --

    def run(self):
        # The policy is process-global: set it for this run only, so models built after
        # `train(...)` in the same notebook are float32 again.
        previous_policy = tf.keras.mixed_precision.global_policy()
        if self.mixed_precision:
            tf.keras.mixed_precision.set_global_policy(f"mixed_{self.mixed_precision}")
        try:
            return self._run()
        finally:
            tf.keras.mixed_precision.set_global_policy(previous_policy)

    def _run(self):
        recipe = self.recipe
        if self.deterministic:
            tf.config.experimental.enable_op_determinism()
        tf.keras.utils.set_random_seed(recipe.seed)

        self.strategy = make_strategy(self.strategy_name, self.tpu)
        self.is_chief, task_id = worker_info(self.strategy)
        self.write_dir = (self.output_dir if self.is_chief
                          else os.path.join(self.output_dir, f"worker-{task_id}"))
        self._claim_output_dir()

        start = recipe.stage_names().index(self.start_stage) if self.start_stage else 0
        self.rows = self._read_metrics()
        t0 = time.time()
        previous_model_path = self.init_weights
        train_images, train_seconds = 0, 0.0
        model, eval_spec = None, None
        for index in range(start, len(recipe.stages)):
            stage = recipe.stages[index]
            stage_dir = os.path.join(self.write_dir, "stages", f"{index}_{stage.name}")
            final_path = os.path.join(stage_dir, "model.keras")
            if os.path.exists(final_path):
                self._say(f"Stage {stage.name}: done earlier, {final_path}")
                previous_model_path = final_path
                continue
            model, eval_spec, images, seconds = self._run_stage(
                index, stage, stage_dir, previous_model_path
            )
            train_images += images
            train_seconds += seconds
            save_model_atomic(model, final_path)
            previous_model_path = final_path

        return self._finish(previous_model_path, model, eval_spec, time.time() - t0,
                            train_images, train_seconds)

    def _run_stage(self, index, stage, stage_dir, init_path):
        recipe = self.recipe
        os.makedirs(stage_dir, exist_ok=True)
        batch = recipe.batch_size
        probe = self._dataset("train", stage.augmentation, recipe.seed, self.limit_train, batch)
        steps = recipe.steps_per_epoch or probe.steps_per_epoch
        if steps < 1:
            raise TrainingError(
                f"batch size {batch} is larger than the {probe.num_examples} training examples; "
                "lower --batch-size."
            )
        eval_spec = self._dataset("test", "none", None, self.limit_eval, batch)

        with self.strategy.scope():
            model = self.build_model(stage, probe.num_classes, probe.image_size)
            if init_path:
                self._load_initial_weights(model, init_path)
            optimizer = make_optimizer(recipe, stage, steps)
            model.compile(
                optimizer=optimizer,
                loss=tf.keras.losses.CategoricalCrossentropy(label_smoothing=stage.label_smoothing),
                metrics=[tf.keras.metrics.CategoricalAccuracy(name="top1"),
                         tf.keras.metrics.TopKCategoricalAccuracy(5, name="top5")],
                steps_per_execution=self.steps_per_execution,
            )
        # The epoch counter lives outside the strategy scope: a plain variable on the host.
        checkpoint = tf.train.Checkpoint(model=model, optimizer=optimizer,
                                         epoch=tf.Variable(0, dtype=tf.int64, trainable=False))
        manager = tf.train.CheckpointManager(checkpoint, os.path.join(stage_dir, "checkpoints"),
                                             max_to_keep=2)
        if manager.latest_checkpoint:
            checkpoint.restore(manager.latest_checkpoint).expect_partial()
            self._say(f"Stage {stage.name}: resuming after epoch {int(checkpoint.epoch)} "
                      f"from {manager.latest_checkpoint}")
        else:
            self._say(f"Stage {stage.name}: {stage.epochs} epochs of {steps} steps, batch {batch}, "
                      f"{stage.optimizer} lr {recipe.scaled_lr(stage):g} ({stage.schedule})")

        guard = NaNGuard()
        callbacks = [guard, tf.keras.callbacks.TensorBoard(
            os.path.join(self.write_dir, "logs", stage.name), profile_batch=0)]
        val = self._one_hot(eval_spec).take(eval_spec.steps_per_epoch) if self.validate else None
        images, seconds = 0, 0.0
        for epoch in range(int(checkpoint.epoch), stage.epochs):
            # The epoch's data depend on (seed, stage, epoch) only: resuming sees the same batches.
            seed = recipe.seed * 1_000_003 + index * 10_007 + epoch
            spec = self._dataset("train", stage.augmentation, seed, self.limit_train, batch)
            train = self._one_hot(spec).take(steps)
            t = time.time()
            history = model.fit(train, initial_epoch=epoch, epochs=epoch + 1, steps_per_epoch=steps,
                                validation_data=val, callbacks=callbacks, verbose=self.verbose)
            elapsed = time.time() - t
            if guard.bad_step is not None:
                kept = manager.latest_checkpoint or "none (it failed in the first epoch)"
                where = "its end" if guard.bad_step == "end" else f"step {guard.bad_step + 1}"
                raise TrainingError(
                    f"Loss became NaN/inf in stage {stage.name}, epoch {epoch + 1}, at "
                    f"{where}. Stopped; nothing of this epoch was saved. Last good "
                    f"checkpoint: {kept}. Lower --lr or check the data, then rerun the same "
                    "command to resume from it."
                )
            images += steps * batch
            seconds += elapsed
            # The metrics row first, then the checkpoint: a kill between the two re-runs
            # the epoch, whose row is then replaced; the other order would lose the row.
            logs = {k: v[-1] for k, v in history.history.items()}
            lr = float(tf.keras.backend.get_value(optimizer.learning_rate))
            self._add_row(stage.name, epoch + 1, logs, lr, elapsed, steps * batch / elapsed)
            checkpoint.epoch.assign(epoch + 1)
            manager.save(checkpoint_number=epoch + 1)
        return model, eval_spec, images, seconds

    # -- reports --

    def _read_metrics(self):
        path = os.path.join(self.write_dir, "metrics.csv")
        if not os.path.exists(path):
            return []
        with open(path, newline="") as f:
            return list(csv.DictReader(f))

    def _add_row(self, stage, epoch, logs, lr, seconds, images_per_second):
        row = {"stage": stage, "epoch": epoch, "lr": f"{lr:.6g}", "seconds": f"{seconds:.2f}",
               "images_per_second": f"{images_per_second:.1f}"}
        for key in ("loss", "top1", "top5", "val_loss", "val_top1", "val_top5"):
            row[key] = f"{logs[key]:.6f}" if key in logs else ""
        self.rows = [r for r in self.rows
                     if not (r["stage"] == stage and int(r["epoch"]) >= epoch)] + [row]
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=METRIC_COLUMNS)
        writer.writeheader()
        writer.writerows(self.rows)
        atomic_write(os.path.join(self.write_dir, "metrics.csv"), out.getvalue())

    def _finish(self, final_path, model, eval_spec, wall, train_images, train_seconds):
        recipe = self.recipe
        if model is None:  # every stage was done before: load the last one to evaluate
            model = tf.keras.models.load_model(final_path, compile=False)
        if eval_spec is None:
            eval_spec = self._dataset("test", "none", None, self.limit_eval, recipe.batch_size)
        with self.strategy.scope():
            model.compile(loss="categorical_crossentropy",
                          metrics=[tf.keras.metrics.CategoricalAccuracy(name="top1"),
                                   tf.keras.metrics.TopKCategoricalAccuracy(5, name="top5")])
        results = model.evaluate(self._one_hot(eval_spec), verbose=0, return_dict=True)
        final_model = os.path.join(self.write_dir, "model.keras")
        save_model_atomic(model, final_model)
        summary = {
            "recipe": recipe.name,
            "config": recipe.to_dict(),
            "learning_rates": {s.name: recipe.scaled_lr(s) for s in recipe.stages},
            "dataset": {"name": recipe.dataset, "data_dir": self.data_dir,
                        "test_examples": eval_spec.num_examples,
                        "image_size": eval_spec.image_size},
            "top1": float(results["top1"]),
            "top5": float(results["top5"]),
            "test_loss": float(results["loss"]),
            "wall_time_seconds": round(wall, 2),
            "train_images_per_second": (round(train_images / train_seconds, 1)
                                        if train_seconds else None),
            "strategy": self.strategy_name,
            "replicas": self.strategy.num_replicas_in_sync,
            "mixed_precision": self.mixed_precision,
            "steps_per_execution": self.steps_per_execution,
            "deterministic": self.deterministic,
            "model": final_model,
            "versions": library_versions(),
            "command": " ".join(sys.argv),
        }
        self._say(f"Test top-1 {summary['top1']:.4f}  top-5 {summary['top5']:.4f}  "
                  f"({eval_spec.num_examples} images)")
        from bireal_tf.recipes.reports import plot_curves

        if self.rows:
            plot_curves(self.rows, os.path.join(self.write_dir, "curves.png"))
        atomic_write(os.path.join(self.write_dir, "summary.json"), json.dumps(summary, indent=2))
        return summary

    def _say(self, message):
        if self.verbose:
            print(message, flush=True)


def train(recipe, output_dir, **kwargs):
    """Run `recipe` into `output_dir`; returns the summary dict. See `Trainer`."""
    return Trainer(recipe, output_dir, **kwargs).run()
