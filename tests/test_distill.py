"""Distillation (bireal_tf.recipes.distill) and ReActNet's recipes: the loss is the formula,
the teacher is really used, teachers that cannot teach are refused, the react stages are
ReActNet's, and a run with a teacher resumes."""
import os

import numpy as np
import pytest
import tensorflow as tf

from bireal_tf.data import FASHION_MNIST_MEAN, FASHION_MNIST_STD, load_dataset
from bireal_tf.models import BiRealNet18, binary_conv_layers
from bireal_tf.recipes import Trainer, TrainOptions, get_recipe, make_optimizer, train_recipe
from bireal_tf.recipes.distill import Distiller, TeacherError, TeacherInput, load_teacher
from bireal_tf.recipes.loop import compile_for_stage

CLASSES, SIZE = 10, 32
TINY = dict(dataset="fashion_mnist_embedded", batch_size=16, image_size=SIZE)


def small_net(classes=CLASSES, size=SIZE, activation="softmax", seed=0):
    """A small classifier: 3x3/2 conv -> pool -> fc -> activation 'predictions', as ours end."""
    tf.keras.utils.set_random_seed(seed)
    images = tf.keras.Input((size, size, 3))
    x = tf.keras.layers.Conv2D(8, 3, strides=2, activation="relu")(images)
    x = tf.keras.layers.GlobalAveragePooling2D()(x)
    x = tf.keras.layers.Dense(classes, name="fc", kernel_initializer=tf.keras.initializers.RandomNormal(
        stddev=3.0))(x)  # confident: its distribution differs clearly from a uniform one
    return tf.keras.Model(images, tf.keras.layers.Activation(activation, name="predictions")(x))


def small_teacher(path, *, classes=CLASSES, size=SIZE, activation="softmax", favourite=None):
    """`small_net` saved to `path`; `favourite` makes it say that class for every image."""
    model = small_net(classes, size, activation)
    if favourite is not None:  # the same answer for every image, whatever the label
        fc = model.get_layer("fc")
        kernel, bias = fc.get_weights()
        bias[:] = 0.0
        bias[favourite] = 8.0
        fc.set_weights([np.zeros_like(kernel), bias])
    model.save(path)
    return str(path)


def logits_of(model):
    """The model's logits: the input of its softmax 'predictions' layer."""
    return tf.keras.Model(model.input, model.get_layer("predictions").input)


def images_and_labels(n=16, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(0, 1, (n, SIZE, SIZE, 3)).astype("float32")
    y = np.eye(CLASSES, dtype="float32")[rng.integers(0, CLASSES, n)]
    return x, y


# --- the loss -------------------------------------------------------------------------


STUDENTS = {
    "bireal18_react": lambda: BiRealNet18(input_shape=(SIZE, SIZE, 3), num_classes=CLASSES,
                                          block="react"),
    "small": lambda: small_net(seed=1),
}


@pytest.mark.parametrize("student_kind, teacher_ends_in, weight, smoothing",
                         [pytest.param("bireal18_react", "softmax", 1.0, 0.1,
                                       marks=pytest.mark.slow),  # ~25 s; the small net is fast
                          ("small", "linear", 0.3, 0.1)])
def test_loss_is_the_cross_entropy_of_the_student_logits_against_the_teacher(
        tmp_path, student_kind, teacher_ends_in, weight, smoothing):
    """L = mean_n -sum_c [w softmax(z_T) + (1 - w) smooth(y)]_c log_softmax(z_S)_c, computed
    here from the two models' logits, equals the loss of one training step. With w = 1 the
    labels (and their smoothing) play no part: ReActNet's distribution loss. A teacher that
    ends in softmax (as ours) and one that ends in logits."""
    student = STUDENTS[student_kind]()
    path = small_teacher(tmp_path / "t.keras", activation=teacher_ends_in)
    raw_teacher = tf.keras.models.load_model(path)
    teacher = load_teacher(path, num_classes=CLASSES, image_size=SIZE,
                           mean=FASHION_MNIST_MEAN, std=FASHION_MNIST_STD)
    x, y = images_and_labels()

    z_teacher = logits_of(raw_teacher)(x).numpy()
    z_student = logits_of(student)(x, training=True).numpy().astype("float64")
    p_teacher = tf.nn.softmax(z_teacher.astype("float64")).numpy()
    smoothed = y * (1 - smoothing) + smoothing / CLASSES
    target = weight * p_teacher + (1 - weight) * smoothed
    log_q = z_student - np.log(np.exp(z_student - z_student.max(1, keepdims=True)).sum(
        1, keepdims=True)) - z_student.max(1, keepdims=True)
    expected = float(np.mean(-(target * log_q).sum(1)))

    distiller = Distiller(student, teacher, weight, smoothing)
    compile_for_stage(distiller, tf.keras.optimizers.SGD(0.0), 0.0, steps_per_execution=1)
    loss = distiller.train_on_batch(x, y, return_dict=True)["loss"]
    assert loss == pytest.approx(expected, rel=1e-5)
    label_only = float(np.mean(-(smoothed * log_q).sum(1)))
    assert abs(expected - label_only) > 1e-3 * expected  # 100x the tolerance above


@pytest.mark.slow  # a 16-step distilled run: ~45 s
def test_a_run_with_a_teacher_learns_the_teachers_answer_not_the_labels(tmp_path):
    """The teacher says class 3 for every image; a few steps of r18_adam distilled from it
    make the student say 3 for most test images. The labels are balanced over 10 classes,
    so training on them (the teacher ignored) would not."""
    teacher = small_teacher(tmp_path / "says3.keras", favourite=3)
    recipe = get_recipe("r18_adam").fit_to_data("fashion_mnist_embedded", SIZE)[0]
    # lr is given at the base batch (512): 0.32 is Adam at 0.01 at batch 16, so that 16 steps
    # move the student far enough to show whose answer it learns.
    recipe = recipe.with_overrides(epochs=1, steps_per_epoch=16, lr=0.32, teacher=teacher, **TINY)
    summary = train_recipe(recipe, str(tmp_path / "run"), limit_train=256, limit_eval=32,
                           verbose=0, validate=False)
    assert summary["teacher_top1"] < 0.3  # it ignores the images
    model = tf.keras.models.load_model(summary["model"])
    test = load_dataset("fashion_mnist_embedded", "test", batch_size=32, image_size=SIZE, limit=32)
    # BatchNorm on the batch's own statistics, as in the 16 steps (its moving averages
    # have barely left their start after so few).
    images = np.concatenate([np.asarray(x) for x, _ in test.dataset])
    said = model(images, training=True).numpy().argmax(1)
    assert np.mean(said == 3) > 0.8, np.bincount(said, minlength=CLASSES)


# --- teachers ---------------------------------------------------------------------------


def test_teachers_that_cannot_teach_are_refused(tmp_path):
    kwargs = dict(num_classes=CLASSES, image_size=SIZE, mean=FASHION_MNIST_MEAN,
                  std=FASHION_MNIST_STD)
    with pytest.raises(TeacherError, match="does not exist"):
        load_teacher(str(tmp_path / "none.keras"), **kwargs)
    (tmp_path / "text.keras").write_text("not a model")
    with pytest.raises(TeacherError, match="not a Keras model file"):
        load_teacher(str(tmp_path / "text.keras"), **kwargs)
    with pytest.raises(TeacherError, match=r"same classes.*\(None, 10\)"):
        load_teacher(small_teacher(tmp_path / "c1000.keras", classes=1000), **kwargs)
    with pytest.raises(TeacherError, match="--image-size"):
        load_teacher(small_teacher(tmp_path / "s64.keras", size=64), **kwargs)
    with pytest.raises(TeacherError, match="softmax probabilities or logits"):
        load_teacher(small_teacher(tmp_path / "sig.keras", activation="sigmoid"), **kwargs)
    with pytest.raises(Exception, match="does not exist.*--teacher twin"):
        Trainer(get_recipe("r18_adam").with_teacher(str(tmp_path / "no.keras")), str(tmp_path / "o"))


def test_a_teacher_of_another_input_convention_sees_its_own_images():
    """Keras' ResNet50 expects caffe images (0-255 BGR minus the ImageNet means): from our
    normalised images TeacherInput gives exactly what preprocess_input makes of the pixels."""
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (2, SIZE, SIZE, 3)).astype("float32")
    ours = (pixels / 255.0 - np.array(FASHION_MNIST_MEAN)) / np.array(FASHION_MNIST_STD)
    for mode in ("caffe", "tf", "torch"):
        seen = TeacherInput(FASHION_MNIST_MEAN, FASHION_MNIST_STD, mode)(ours.astype("float32"))
        wanted = tf.keras.applications.imagenet_utils.preprocess_input(pixels.copy(), mode=mode)
        np.testing.assert_allclose(seen.numpy(), wanted, rtol=1e-4, atol=1e-3)
    seen = TeacherInput(FASHION_MNIST_MEAN, FASHION_MNIST_STD, "pixels")(ours.astype("float32"))
    np.testing.assert_allclose(seen.numpy(), pixels, atol=1e-3)


# --- ReActNet's recipes -------------------------------------------------------------------


def test_react_steps_are_reactnets(tmp_path):
    """Step 1: binary activations, real weights, coupled L2 1e-5 on the conv kernels only.
    Step 2: binary weights, no decay. Adam 2.5e-3 at 512, 128 epochs, linear to 0, each
    distilled from the teacher (default: the twin, trained on labels, teaching only)."""
    recipe = get_recipe("r18_react")
    assert recipe.block == "react" and recipe.teacher == "twin"
    twin, step1, step2 = recipe.stages
    assert (twin.activation, twin.teaches, twin.initializes_next) == ("relu", True, False)
    for stage in (step1, step2):
        assert (stage.optimizer, stage.lr, stage.epochs, stage.schedule) == ("adam", 2.5e-3, 128, "linear")
        assert recipe.distills(stage) and not recipe.distills(twin)
        assert make_optimizer(recipe, stage, 10).weight_decay is None  # not Keras' decoupled decay
    assert (step1.binary_weights, step1.weight_decay, step1.weight_decay_mode) == (False, 1e-5, "conv_l2")
    assert (step2.binary_weights, step2.weight_decay) == (True, 0.0)
    assert [s.name for s in recipe.with_teacher("t.keras").stages] == ["step1", "step2"]

    trainer = Trainer(recipe, str(tmp_path))
    model = trainer.build_model(step1, CLASSES, SIZE)
    convs = [layer for layer in model.layers if layer.name.endswith("_binary_conv")]
    assert len(convs) == 16 and not binary_conv_layers(model)
    assert all(c.input_quantizer is not None and c.kernel_quantizer is None for c in convs)
    kernels = [w for w in model.trainable_weights if w.shape.rank == 4]
    assert len(kernels) == 1 + 16 + 3  # stem, binary convs, downsample convs

    def l2():
        return float(tf.add_n(model.losses))

    expected = 0.5 * 1e-5 * sum(float(tf.reduce_sum(k**2)) for k in kernels)
    assert l2() == pytest.approx(expected, rel=1e-5)
    for name in ("bn1", "layer1_0_move0", "layer1_0_prelu", "fc"):  # not decayed
        for w in model.get_layer(name).weights:
            w.assign(w + 1.0)
    assert l2() == pytest.approx(expected, rel=1e-5)
    kernels[1].assign(kernels[1] * 2.0)
    assert l2() > expected * 1.01

    model = trainer.build_model(step2, CLASSES, SIZE)
    assert len(binary_conv_layers(model)) == 16 and not model.losses


def test_small_images_fit_the_react_recipe():
    recipe, changed = get_recipe("r18_react").fit_to_data("fashion_mnist")
    assert changed["pad_values"] == 1.0 and recipe.teacher == "twin"
    recipe = recipe.with_overrides(batch_size=128)
    assert {round(recipe.scaled_lr(s), 9) for s in recipe.stages} == {0.004}
    assert {s.augmentation for s in recipe.stages} == {"none"}
    assert recipe.stage("step1").weight_decay == 1e-5


# --- a run with the twin: the stages' starting points, and resume ------------------------


class StopAfter(tf.keras.callbacks.Callback):
    """Raises after epoch `epoch` of the `fit`-th stage trained (its checkpoint is written:
    the loop's own callback runs first)."""

    def __init__(self, fit, epoch):
        super().__init__()
        self.fit, self.epoch, self.fits = fit, epoch, 0

    def on_train_begin(self, logs=None):
        self.fits += 1

    def on_epoch_end(self, epoch, logs=None):
        if self.fits == self.fit and epoch + 1 == self.epoch:
            raise KeyboardInterrupt


def weights_by_layer(model):
    """{'<layer>/<i>': value}: variable names are no key, since a model loaded from .keras
    names Larq's quantized kernels 'kernel:0' without their layer's scope."""
    return {f"{layer.name}/{i}": w.numpy() for layer in model.layers
            for i, w in enumerate(layer.weights)}


class StartingWeights(tf.keras.callbacks.Callback):
    """Each stage's student weights when its fit begins, in stage order."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def on_train_begin(self, logs=None):
        student = getattr(self.model, "student", self.model)
        self.seen.append(weights_by_layer(student))


def react_run(out, stop=None):
    recipe = get_recipe("r18_react").fit_to_data("fashion_mnist_embedded", SIZE)[0]
    recipe = recipe.with_overrides(epochs=1, steps_per_epoch=2, **TINY)
    recipe = recipe.with_overrides(stage="step2", epochs=2)
    starts = StartingWeights()
    callbacks = [starts] + ([stop] if stop else [])
    options = TrainOptions(limit_train=64, limit_eval=32, verbose=1, validate=False,
                           deterministic=True)
    trainer = Trainer(recipe, out, options, callbacks)
    return trainer, starts


@pytest.mark.slow
def test_react_run_with_its_twin_resumes_without_training_the_twin_again(tmp_path, capsys):
    """twin -> step1 -> step2 (2 epochs): step 1 starts from scratch, not from the twin;
    step 2 starts from step 1's model. Stopped after step 2's first epoch and rerun, the run
    finds the twin and step 1 done (not trained again) and ends with the weights of the
    uninterrupted run: the same teacher and the same batches."""
    straight = str(tmp_path / "straight")
    trainer, starts = react_run(straight)
    summary = trainer.run()
    twin_model, step1_model = (os.path.join(straight, "stages", d, "model.keras")
                               for d in ("0_twin", "1_step1"))
    twin = weights_by_layer(tf.keras.models.load_model(twin_model))
    step1 = weights_by_layer(tf.keras.models.load_model(step1_model))
    at_twin, at_step1, at_step2 = starts.seen
    shared = [n for n in at_step1 if "conv" in n and n in twin]
    assert shared and not any(np.array_equal(at_step1[n], twin[n]) for n in shared)
    assert set(at_step2) == set(step1)
    for name, value in step1.items():
        np.testing.assert_array_equal(at_step2[name], value, err_msg=name)
    assert summary["teacher"] == "twin" and summary["teacher_model"] == twin_model

    resumed = str(tmp_path / "resumed")
    trainer, _ = react_run(resumed, stop=StopAfter(fit=3, epoch=1))  # step 2's first epoch
    with pytest.raises(KeyboardInterrupt):
        trainer.run()
    twin_file = os.path.join(resumed, "stages", "0_twin", "model.keras")
    mtime = os.path.getmtime(twin_file)
    capsys.readouterr()
    trainer, _ = react_run(resumed)
    again = trainer.run()
    said = capsys.readouterr().out
    assert "Stage twin: done earlier" in said and "Stage step1: done earlier" in said
    assert "Stage step2: resuming after epoch 1" in said
    assert os.path.getmtime(twin_file) == mtime
    a = tf.keras.models.load_model(summary["model"]).get_weights()
    b = tf.keras.models.load_model(again["model"]).get_weights()
    for x, y in zip(a, b):
        np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)
    assert again["teacher_top1"] == pytest.approx(summary["teacher_top1"])


# --- replicas ---------------------------------------------------------------------------------

MIRRORED = """
import sys
import numpy as np
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
from bireal_tf.recipes.distill import Distiller, load_teacher
from bireal_tf.recipes.loop import compile_for_stage

teacher_path = sys.argv[1]
rng = np.random.default_rng(0)
x = rng.normal(0, 1, (8, 32, 32, 3)).astype("float32")
y = np.eye(10, dtype="float32")[rng.integers(0, 10, 8)]

def student():  # no BatchNorm: each replica's batch statistics would differ from the whole's
    tf.keras.utils.set_random_seed(3)
    images = tf.keras.Input((32, 32, 3))
    h = tf.keras.layers.Conv2D(8, 3, strides=2, activation="relu")(images)
    h = tf.keras.layers.GlobalAveragePooling2D()(h)
    h = tf.keras.layers.Dense(10, name="fc")(h)
    return tf.keras.Model(images, tf.keras.layers.Activation("softmax", name="predictions")(h))

for name, strategy in (("default", tf.distribute.get_strategy()),
                       ("mirrored", tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]))):
    with strategy.scope():
        model = student()
        teacher = load_teacher(teacher_path, num_classes=10, image_size=32, mean=(0.5,) * 3,
                               std=(0.25,) * 3)
        distiller = Distiller(model, teacher, 0.5, 0.1)
        compile_for_stage(distiller, tf.keras.optimizers.SGD(1.0), 0.0, steps_per_execution=1)
    before = np.concatenate([w.ravel() for w in model.get_weights()])
    loss = distiller.train_on_batch(x, y, return_dict=True)["loss"]
    update = np.concatenate([w.ravel() for w in model.get_weights()]) - before
    np.save(sys.argv[2] + f"/{name}.npy",
            np.concatenate([[loss, strategy.num_replicas_in_sync], update]))
"""


@pytest.mark.slow
def test_mirrored_replicas_distill_as_one_device_does(tmp_path):
    """Two replicas of 4 images each take the step one device takes on the 8: the same loss
    and the same weights after an SGD step of lr 1 (summed rather than averaged gradients, or
    a loss not scaled per replica, would double the update)."""
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    teacher = small_teacher(tmp_path / "t.keras")
    env = dict(os.environ, TF_USE_LEGACY_KERAS="1", TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=root)
    proc = subprocess.run([sys.executable, "-c", MIRRORED, teacher, str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = (np.load(tmp_path / f"{name}.npy") for name in ("default", "mirrored"))
    assert (one[1], two[1]) == (1, 2)
    assert two[0] == pytest.approx(one[0], rel=1e-5)
    update_one, update_two = one[2:], two[2:]
    assert np.linalg.norm(update_one) > 1e-3
    assert np.linalg.norm(update_two - update_one) < 1e-4 * np.linalg.norm(update_one)
