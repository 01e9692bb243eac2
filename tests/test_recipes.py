"""Recipes carry the authors' numbers; the shared loop runs every stage of them."""
import csv
import json
import os

import larq as lq
import numpy as np
import pytest
import tensorflow as tf

from bireal_tf.models import binary_conv_layers
from bireal_tf.recipes import Trainer, TrainingError, TrainOptions, RunDirError, get_recipe
from bireal_tf.recipes import train_recipe
from bireal_tf.recipes.recipe import learning_rate_schedule, make_optimizer

TINY = dict(dataset="fashion_mnist_embedded", batch_size=16, image_size=32, steps_per_epoch=2)


def lr_at(optimizer, step):
    schedule = optimizer._learning_rate  # the schedule the optimizer holds, or a constant
    return float(schedule(step) if callable(schedule) else schedule)


# --- recipe numbers ------------------------------------------------------------------


@pytest.mark.parametrize("name, lr, batch", [("r18_adam", 1e-3, 512), ("r34_adam", 1e-3, 512),
                                             ("r50_adam", 5e-4, 256)])
def test_adam_recipes_match_the_authors_pytorch(name, lr, batch):
    recipe = get_recipe(name)
    assert recipe.batch_size == batch and len(recipe.stages) == 1
    stage = recipe.stages[0]
    assert (stage.optimizer, stage.epochs, stage.schedule) == ("adam", 256, "linear")
    assert stage.label_smoothing == 0.1 and stage.weight_decay == 0.0
    assert stage.augmentation == "adam" and stage.activation == "binary"

    steps = 100
    opt = make_optimizer(recipe, stage, steps)
    assert isinstance(opt, tf.keras.optimizers.Adam)
    total = 256 * steps
    assert lr_at(opt, 0) == pytest.approx(lr)
    assert lr_at(opt, total // 2) == pytest.approx(lr / 2)
    assert lr_at(opt, total // 4) == pytest.approx(0.75 * lr)
    assert lr_at(opt, total) == pytest.approx(0.0, abs=1e-12)
    assert opt.weight_decay is None


def test_learning_rate_scales_linearly_with_batch_size():
    recipe = get_recipe("r18_adam").with_overrides(batch_size=128)
    assert recipe.scaled_lr(recipe.stages[0]) == pytest.approx(1e-3 * 128 / 512)
    opt = make_optimizer(recipe, recipe.stages[0], 10)
    assert lr_at(opt, 0) == pytest.approx(2.5e-4)


@pytest.mark.parametrize("name, epochs, lr, milestones, batch",
                         [("r18_paper", 20, 0.01, (10, 15), 128),
                          ("r34_paper", 40, 0.08, (20, 30), 1024)])
def test_paper_recipes_match_the_paper(name, epochs, lr, milestones, batch):
    recipe = get_recipe(name)
    assert [s.name for s in recipe.stages] == ["relu", "leaky_clip", "clip", "binary", "bn_retrain"]
    assert [s.activation for s in recipe.stages] == ["relu", "leaky_clip", "clip", "binary", "binary"]
    assert recipe.batch_size == batch

    binary = recipe.stage("binary")
    assert (binary.optimizer, binary.momentum, binary.weight_decay) == ("sgd", 0.9, 0.0)
    assert binary.epochs == epochs and binary.milestones == milestones
    assert binary.kernel_quantizer == "magnitude_aware"
    steps = 50
    opt = make_optimizer(recipe, binary, steps)
    assert isinstance(opt, tf.keras.optimizers.SGD) and opt.momentum == 0.9
    first, second = milestones
    assert lr_at(opt, 0) == pytest.approx(lr)
    assert lr_at(opt, first * steps - 1) == pytest.approx(lr)
    assert lr_at(opt, first * steps) == pytest.approx(lr * 0.1)
    assert lr_at(opt, second * steps - 1) == pytest.approx(lr * 0.1)
    assert lr_at(opt, second * steps) == pytest.approx(lr * 0.01)
    assert lr_at(opt, epochs * steps - 1) == pytest.approx(lr * 0.01)

    retrain = recipe.stage("bn_retrain")
    assert retrain.epochs == 1 and retrain.train_only_batchnorm
    assert retrain.kernel_quantizer == "sign"
    relu = recipe.stage("relu")
    assert relu.optimizer == "sgd" and relu.weight_decay == 1e-4 and relu.milestones == (30, 60)
    assert make_optimizer(recipe, relu, steps).weight_decay == pytest.approx(1e-4)


def test_bn_retrain_stage_freezes_convs_and_uses_plus_minus_one_weights():
    recipe = get_recipe("r18_paper").with_overrides(**TINY)
    trainer = Trainer(recipe, "unused")
    model = trainer.build_model(recipe.stage("bn_retrain"), num_classes=10, image_size=32)
    trainable = {w.name.split("/")[0] for w in model.trainable_weights}
    assert trainable and all("bn" in n or "downsample_2" in n for n in trainable)
    convs = binary_conv_layers(model)
    assert len(convs) == 16
    for conv in convs:
        assert not conv.trainable
        with lq.context.quantized_scope(True):
            kernel = conv.kernel.numpy()
        np.testing.assert_array_equal(np.abs(kernel), 1.0)


@pytest.mark.slow  # a BatchNorm-retrain run: ~11 s
def test_bn_retrain_starts_from_the_binary_model_it_loads(tmp_path):
    """Loading a magnitude-aware binary model into the +-1 (no scale) retrain model keeps
    its function: BatchNorm's moving statistics are rescaled by 1/mean|W| (and 1/mean|W|^2),
    so inference-mode outputs agree. Without that the retrain began at chance (11.4% vs
    59.3% on the embedded Fashion-MNIST test images, measured)."""
    recipe = get_recipe("r18_paper").with_overrides(dataset="fashion_mnist_embedded")
    trainer = Trainer(recipe, str(tmp_path / "unused"))
    tf.keras.utils.set_random_seed(0)
    binary = trainer.build_model(recipe.stage("binary"), 10, 32)
    rng = np.random.default_rng(0)
    for layer in binary.layers:  # moving statistics that are not the initial 0 and 1
        if isinstance(layer, tf.keras.layers.BatchNormalization):
            n = layer.moving_mean.shape[0]
            layer.moving_mean.assign(rng.normal(0, 0.1, n).astype("float32"))
            layer.moving_variance.assign(rng.uniform(0.5, 2.0, n).astype("float32"))
    path = str(tmp_path / "binary.keras")
    binary.save(path)
    retrain = trainer.build_model(recipe.stage("bn_retrain"), 10, 32)
    trainer.load_initial_weights(retrain, path)
    x = rng.uniform(0, 1, (8, 32, 32, 3)).astype("float32")
    logits = [tf.keras.Model(m.input, m.get_layer("fc").output)(x, training=False).numpy()
              for m in (binary, retrain)]
    np.testing.assert_allclose(logits[1], logits[0], rtol=1e-3, atol=1e-3 * np.abs(logits[0]).max())


def test_bn_retrain_takes_the_augmentation_override_but_keeps_its_lr_and_epoch():
    """The retrain re-estimates BatchNorm on training images: they must be augmented as
    the other stages' were ('paper' there after 'none' elsewhere raised the
    loss of the same model from 1.59 to 2.16 on an embedded-subset batch, measured)."""
    base = get_recipe("r18_paper")
    recipe = base.with_overrides(augmentation="none", epochs=3, lr=0.5)
    assert {s.augmentation for s in recipe.stages} == {"none"}
    retrain = recipe.stage("bn_retrain")
    assert (retrain.epochs, retrain.lr) == (1, base.stage("bn_retrain").lr)


def test_model_saved_with_a_recipe_optimizer_loads_without_custom_objects(tmp_path):
    from bireal_tf.models import BiRealNet18

    recipe = get_recipe("r18_paper")
    model = BiRealNet18(input_shape=(32, 32, 3), num_classes=3)
    model.compile(make_optimizer(recipe, recipe.stage("binary"), 10), "categorical_crossentropy")
    model.save(tmp_path / "m.keras")
    loaded = tf.keras.models.load_model(tmp_path / "m.keras")
    assert float(loaded.optimizer._learning_rate(10 * 10)) == pytest.approx(0.001)


@pytest.mark.parametrize("schedule, milestones", [("step", (3, 6)), ("step", (0.5, 2.25)),
                                                  ("linear", ()), ("constant", ())])
def test_schedules_are_keras_builtins_exact_at_every_step(schedule, milestones):
    from bireal_tf.recipes import Recipe, Stage

    steps, epochs, lr = 7, 8, 0.1
    recipe = Recipe("t", batch_size=256, base_batch_size=256,
                    stages=(Stage("s", epochs=epochs, lr=lr, schedule=schedule,
                                  milestones=milestones),))
    sched = learning_rate_schedule(recipe, recipe.stages[0], steps)
    if schedule == "constant":
        assert sched == lr
        return
    assert type(sched).__module__.startswith("tf_keras.")  # Keras' own, not ours
    clone = type(sched).from_config(sched.get_config())  # serializable as it is
    for step in range(epochs * steps + 3):
        if schedule == "step":  # x0.1 from step round(m * steps) of each milestone m
            expected = lr * 0.1 ** sum(step >= round(m * steps) for m in milestones)
        else:  # linear to 0 at the last step, then 0
            expected = lr * max(0.0, 1 - step / (epochs * steps))
        assert float(sched(step)) == pytest.approx(expected, rel=1e-6, abs=1e-9), step
        assert float(clone(step)) == float(sched(step))


def test_fewer_epochs_move_the_milestones_in_proportion():
    paper = get_recipe("r18_paper")
    short = paper.with_overrides(epochs=2)
    assert short.stage("relu").milestones == (0.6667, 1.3333)  # 30, 60 of 90
    assert short.stage("binary").milestones == (1.0, 1.5)  # 10, 15 of 20
    # the binary stage now ends at the lr the BatchNorm retrain is given
    binary, retrain = short.stage("binary"), short.stage("bn_retrain")
    last = learning_rate_schedule(short, binary, 50)(2 * 50 - 1)
    assert float(last) == pytest.approx(short.scaled_lr(retrain))
    # explicit milestones and a single stage's epochs are respected
    assert paper.with_overrides(epochs=2, milestones=(1,)).stage("clip").milestones == (1,)
    one = paper.with_overrides(stage="clip", epochs=4)
    assert one.stage("clip").milestones == (2.0, 3.0)
    assert one.stage("relu").milestones == (30, 60)


# --- bad input -------------------------------------------------------------------------


def test_unknown_recipe_and_stage_list_the_valid_names():
    with pytest.raises(ValueError, match="r18_adam, r34_adam"):
        get_recipe("r19_adam")
    with pytest.raises(ValueError, match="relu, leaky_clip, clip, binary, bn_retrain"):
        get_recipe("r18_paper").stage("sign")
    with pytest.raises(ValueError, match="valid stages"):
        Trainer(get_recipe("r18_paper"), "out", TrainOptions(start_stage="warmup"))


def test_output_dir_of_another_recipe_is_refused(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "run.json").write_text(json.dumps({"recipe": "r18_paper"}))
    (out / "precious.txt").write_text("keep me")
    recipe = get_recipe("r18_adam").with_overrides(epochs=1, **TINY)
    with pytest.raises(RunDirError, match="--overwrite"):
        train_recipe(recipe, str(out), limit_train=32, limit_eval=16, verbose=0)
    assert (out / "precious.txt").read_text() == "keep me"


@pytest.mark.slow
def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    out = str(tmp_path / "run")
    recipe = get_recipe("r18_adam").with_overrides(epochs=2, **TINY)
    train_recipe(recipe, out, limit_train=32, limit_eval=16, verbose=0, validate=False)
    ckpt_dir = os.path.join(out, "stages", "0_binary", "checkpoints")
    good = tf.train.latest_checkpoint(ckpt_dir)
    assert good.endswith("ckpt-2")
    # Same run, two more epochs at a NaN learning rate: epoch 3 diverges.
    os.remove(os.path.join(out, "stages", "0_binary", "model.keras"))
    broken = recipe.with_overrides(epochs=4, lr=float("nan"))
    with pytest.raises(TrainingError, match="NaN.*epoch 3.*ckpt-2"):
        train_recipe(broken, out, limit_train=32, limit_eval=16, verbose=0, validate=False)
    assert tf.train.latest_checkpoint(ckpt_dir) == good
    reader = tf.train.load_checkpoint(good)
    for name in reader.get_variable_to_shape_map():
        value = reader.get_tensor(name)
        if isinstance(value, np.ndarray) and value.dtype.kind == "f":
            assert np.isfinite(value).all(), name


@pytest.mark.slow  # a run and two conversions: ~1 min
def test_bfloat16_run_trains_saves_and_exports_and_leaves_the_policy_as_it_was(tmp_path):
    from bireal_tf.export import export_tflite

    out = str(tmp_path / "bf16")
    recipe = get_recipe("r18_adam").with_overrides(epochs=1, pad_values=1.0, **TINY)
    summary = train_recipe(recipe, out, limit_train=32, limit_eval=16, verbose=0, validate=False,
                    mixed_precision="bfloat16")
    assert tf.keras.mixed_precision.global_policy().name == "float32"
    assert summary["mixed_precision"] == "bfloat16" and np.isfinite(summary["test_loss"])
    model = tf.keras.models.load_model(summary["model"])
    assert model.get_layer("layer1_0_binary_conv").compute_dtype == "bfloat16"
    assert model.output.dtype == tf.float32  # the classifier stays float32
    report = export_tflite(summary["model"], tmp_path / "bf16.tflite", latency=None)
    assert report.keras_precision == "mixed_bfloat16"
    assert report.binary_convs.ok and report.op_histogram["LceBconv2d"] == 16
    assert report.parity.ok


@pytest.mark.slow  # two training runs: ~1 min
def test_steps_per_execution_runs_the_same_steps(tmp_path):
    """Several steps per call of the train function: the same weights as one step per call.

    5 steps with 4 per execution: one call of 4, then the remainder of 1.
    """
    recipe = get_recipe("r18_adam").with_overrides(epochs=1, **dict(TINY, steps_per_epoch=5))
    weights = []
    for k in (1, 4):
        summary = train_recipe(recipe, str(tmp_path / f"spe{k}"), limit_train=80, limit_eval=16,
                        verbose=0, validate=False, steps_per_execution=k)
        assert summary["steps_per_execution"] == k
        weights.append(tf.keras.models.load_model(summary["model"]).get_weights())
    for a, b in zip(*weights):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="steps_per_execution"):
        TrainOptions(steps_per_execution=0)


# --- the loop, end to end --------------------------------------------------------------


class RecordingTrainer(Trainer):
    """Records each stage's weights right after initialization."""

    initial = []

    def load_initial_weights(self, model, path):
        super().load_initial_weights(model, path)
        self.initial.append((path, model, [w.numpy() for w in model.weights]))


@pytest.mark.slow
def test_paper_pipeline_runs_all_five_stages(tmp_path):
    out = str(tmp_path / "paper")
    recipe = get_recipe("r18_paper").with_overrides(epochs=1, **TINY)
    trainer = RecordingTrainer(recipe, out, TrainOptions(limit_train=64, limit_eval=32, verbose=0))
    summary = trainer.run()

    stages = sorted(os.listdir(os.path.join(out, "stages")))
    assert stages == ["0_relu", "1_leaky_clip", "2_clip", "3_binary", "4_bn_retrain"]
    for stage in stages:
        assert os.path.exists(os.path.join(out, "stages", stage, "model.keras"))
    with open(os.path.join(out, "metrics.csv")) as f:
        rows = list(csv.DictReader(f))
    assert [r["stage"] for r in rows] == ["relu", "leaky_clip", "clip", "binary", "bn_retrain"]

    # The binary stage starts from the clip stage's weights.
    inits = RecordingTrainer.initial
    assert [os.path.basename(os.path.dirname(p)) for p, _, _ in inits] == [
        "0_relu", "1_leaky_clip", "2_clip", "3_binary"]
    path, binary_model, binary_init = inits[2]
    assert len(binary_conv_layers(binary_model)) == 16
    clip_model = tf.keras.models.load_model(path)
    clip_weights = [w.numpy() for w in clip_model.weights]
    assert len(clip_weights) == len(binary_init)
    for a, b in zip(clip_weights, binary_init):
        np.testing.assert_array_equal(a, b)

    for key in ("top1", "top5", "wall_time_seconds", "train_images_per_second", "versions"):
        assert key in summary
    assert os.path.getsize(os.path.join(out, "curves.png")) > 1000
    assert os.listdir(os.path.join(out, "logs"))

    # Resuming a finished pipeline at a later stage reuses the earlier stages' models.
    again = train_recipe(recipe, out, limit_train=64, limit_eval=32, verbose=0)
    assert again["top1"] == pytest.approx(summary["top1"])


# --- saving ----------------------------------------------------------------------------


class _FailsWhileSaving(tf.keras.layers.Layer):
    """A layer whose weights cannot be written: `model.save` dies half-way through the file."""

    def __init__(self, error="RuntimeError", **kwargs):
        super().__init__(**kwargs)
        self.error = error

    def save_own_variables(self, store):
        raise {"RuntimeError": RuntimeError, "KeyboardInterrupt": KeyboardInterrupt}[self.error](
            "the disk is full")

    def get_config(self):
        return {**super().get_config(), "error": self.error}


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_save_model_atomic_keeps_the_old_file_when_a_save_dies(tmp_path, error):
    from bireal_tf.utils import save_model_atomic

    path = tmp_path / "model.keras"
    good = tf.keras.Sequential([tf.keras.Input((4,)), tf.keras.layers.Dense(2, name="dense")])
    assert save_model_atomic(good, path) == path
    before = path.read_bytes()
    np.testing.assert_array_equal(tf.keras.models.load_model(path).get_weights()[0],
                                  good.get_weights()[0])

    bad = tf.keras.Sequential([tf.keras.Input((4,)), tf.keras.layers.Dense(3),
                               _FailsWhileSaving(error.__name__)])
    with pytest.raises(error, match="disk is full"):
        save_model_atomic(bad, path)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["model.keras"]  # no temp file left behind
