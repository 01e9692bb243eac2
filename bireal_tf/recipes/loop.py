"""The training loop every recipe shares: Keras `fit`, stage by stage, resumable.

    summary = train_recipe(get_recipe("r18_adam"), "runs/r18_adam", data_dir=...)

A run is made of parts, each in its own module:

    options.py       TrainOptions: data, devices, precision, logging (frozen)
    environment.py   TrainingEnvironment: precision policy, seed, determinism, strategy
    rundir.py        RunDirectory: whose run the directory is, where each output lives
    run_data.py      RunData: each stage's epochs, the test split, the BatchNorm images
    checkpoints.py   StageCheckpoints: per-epoch checkpoints, the fallback past damage
    metrics_log.py   MetricsLog: metrics.csv, one row per epoch, none twice
    distill.py       TeacherChain: which teacher a stage learns from
    summary.py       final_report: evaluation, model.keras, summary.json, curves.png
    models/surgery   weight transfer between a network's variants

Resuming: a stage with a `model.keras` is done and skipped; a stage with
checkpoints continues after its last completed epoch, with the optimizer state
and step counter restored. Each epoch's data order and augmentation are drawn
from (seed, stage, epoch), so a resumed run sees the same batches as an
uninterrupted one.

Distillation: a stage that distills trains through a `Distiller` around its model;
the checkpoints hold the student and its optimizer only, as without a teacher.
"""
import contextlib
import math
import os
import time

import tensorflow as tf

from bireal_tf import models
from bireal_tf.quantizers import custom_objects
from bireal_tf.recipes.batchnorm import ReestimateBatchNorm
from bireal_tf.recipes.checkpoints import StageCheckpoints, resume_point
from bireal_tf.recipes.distill import Distiller, TeacherChain
from bireal_tf.recipes.environment import (TrainingEnvironment, make_strategy,
                                           resolve_mixed_precision, worker_info)
from bireal_tf.recipes.errors import RunDirError, TrainingError
from bireal_tf.recipes.metrics_log import COLUMNS as METRIC_COLUMNS
from bireal_tf.recipes.metrics_log import MetricsLog
from bireal_tf.recipes.preemption import PreemptionWatch
from bireal_tf.recipes.options import (MIXED_PRECISION, PRECISION_CHOICES, STEPS_PER_EXECUTION,
                                       STRATEGIES, TrainOptions)
from bireal_tf.recipes.recipe import TWIN, conv_l2_loss, make_optimizer
from bireal_tf.recipes.run_data import RunData, input_size, one_hot
from bireal_tf.recipes.rundir import RunDirectory
from bireal_tf.recipes.summary import final_report
from bireal_tf.utils import save_model_atomic


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


def build_stage_model(recipe, stage, num_classes, image_size):
    """The network `stage` trains: the recipe's depth, block and padding in the stage's
    variant (activation, weight quantizer), its conv-kernel L2, its frozen layers."""
    quantizer = None if stage.kernel_quantizer == "magnitude_aware" else "ste_sign"
    model = models.bireal_net(
        recipe.depth,
        input_shape=(image_size, image_size, 3),
        num_classes=num_classes,
        activation=stage.activation,
        padding=recipe.padding,
        pad_values=recipe.pad_values,
        kernel_quantizer=quantizer,
        block=recipe.block,
        binary_weights=stage.binary_weights,
    )
    if stage.weight_decay and stage.weight_decay_mode == "conv_l2":
        model.add_loss(conv_l2_loss(model, stage.weight_decay))
    if stage.train_only_batchnorm:
        for layer in model.layers:
            if not isinstance(layer, tf.keras.layers.BatchNormalization):
                layer.trainable = False
    return model


class EpochEnd(tf.keras.callbacks.Callback):
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


class Trainer:
    """Runs a recipe's stages into an output directory; see the module docstring.

    recipe:     what to train (`bireal_tf.recipes.Recipe`);
    output_dir: where (rerunning into the same directory resumes);
    options:    how (`TrainOptions`: data, devices, precision, logging);
    callbacks:  extra Keras callbacks for every stage's `fit`.
    """

    def __init__(self, recipe, output_dir, options=None, callbacks=()):
        self.recipe = recipe
        self.output_dir = os.path.abspath(output_dir)
        self.options = options or TrainOptions()
        self.callbacks = tuple(callbacks)
        if self.options.start_stage is not None:
            recipe.stage(self.options.start_stage)  # validates the name
        if recipe.teacher not in (None, TWIN) and not os.path.exists(recipe.teacher):
            raise TrainingError(f"--teacher {recipe.teacher} does not exist. Give a Keras "
                                "classifier file of the same classes, or --teacher twin.")

    @staticmethod
    def _say(message):
        """A line about the run's state: printed in quiet runs too (quiet means no progress
        bars, not silence about what the run does)."""
        print(message, flush=True)

    def build_model(self, stage, num_classes, image_size):
        return build_stage_model(self.recipe, stage, num_classes, image_size)

    def load_initial_weights(self, model, path):
        """Weights of a saved model or weights file, matched by layer name."""
        if path == "larq_zoo":  # larq-zoo's ImageNet Bi-Real-18, fetched through larq-zoo
            return self._say(models.load_larq_zoo_weights(model))
        if not os.path.exists(path):
            raise TrainingError(f"--init-weights {path} does not exist.")
        if path.endswith(".keras") or os.path.isdir(path):
            from bireal_tf.export.files import load_keras_model  # safe mode in every format

            if models.copy_weights_by_name(model, load_keras_model(path)) == 0:
                raise TrainingError(f"{path} shares no layer names with the {model.name} model.")
        else:
            with custom_objects():
                model.load_weights(path, by_name=path.endswith(".h5"))

    # -- running --

    def run(self):
        """Train every stage not done yet, then evaluate and report; returns the summary."""
        recipe, options = self.recipe, self.options
        with contextlib.ExitStack() as stack:
            env = stack.enter_context(TrainingEnvironment(options, input_size(recipe), recipe.seed))
            run_dir = RunDirectory.for_worker(self.output_dir, env.is_chief, env.task_id)
            run_dir.claim(recipe, options.overwrite)
            data = RunData(recipe, options)
            teachers = TeacherChain(recipe, run_dir, env.strategy)
            log = MetricsLog(run_dir.file("metrics.csv"))
            # Multi-worker: the handler agrees on the step to stop at with the other workers.
            resolver = env.strategy.cluster_resolver if options.strategy == "multi_worker" else None
            preemption = stack.enter_context(PreemptionWatch(
                os.path.join(run_dir.path, "preemption"), resolver))
            test = None  # built once, when first needed: validation, then the report
            start = recipe.stage_names().index(options.start_stage) if options.start_stage else 0
            t0 = time.time()
            init_path = options.init_weights
            images, seconds = 0, 0.0
            model = None
            for index in range(start, len(recipe.stages)):
                stage = recipe.stages[index]
                final_path = run_dir.stage_model(index, stage)
                if os.path.exists(final_path):
                    self._say(f"Stage {stage.name}: done earlier, {final_path}")
                else:
                    teacher = teachers.for_stage(index)
                    if test is None:
                        test = data.test()
                    model, stage_images, stage_seconds = self.train_stage(
                        index, stage, init_path, teacher, env=env, run_dir=run_dir, data=data,
                        test=test, teachers=teachers, log=log, preemption=preemption)
                    images, seconds = images + stage_images, seconds + stage_seconds
                    save_model_atomic(model, final_path)
                if stage.initializes_next:
                    init_path = final_path
            if model is None:  # every stage was done before: the last one is evaluated
                with custom_objects():
                    model = tf.keras.models.load_model(init_path, compile=False)
            if test is None:
                test = data.test()
            return self._report(model, env, run_dir, test, teachers, (images, seconds),
                                time.time() - t0)

    def train_stage(self, index, stage, init_path, teacher_path, *, env, run_dir, data, test,
                    teachers, log, preemption):
        """Train stage `index` from its last readable checkpoint (or from `init_path`'s
        weights); returns (model, training images, seconds in training steps)."""
        recipe, options = self.recipe, self.options
        batch = recipe.batch_size
        os.makedirs(run_dir.stage_dir(index, stage), exist_ok=True)
        resume_path, first, first_step = resume_point(run_dir.checkpoints(index, stage), stage.name)
        # Built once per stage: epoch e's order and augmentation depend on (seed, stage, e)
        # only, so a resumed run sees the batches of an uninterrupted one.
        spec = data.train(index, stage, start_epoch=first, start_step=first_step)
        steps = recipe.steps_per_epoch or spec.steps_per_epoch
        with env.strategy.scope():
            model = build_stage_model(recipe, stage, spec.num_classes, spec.image_size)
            if init_path:
                self.load_initial_weights(model, init_path)
            optimizer = make_optimizer(recipe, stage, steps)
            optimizer.build(model.trainable_variables)  # slots exist, so a restore is complete
            trained, smoothing = model, stage.label_smoothing
            if teacher_path:
                trained = Distiller(model, teachers.model(teacher_path, spec),
                                    recipe.distill_weight, stage.label_smoothing)
                smoothing = 0.0  # the Distiller smooths the label term only
            compile_for_stage(trained, optimizer, smoothing, options.steps_per_execution)
        checkpoints = StageCheckpoints(model, optimizer, run_dir.checkpoints(index, stage))
        if resume_path:
            checkpoints.restore(resume_path)
            where = f"step {first_step} of epoch {first + 1}" if first_step else f"epoch {first}"
            self._say(f"Stage {stage.name}: resuming after {where} from {resume_path}")
        else:
            self._say(f"Stage {stage.name}: {stage.epochs} epochs of {steps} steps, batch {batch}, "
                      f"{stage.optimizer} lr {recipe.scaled_lr(stage):g} ({stage.schedule})"
                      + (f", distilling from {teacher_path} (weight {recipe.distill_weight:g})"
                         if teacher_path else ""))
        if first >= stage.epochs:  # stopped after the last checkpoint, before model.keras
            return model, 0, 0.0

        val = one_hot(test).take(test.steps_per_epoch) if options.validate else None
        totals = {"images": 0, "seconds": 0.0}
        reestimate = []
        if stage.reestimate_batchnorm:
            reestimate = [ReestimateBatchNorm(model, *data.batchnorm_images(index, stage),
                                              env.strategy)]

        def fit(first_epoch, last_epoch, skipped, spec):
            """Epochs first_epoch..last_epoch - 1, the first from its step `skipped` on."""
            taken = steps - skipped  # steps of the first epoch this fit takes

            def epoch_done(epoch, logs, seconds, train_seconds):
                if not math.isfinite(logs.get("loss", float("nan"))):
                    return  # TerminateOnNaN has stopped the run; nothing of this epoch is saved
                totals["images"] += taken * batch
                totals["seconds"] += train_seconds
                # The metrics row first, then the checkpoint: a kill between the two re-runs
                # the epoch, whose row is then replaced; the other order would lose the row.
                lr = float(tf.keras.backend.get_value(optimizer.learning_rate))
                log.add(stage.name, epoch + 1, logs, lr, seconds, taken * batch / train_seconds)
                checkpoints.save(epoch + 1)

            callbacks = [
                tf.keras.callbacks.TerminateOnNaN(),  # stops at the first non-finite loss
                preemption.watch(checkpoints.save_mid_epoch, steps, skipped,
                                 options.checkpoint_every),
                *reestimate,  # before validation and before EpochEnd saves the checkpoint
                EpochEnd(epoch_done),
                tf.keras.callbacks.TensorBoard(run_dir.logs(stage), profile_batch=0),
                *self.callbacks,
            ]
            history = trained.fit(one_hot(spec), initial_epoch=first_epoch, epochs=last_epoch,
                                  steps_per_epoch=taken, validation_data=val, callbacks=callbacks,
                                  verbose=options.verbose,
                                  validation_steps=test.steps_per_epoch if val else None)
            if history.epoch and not math.isfinite(history.history["loss"][-1]):
                kept = checkpoints.latest or "none (it failed in the first epoch)"
                raise TrainingError(
                    f"Loss became NaN/inf in stage {stage.name}, epoch {history.epoch[-1] + 1}. "
                    "Stopped; nothing of this epoch was saved. Last good "
                    f"checkpoint: {kept}. Lower --lr or check the data, then rerun the same "
                    "command to resume from it."
                )

        # Keras runs the same number of steps every epoch: a run resumed inside an epoch
        # finishes that epoch in a fit of its own, then goes on as usual.
        if not first_step:
            fit(first, stage.epochs, 0, spec)
        else:
            fit(first, first + 1, first_step, spec)
            if first + 1 < stage.epochs:
                fit(first + 1, stage.epochs, 0, data.train(index, stage, start_epoch=first + 1))
        return model, totals["images"], totals["seconds"]

    def _report(self, model, env, run_dir, test, teachers, throughput, wall):
        with env.strategy.scope():
            compile_for_stage(model, steps_per_execution=1)
        teacher = None
        teacher_path = teachers.path_before(len(self.recipe.stages))
        if teacher_path is not None:
            teacher_model = teachers.model(teacher_path, test)
            with env.strategy.scope():
                compile_for_stage(teacher_model, steps_per_execution=1)
            teacher = (teacher_path, teacher_model)
        return final_report(model, (test, one_hot(test)), recipe=self.recipe,
                            options=self.options, env=env, run_dir=run_dir,
                            throughput=throughput, wall=wall, teacher=teacher)


def train_recipe(recipe, output_dir, *, callbacks=(), **options):
    """Run `recipe` into `output_dir`; returns the summary dict.

    `options` are `TrainOptions`' fields (data_dir=, limit_train=, strategy=, ...);
    `callbacks`, extra Keras callbacks for every stage's `fit`. (Named so that no module
    shadows it: `bireal_tf.recipes.train` is the command-line module.)
    """
    return Trainer(recipe, output_dir, TrainOptions(**options), callbacks).run()


__all__ = [
    "METRIC_COLUMNS", "MIXED_PRECISION", "PRECISION_CHOICES", "STEPS_PER_EXECUTION", "STRATEGIES",
    "RunDirError", "Trainer", "TrainOptions", "TrainingError", "build_stage_model",
    "compile_for_stage", "input_size", "make_strategy", "resolve_mixed_precision",
    "train_recipe", "worker_info",
]
