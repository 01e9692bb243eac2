"""BatchNorm statistics re-estimated after each epoch (bireal_tf/recipes/batchnorm.py)."""

import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from bireal_tf.models import batchnorm_layers
from bireal_tf.recipes import get_recipe
from bireal_tf.recipes.batchnorm import reestimate_batchnorm
from bireal_tf.recipes.loop import Trainer, TrainOptions
from bireal_tf.recipes.run_data import RunData
from tests.conftest import cli_env


def conv_bn_net():
    """conv -> BN -> ReLU -> [conv -> BN] (the second pair nested in a sub-model)."""
    tf.keras.utils.set_random_seed(0)
    inner_in = tf.keras.Input((4, 4, 4))
    h = tf.keras.layers.Conv2D(5, 3, padding="same")(inner_in)
    inner = tf.keras.Model(inner_in, tf.keras.layers.BatchNormalization(name="bn2")(h), name="inner")
    images = tf.keras.Input((4, 4, 3))
    conv1 = tf.keras.layers.Conv2D(4, 3, padding="same")
    bn1 = tf.keras.layers.BatchNormalization(name="bn1", momentum=0.7)
    h = tf.keras.layers.ReLU()(bn1(conv1(images)))
    model = tf.keras.Model(images, inner(h))
    for bn in (bn1, inner.get_layer("bn2")):  # stale statistics, far from the data's
        bn.moving_mean.assign(tf.fill(bn.moving_mean.shape, 50.0))
        bn.moving_variance.assign(tf.fill(bn.moving_variance.shape, 1e-3))
        bn.gamma.assign(tf.random.uniform(bn.gamma.shape, 0.5, 2.0))
        bn.beta.assign(tf.random.uniform(bn.beta.shape, -1.0, 1.0))
    return model, conv1, bn1, inner


def moments(h):
    """Per-channel mean and unbiased variance (Keras' fused kernel's) of NHWC `h`."""
    return h.mean(axis=(0, 1, 2)), h.var(axis=(0, 1, 2), ddof=1)


def test_the_statistics_become_the_mean_of_each_batchs_own():
    model, conv1, bn1, inner = conv_bn_net()
    bn2 = inner.get_layer("bn2")
    assert set(batchnorm_layers(model)) == {bn1, bn2}
    trained = [w.numpy() for w in model.trainable_weights]
    rng = np.random.default_rng(1)
    batches = [rng.normal(i, 1 + i, (6, 4, 4, 3)).astype("float32") for i in range(3)]

    # Expected, from the layers' arithmetic in numpy: each batch normalised by its own
    # statistics (training mode), then the plain mean over the batches.
    expect = {"bn1": [], "bn2": []}
    for x in batches:
        z1 = conv1(x).numpy()
        m1, v1 = moments(z1)
        expect["bn1"].append((m1, v1))
        var_b = z1.var(axis=(0, 1, 2))  # training mode normalises with the biased variance
        y1 = (z1 - m1) / np.sqrt(var_b + bn1.epsilon) * bn1.gamma.numpy() + bn1.beta.numpy()
        z2 = inner.layers[1](np.maximum(y1, 0)).numpy()
        expect["bn2"].append(moments(z2))

    used = reestimate_batchnorm(model, tf.data.Dataset.from_tensor_slices(np.stack(batches)), 5)
    assert used == 3
    for bn in (bn1, bn2):
        mean = np.mean([m for m, _ in expect[bn.name]], axis=0)
        var = np.mean([v for _, v in expect[bn.name]], axis=0)
        np.testing.assert_allclose(bn.moving_mean.numpy(), mean, rtol=1e-4, atol=1e-5, err_msg=bn.name)
        np.testing.assert_allclose(bn.moving_variance.numpy(), var, rtol=1e-4, err_msg=bn.name)
    assert (bn1.momentum, bn2.momentum) == (0.7, 0.99)  # restored
    for before, after in zip(trained, model.trainable_weights):
        np.testing.assert_array_equal(before, after.numpy())

    # (images, labels) batches are taken too, and `steps` bounds the batches used.
    labelled = tf.data.Dataset.from_tensor_slices((np.stack(batches), np.zeros((3, 6))))
    assert reestimate_batchnorm(model, labelled, 1) == 1
    np.testing.assert_allclose(bn1.moving_mean.numpy(), expect["bn1"][0][0], rtol=1e-4, atol=1e-5)


def test_a_stage_validates_and_saves_the_network_with_its_statistics_re_estimated(tmp_path):
    """A stage with `reestimate_batchnorm` re-estimates after its training steps: what
    validation sees and what is saved are the statistics of the final weights on the
    stage's re-estimation images (re-estimating again changes nothing). Without it, they
    are the moving averages of the training steps."""
    recipe = get_recipe("r18_adam").fit_to_data("fashion_mnist_embedded", 32)[0]
    recipe = recipe.with_overrides(dataset="fashion_mnist_embedded", image_size=32, batch_size=16,
                                   epochs=1, steps_per_epoch=2, reestimate_batchnorm=True)

    class SeenByValidation(tf.keras.callbacks.Callback):
        def on_test_begin(self, logs=None):
            self.stats = [b.moving_mean.numpy() for b in batchnorm_layers(self.model)]

    seen = SeenByValidation()
    options = TrainOptions(limit_train=64, limit_eval=16, verbose=0)
    trainer = Trainer(recipe, str(tmp_path / "run"), options, callbacks=[seen])
    summary = trainer.run()
    model = tf.keras.models.load_model(summary["model"])
    layers = batchnorm_layers(model)
    saved = [(b.moving_mean.numpy(), b.moving_variance.numpy()) for b in layers]
    for (mean, _), at_validation in zip(saved, seen.stats):
        np.testing.assert_array_equal(mean, at_validation)

    images, steps = RunData(recipe, options).batchnorm_images(0, recipe.stages[0])
    assert steps == 64 // 16
    reestimate_batchnorm(model, images, steps)
    for (mean, var), bn in zip(saved, layers):
        np.testing.assert_allclose(bn.moving_mean.numpy(), mean, rtol=1e-4, atol=1e-4, err_msg=bn.name)
        np.testing.assert_allclose(bn.moving_variance.numpy(), var, rtol=1e-4, err_msg=bn.name)


def test_reacts_step_2_re_estimates_and_nothing_else_does():
    from bireal_tf.recipes import RECIPES

    on = {(r.name, s.name) for r in RECIPES.values() for s in r.stages if s.reestimate_batchnorm}
    assert on == {("r18_react", "step2"), ("r34_react", "step2")}
    twin = get_recipe("r18_react").stages[0]
    assert twin.name == "twin" and not twin.reestimate_batchnorm


MIRRORED = """
import bireal_tf
import numpy as np
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
from bireal_tf.recipes.batchnorm import reestimate_batchnorm

x = np.random.default_rng(0).normal(2, 3, (2, 4, 8, 8, 3)).astype("float32")
for name, strategy in (("default", tf.distribute.get_strategy()),
                       ("mirrored", tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]))):
    with strategy.scope():
        tf.keras.utils.set_random_seed(0)
        images = tf.keras.Input((8, 8, 3))
        bn = tf.keras.layers.BatchNormalization()
        model = tf.keras.Model(images, bn(tf.keras.layers.Conv2D(4, 3)(images)))
    assert reestimate_batchnorm(model, tf.data.Dataset.from_tensor_slices(x), 2, strategy) == 2
    np.save(name + ".npy", np.stack([bn.moving_mean.numpy(), bn.moving_variance.numpy()]))
"""


@pytest.mark.slow
def test_mirrored_replicas_re_estimate_as_one_device_does(tmp_path):
    """Under MirroredStrategy each replica sees the whole batch; every replica's copy ends
    with the statistics one device computes."""
    subprocess.run([sys.executable, "-c", MIRRORED], cwd=tmp_path, env=cli_env(), check=True,
                   capture_output=True, timeout=600)
    one, two = (np.load(tmp_path / f"{n}.npy") for n in ("default", "mirrored"))
    assert np.all(np.isfinite(one)) and np.all(one[1] > 0)
    np.testing.assert_allclose(two, one, rtol=1e-5)


def test_the_command_line_turns_it_on_and_off():
    from bireal_tf.recipes.train import build_recipe, parse_args

    def flags(*argv):
        recipe, _ = build_recipe(parse_args(list(argv)))
        return {s.name: s.reestimate_batchnorm for s in recipe.stages}

    assert flags("r18_react") == {"twin": False, "step1": False, "step2": True}
    assert flags("r18_react", "--no-reestimate-batchnorm") == {"twin": False, "step1": False,
                                                              "step2": False}
    assert flags("r18_adam", "--reestimate-batchnorm") == {"binary": True}
    assert flags("r18_adam") == {"binary": False}
