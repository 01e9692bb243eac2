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

Distillation (recipe.teacher; bireal_tf.recipes.distill): a stage that distills
trains through a `Distiller` around its model; the checkpoints hold the student
and its optimizer only, as without a teacher. The teacher is a file, or the model
of the run's twin stage, which a resumed run finds done and does not train again.
"""
import csv
import io
import json
import math
import os
import shutil
import sys
import time

import larq as lq
import numpy as np
import tensorflow as tf

from bireal_tf import models
from bireal_tf.data import load_dataset
from bireal_tf.models.layers import Subsample2D
from bireal_tf.quantizers import MagnitudeAwareSign, custom_objects
from bireal_tf.recipes.batchnorm import ReestimateBatchNorm, reestimation_steps
from bireal_tf.recipes.distill import Distiller, load_teacher
from bireal_tf.recipes.recipe import SMALL_IMAGE_MAX_SIZE, TWIN, conv_l2_loss, make_optimizer
from bireal_tf.utils import atomic_write_text, bf16_cpu_flags, library_versions, save_model_atomic

STRATEGIES = ("default", "one_device", "mirrored", "multi_worker", "tpu")
MIXED_PRECISION = ("float16", "bfloat16")
PRECISION_CHOICES = ("auto", "float32", *MIXED_PRECISION)
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


def compile_for_stage(model, optimizer=None, label_smoothing=0.0,
                      steps_per_execution=STEPS_PER_EXECUTION):
    """Compile `model` as every stage trains and evaluates it: one-hot cross-entropy
    (with the stage's label smoothing), top-1 and top-5 accuracy (ties counted as
    `bireal_tf.evaluate` counts them). Without an optimizer, for evaluation only."""
    from bireal_tf.metrics import accuracy_metrics

    model.compile(
        optimizer=optimizer or "sgd",  # Keras needs one; evaluation never steps it
        loss=tf.keras.losses.CategoricalCrossentropy(label_smoothing=label_smoothing),
        metrics=accuracy_metrics(),
        steps_per_execution=steps_per_execution,
    )


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


class _EpochEnd(tf.keras.callbacks.Callback):
    """Calls `fn(epoch, logs, seconds, train_seconds)` at each epoch's end; `train_seconds`
    stops where validation starts."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def on_epoch_begin(self, epoch, logs=None):
        self.start, self.train_seconds = time.perf_counter(), None

    def on_test_begin(self, logs=None):
        if self.train_seconds is None:
            self.train_seconds = time.perf_counter() - self.start

    def on_epoch_end(self, epoch, logs=None):
        seconds = time.perf_counter() - self.start
        self.fn(epoch, logs or {}, seconds, self.train_seconds or seconds)


# --- the loop --------------------------------------------------------------------------


def _absorb_weight_scale(model, source_layers):
    """Carry the magnitude-aware scale into BatchNorm when weights become +-1 (no scale).

    A source conv computed z = a_c * (sign(W) * x), a_c = mean|W[..., c]|; the same conv
    with plain sign weights computes z / a_c. The BatchNorm right after it keeps its
    moving statistics of z, so in inference mode it would see inputs 1/a_c (30-80x on
    Fashion-MNIST) too large. Rescaling moving_mean by 1/a_c and moving_variance by
    1/a_c**2 makes the loaded network compute what the source did (up to BatchNorm's
    epsilon), so the BatchNorm retrain starts from the binary model, as the paper's does.
    """
    for bn in model.layers:
        if not isinstance(bn, tf.keras.layers.BatchNormalization):
            continue
        producer = bn.input._keras_history.layer
        if isinstance(producer, Subsample2D):  # "symmetric" padding's stride-2 convs
            producer = producer.input._keras_history.layer
        source = source_layers.get(producer.name)
        if not (isinstance(producer, lq.layers.QuantConv2D) and source is not None
                and isinstance(getattr(source, "kernel_quantizer", None), MagnitudeAwareSign)
                and not isinstance(producer.kernel_quantizer, MagnitudeAwareSign)):
            continue
        kernel = producer.kernel.numpy()
        scale = np.abs(kernel).mean(axis=tuple(range(kernel.ndim - 1)))
        bn.moving_mean.assign(bn.moving_mean.numpy() / scale)
        bn.moving_variance.assign(bn.moving_variance.numpy() / scale**2)


def _delete_run(path):
    """Delete the run in `path` but not its worker-<i>/ folders: in a multi-worker run the
    other workers write there, and may already be; each worker clears its own."""
    for entry in os.scandir(path):
        if entry.name.startswith("worker-") and entry.is_dir(follow_symlinks=False):
            continue
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path)
        else:
            os.unlink(entry.path)


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
        on_corrupt="skip",
        data_settings=None,
        callbacks=(),
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
        self.on_corrupt = on_corrupt
        self.data_settings = data_settings or {}
        self.callbacks = list(callbacks)  # extra Keras callbacks for every stage's fit
        self.validate = validate
        self.verbose = verbose
        if start_stage is not None:
            recipe.stage(start_stage)  # validates the name
        if mixed_precision not in (None, *PRECISION_CHOICES):
            raise ValueError(f"mixed_precision must be one of {PRECISION_CHOICES} or None.")
        self.mixed_precision, self.precision_reason = resolve_mixed_precision(
            mixed_precision, strategy, input_size(recipe))
        if self.steps_per_execution < 1:
            raise ValueError(f"steps_per_execution must be >= 1, got {steps_per_execution}.")
        if recipe.teacher not in (None, TWIN) and not os.path.exists(recipe.teacher):
            raise TrainingError(f"--teacher {recipe.teacher} does not exist. Give a Keras "
                                "classifier file of the same classes, or --teacher twin.")
        self._teachers = {}  # path -> the loaded teacher, built in this run's strategy scope

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
                        "--overwrite to delete that run (the workers' worker-<i>/ folders in "
                        "it are kept: each worker clears its own)."
                    )
                _delete_run(self.write_dir)
            elif self.overwrite:
                _delete_run(self.write_dir)
        # The other workers of a multi-worker run write to worker-<i>/ inside the chief's
        # directory and may create it before the chief gets here: not a foreign entry.
        elif os.path.isdir(self.write_dir) and not self.overwrite and any(
                not name.startswith("worker-") for name in os.listdir(self.write_dir)):
            raise RunDirError(
                f"{self.write_dir} is not empty and holds no bireal_tf run. Choose another "
                "--output-dir, or pass --overwrite to use it anyway."
            )
        os.makedirs(self.write_dir, exist_ok=True)
        atomic_write_text(marker, json.dumps({"recipe": self.recipe.name,
                                         "config": self.recipe.to_dict()}, indent=2))

    def _dataset(self, split, augmentation, seed, limit, batch_size, **by_epoch):
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
            on_corrupt=self.on_corrupt,
            **by_epoch,
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
            block=self.recipe.block,
            binary_weights=stage.binary_weights,
        )
        if stage.weight_decay and stage.weight_decay_mode == "conv_l2":
            model.add_loss(conv_l2_loss(model, stage.weight_decay))
        if stage.train_only_batchnorm:
            for layer in model.layers:
                if not isinstance(layer, tf.keras.layers.BatchNormalization):
                    layer.trainable = False
        return model

    def _load_initial_weights(self, model, path):
        """Weights of a saved model or weights file, matched by layer name."""
        if path == "larq_zoo":  # larq-zoo's ImageNet Bi-Real-18, fetched through larq-zoo
            return self._say(models.load_larq_zoo_weights(model))
        if not os.path.exists(path):
            raise TrainingError(f"--init-weights {path} does not exist.")
        if path.endswith(".keras") or os.path.isdir(path):
            from bireal_tf.export.files import load_keras_model  # safe mode in every format

            source = load_keras_model(path)
            by_name = {layer.name: layer for layer in source.layers}
            copied = 0
            for layer in model.layers:
                if layer.weights and layer.name in by_name:
                    layer.set_weights(by_name[layer.name].get_weights())
                    copied += 1
            if copied == 0:
                raise TrainingError(f"{path} shares no layer names with the {model.name} model.")
            _absorb_weight_scale(model, by_name)
        else:
            with custom_objects():
                model.load_weights(path, by_name=path.endswith(".h5"))

    # -- running --

    def run(self):
        # The policy is process-global: set it for this run only, so models built after
        # `train_recipe(...)` in the same notebook are float32 again.
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
        # A file teacher, or the model of the stage that teaches (the twin), once trained.
        self.teacher_path = recipe.teacher if recipe.teacher != TWIN else None
        for index, stage in enumerate(recipe.stages[:start]):  # skipped by --stage
            if stage.teaches and os.path.exists(self._final_path(index, stage)):
                self.teacher_path = self._final_path(index, stage)
        train_images, train_seconds = 0, 0.0
        model, eval_spec = None, None
        for index in range(start, len(recipe.stages)):
            stage = recipe.stages[index]
            final_path = self._final_path(index, stage)
            if os.path.exists(final_path):
                self._say(f"Stage {stage.name}: done earlier, {final_path}")
            else:
                teacher = self.teacher_path if recipe.distills(stage) else None
                if recipe.distills(stage) and teacher is None:
                    raise TrainingError(
                        f"Stage {stage.name} distills from the twin, which is not trained in "
                        f"{self.write_dir}: start from stage {recipe.stages[0].name}, or give a "
                        "trained teacher with --teacher PATH.")
                model, eval_spec, images, seconds = self._run_stage(
                    index, stage, os.path.dirname(final_path), previous_model_path, teacher)
                train_images += images
                train_seconds += seconds
                save_model_atomic(model, final_path)
            if stage.teaches:
                self.teacher_path = final_path
            if stage.initializes_next:
                previous_model_path = final_path

        return self._finish(previous_model_path, model, eval_spec, time.time() - t0,
                            train_images, train_seconds)

    def _final_path(self, index, stage):
        return os.path.join(self.write_dir, "stages", f"{index}_{stage.name}", "model.keras")

    def _teacher(self, path, spec):
        """The teacher in `path` for data like `spec`'s (loaded once per run)."""
        if path not in self._teachers:
            with self.strategy.scope():
                self._teachers[path] = load_teacher(
                    path, num_classes=spec.num_classes, image_size=spec.image_size,
                    mean=spec.mean, std=spec.std, teacher_input=self.recipe.teacher_input)
        return self._teachers[path]

    def _stage_seed(self, index):
        return self.recipe.seed * 1_000_003 + index * 10_007

    def batchnorm_images(self, index, stage):
        """(image batches, count) on which stage `index` re-estimates BatchNorm: the first
        batches of its first epoch, augmented as training sees them; the same ones every
        epoch and after a resume."""
        batch = self.recipe.batch_size
        spec = self._dataset("train", stage.augmentation, self._stage_seed(index),
                             self.limit_train, batch, start_epoch=0,
                             steps_per_epoch=reestimation_steps(batch))
        return spec.dataset, min(reestimation_steps(batch), spec.steps_per_epoch)

    def _run_stage(self, index, stage, stage_dir, init_path, teacher_path=None):
        recipe = self.recipe
        os.makedirs(stage_dir, exist_ok=True)
        batch = recipe.batch_size
        ckpt_dir = os.path.join(stage_dir, "checkpoints")
        resume_path, first = self._readable_checkpoint(ckpt_dir, stage)

        # Built once per stage: epoch e's order and augmentation depend on (seed, stage, e)
        # only, so a resumed run sees the batches of an uninterrupted one.
        spec = self._dataset("train", stage.augmentation, self._stage_seed(index),
                             self.limit_train, batch, start_epoch=first,
                             steps_per_epoch=recipe.steps_per_epoch)
        steps = recipe.steps_per_epoch or spec.steps_per_epoch
        eval_spec = self._dataset("test", "none", None, self.limit_eval, batch)

        with self.strategy.scope():
            model = self.build_model(stage, spec.num_classes, spec.image_size)
            if init_path:
                self._load_initial_weights(model, init_path)
            optimizer = make_optimizer(recipe, stage, steps)
            optimizer.build(model.trainable_variables)  # slots exist, so a restore is complete
            trained, smoothing = model, stage.label_smoothing
            if teacher_path:
                trained = Distiller(model, self._teacher(teacher_path, spec),
                                    recipe.distill_weight, stage.label_smoothing)
                smoothing = 0.0  # the Distiller smooths the label term only
            compile_for_stage(trained, optimizer, smoothing, self.steps_per_execution)
        # The epoch counter lives outside the strategy scope: a plain variable on the host.
        checkpoint = tf.train.Checkpoint(model=model, optimizer=optimizer,
                                         epoch=tf.Variable(0, dtype=tf.int64, trainable=False))
        manager = tf.train.CheckpointManager(checkpoint, ckpt_dir, max_to_keep=2)
        if resume_path:
            checkpoint.restore(resume_path).assert_existing_objects_matched()
            self._say(f"Stage {stage.name}: resuming after epoch {first} from {resume_path}")
        else:
            self._say(f"Stage {stage.name}: {stage.epochs} epochs of {steps} steps, batch {batch}, "
                      f"{stage.optimizer} lr {recipe.scaled_lr(stage):g} ({stage.schedule})"
                      + (f", distilling from {teacher_path} (weight {recipe.distill_weight:g})"
                         if teacher_path else ""))

        if first >= stage.epochs:  # stopped after the last checkpoint, before model.keras
            return model, eval_spec, 0, 0.0
        train = self._one_hot(spec)
        val = self._one_hot(eval_spec).take(eval_spec.steps_per_epoch) if self.validate else None
        totals = {"images": 0, "seconds": 0.0}

        def epoch_done(epoch, logs, seconds, train_seconds):
            if not math.isfinite(logs.get("loss", float("nan"))):
                return  # TerminateOnNaN has stopped the run; nothing of this epoch is saved
            totals["images"] += steps * batch
            totals["seconds"] += train_seconds
            # The metrics row first, then the checkpoint: a kill between the two re-runs
            # the epoch, whose row is then replaced; the other order would lose the row.
            lr = float(tf.keras.backend.get_value(optimizer.learning_rate))
            self._add_row(stage.name, epoch + 1, logs, lr, seconds, steps * batch / train_seconds)
            checkpoint.epoch.assign(epoch + 1)
            manager.save(checkpoint_number=epoch + 1)

        reestimate = []
        if stage.reestimate_batchnorm:
            reestimate = [ReestimateBatchNorm(model, *self.batchnorm_images(index, stage),
                                              self.strategy)]
        callbacks = [
            tf.keras.callbacks.TerminateOnNaN(),  # stops at the first non-finite loss
            *reestimate,  # before validation and before _EpochEnd saves the checkpoint
            _EpochEnd(epoch_done),
            tf.keras.callbacks.TensorBoard(os.path.join(self.write_dir, "logs", stage.name),
                                           profile_batch=0),
            *self.callbacks,
        ]
        history = trained.fit(train, initial_epoch=first, epochs=stage.epochs, steps_per_epoch=steps,
                            validation_data=val, callbacks=callbacks, verbose=self.verbose,
                            validation_steps=eval_spec.steps_per_epoch if val else None)
        if history.epoch and not math.isfinite(history.history["loss"][-1]):
            kept = manager.latest_checkpoint or "none (it failed in the first epoch)"
            raise TrainingError(
                f"Loss became NaN/inf in stage {stage.name}, epoch {history.epoch[-1] + 1}. "
                "Stopped; nothing of this epoch was saved. Last good "
                f"checkpoint: {kept}. Lower --lr or check the data, then rerun the same "
                "command to resume from it."
            )
        return model, eval_spec, totals["images"], totals["seconds"]

    def _readable_checkpoint(self, ckpt_dir, stage):
        """(path, epoch) of the stage's newest readable checkpoint; (None, 0) if none.

        A checkpoint that cannot be read (truncated or corrupt files) is skipped with a
        warning naming it, and the one before it is used.
        """
        state = tf.train.get_checkpoint_state(ckpt_dir)
        paths = list(state.all_model_checkpoint_paths) if state else []
        for path in reversed(paths):
            try:
                reader = tf.train.load_checkpoint(path)
                for name in reader.get_variable_to_shape_map():
                    reader.get_tensor(name)  # reads every value: a damaged file fails here
                return path, int(reader.get_tensor("epoch/.ATTRIBUTES/VARIABLE_VALUE"))
            except (tf.errors.OpError, ValueError, IndexError, RuntimeError) as err:  # damaged files
                line = (str(err).strip().splitlines() or [""])[0][:200]
                print(f"Warning: checkpoint {path} of stage {stage.name} cannot be read "
                      f"({type(err).__name__}: {line}); using the one before it.",
                      file=sys.stderr, flush=True)
        if paths:
            print(f"Warning: no checkpoint of stage {stage.name} could be read; the stage starts "
                  "over.", file=sys.stderr, flush=True)
        return None, 0

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
        atomic_write_text(os.path.join(self.write_dir, "metrics.csv"), out.getvalue())

    def _finish(self, final_path, model, eval_spec, wall, train_images, train_seconds):
        recipe = self.recipe
        if model is None:  # every stage was done before: load the last one to evaluate
            with custom_objects():
                model = tf.keras.models.load_model(final_path, compile=False)
        if eval_spec is None:
            eval_spec = self._dataset("test", "none", None, self.limit_eval, recipe.batch_size)
        with self.strategy.scope():
            compile_for_stage(model, steps_per_execution=1)
        results = model.evaluate(self._one_hot(eval_spec), verbose=0, return_dict=True)
        final_model = os.path.join(self.write_dir, "model.keras")
        save_model_atomic(model, final_model)
        teacher = {}
        if recipe.teacher is not None and self.teacher_path:
            teacher_model = self._teacher(self.teacher_path, eval_spec)
            with self.strategy.scope():
                compile_for_stage(teacher_model, steps_per_execution=1)
            scores = teacher_model.evaluate(self._one_hot(eval_spec), verbose=0, return_dict=True)
            teacher = {"teacher": recipe.teacher, "teacher_model": self.teacher_path,
                       "teacher_top1": float(scores["top1"]), "teacher_top5": float(scores["top5"]),
                       "distill_weight": recipe.distill_weight,
                       "teacher_input": recipe.teacher_input}
        summary = {
            "recipe": recipe.name,
            "config": recipe.to_dict(),
            "learning_rates": {s.name: recipe.scaled_lr(s) for s in recipe.stages},
            "data_settings": self.data_settings,
            "dataset": {"name": recipe.dataset, "data_dir": self.data_dir,
                        "test_examples": eval_spec.num_examples,
                        "image_size": eval_spec.image_size},
            "top1": float(results["top1"]),
            "top5": float(results["top5"]),
            "test_loss": float(results["loss"]),
            **teacher,
            "wall_time_seconds": round(wall, 2),
            "train_images_per_second": (round(train_images / train_seconds, 1)
                                        if train_seconds else None),
            "strategy": self.strategy_name,
            "replicas": self.strategy.num_replicas_in_sync,
            "mixed_precision": self.mixed_precision,
            "precision": f"mixed_{self.mixed_precision}" if self.mixed_precision else "float32",
            "precision_reason": self.precision_reason,
            "steps_per_execution": self.steps_per_execution,
            "deterministic": self.deterministic,
            "model": final_model,
            "versions": library_versions(),
            "command": " ".join(sys.argv),
        }
        self._say(f"Test top-1 {summary['top1']:.4f}  top-5 {summary['top5']:.4f}  "
                  f"({eval_spec.num_examples} images)"
                  + (f"; teacher top-1 {teacher['teacher_top1']:.4f}" if teacher else ""))
        from bireal_tf.recipes.reports import plot_curves

        if self.rows:
            plot_curves(self.rows, os.path.join(self.write_dir, "curves.png"))
        atomic_write_text(os.path.join(self.write_dir, "summary.json"), json.dumps(summary, indent=2))
        return summary

    def _say(self, message):
        if self.verbose:
            print(message, flush=True)


def input_size(recipe) -> int:
    """The image size `recipe` trains at: its own, else its dataset's default."""
    from bireal_tf.data.pipeline import profile_for

    return int(recipe.image_size or profile_for(recipe.dataset).default_size)


def resolve_mixed_precision(requested, strategy="default", image_size=None):
    """(the mixed precision to train in: None (float32), "bfloat16" or "float16", why).

    "auto" picks bfloat16 where it was measured to pay: on a CPU with AVX512_BF16 or AMX,
    for inputs larger than SMALL_IMAGE_MAX_SIZE (1.70x at 128 px, 2.04x at 224:
    BENCHMARKS.md, training). Test top-1 is within the float32 seeds' spread
    (BENCHMARKS.md, "bfloat16 or float32"). Float32 elsewhere: for small images, where
    bfloat16 trained no faster (0.96x at 32 px, same study); on GPUs and TPUs, where it
    was not measured; on CPUs without bfloat16 instructions, where it would be slower.
    """
    if requested in (None, "float32"):
        return None, "float32 asked for" if requested else "float32 (the Python API's default)"
    if requested != "auto":
        return requested, f"{requested} asked for"
    if strategy == "tpu" or tf.config.list_physical_devices("GPU"):
        return None, "auto: float32 on an accelerator (bfloat16 is measured here on CPUs only)"
    flags = bf16_cpu_flags()
    if not flags:
        return None, "auto: this CPU has no AVX512_BF16 or AMX"
    if image_size is not None and image_size <= SMALL_IMAGE_MAX_SIZE:
        return None, f"auto: float32 for {image_size} px inputs, where bfloat16 trains no faster"
    return "bfloat16", f"auto: this CPU has {' and '.join(flags)}"


def train_recipe(recipe, output_dir, **kwargs):
    """Run `recipe` into `output_dir`; returns the summary dict. See `Trainer`.

    (Named so that no module shadows it: `bireal_tf.recipes.train` is the CLI module.)
    """
    return Trainer(recipe, output_dir, **kwargs).run()
