"""Distillation from a real-valued teacher, as ReActNet trains (their utils/KD_loss.py).

The loss of a student stage with a teacher, on a batch of N images:

    L = w * CE(p_T, z_S) + (1 - w) * CE(y, z_S)
      = -1/N sum_n sum_c [w * p_T[n, c] + (1 - w) * y[n, c]] * log_softmax(z_S[n])_c

p_T: the teacher's softmax on the same augmented batch, in inference mode (training=False,
no gradient); z_S: the student's logits; y: the one-hot labels with the stage's label
smoothing; w: the recipe's `distill_weight` (`--distill-weight`). w = 1, the default, is
ReActNet's distribution loss, which uses no labels; w = 0 is label training. Since the
cross-entropy is linear in its target, L is one cross-entropy against the mixed target
w * p_T + (1 - w) * y, which is how `Distiller` computes it: Keras' categorical
cross-entropy on the student's softmax output, which takes the softmax's logits and
computes log-softmax from them (no probabilities clipped at 1e-7). The metrics (top-1,
top-5) and the validation loss compare the student with the labels.

A teacher is any Keras classifier of the same classes whose output is softmax
probabilities or logits (a linear last layer): ours (`--teacher twin` trains the
student's real-valued twin first), or e.g. a Keras Applications network. One trained for
another input convention sees the images in its own through `TeacherInput`.
"""
import os

import tensorflow as tf

from bireal_tf.quantizers import custom_objects
from bireal_tf.recipes.errors import TrainingError
from bireal_tf.recipes.recipe import TWIN


class TeacherError(ValueError):
    """The teacher cannot teach this run; the message says why and what to do."""


class TeacherInput(tf.keras.layers.Layer):
    """Our normalised images -> the images a teacher was trained on.

    The data pipeline yields x = (p / 255 - mean) / std per channel, p the RGB pixel
    values (0-255) and mean/std those of the dataset's profile (IMAGENET_MEAN/STD,
    FASHION_MNIST_MEAN/STD). This layer recovers p = 255 * (x * std + mean) and hands on

      "pixels": p itself (models that rescale inside, e.g. Keras' EfficientNet, ConvNeXt);
      "caffe":  BGR, minus ImageNet's BGR pixel means (Keras' ResNet50/101/152, VGG);
      "tf":     p / 127.5 - 1 (Keras' ResNet50V2, MobileNet, Inception, Xception);
      "torch":  (p / 255 - ImageNet mean) / ImageNet std (Keras' DenseNet, torchvision);

    the last three through Keras' own `imagenet_utils.preprocess_input(p, mode=...)`.
    Computed in float32 whatever the precision policy.
    """

    CONVENTIONS = ("pixels", "caffe", "tf", "torch")

    def __init__(self, mean, std, convention, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        if convention not in self.CONVENTIONS:
            raise ValueError(f"convention must be one of {self.CONVENTIONS}, got {convention!r}.")
        self.mean, self.std, self.convention = tuple(mean), tuple(std), convention

    def call(self, x):
        pixels = 255.0 * (x * tf.constant(self.std) + tf.constant(self.mean))
        if self.convention == "pixels":
            return pixels
        return tf.keras.applications.imagenet_utils.preprocess_input(pixels, mode=self.convention)

    def get_config(self):
        return {**super().get_config(), "mean": self.mean, "std": self.std,
                "convention": self.convention}


def _output_is_probabilities(model, path):
    """True if `model` ends in softmax, False if in logits; otherwise a TeacherError."""
    last = model.layers[-1]
    if isinstance(last, tf.keras.layers.Softmax):
        return True
    activation = getattr(getattr(last, "activation", None), "__name__", None)
    if activation in ("softmax", "linear"):
        return activation == "softmax"
    raise TeacherError(
        f"The teacher {path} ends in layer {last.name!r} ({type(last).__name__}, activation "
        f"{activation}); a teacher must output softmax probabilities or logits (a linear last "
        "layer). Save the classifier with its softmax or without an activation."
    )


def load_teacher(path, *, num_classes, image_size, mean, std, teacher_input="ours"):
    """The teacher in `path` as a model from our normalised images to float32 probabilities.

    Refuses (TeacherError) a file that is missing or not a Keras model, and a model that
    does not classify `num_classes` classes, does not take `image_size` x `image_size` RGB
    images, or ends in neither softmax nor logits. `teacher_input` says how the teacher
    expects its images: "ours" (the pipeline's, e.g. our own models), or one of
    `TeacherInput.CONVENTIONS`. The teacher's weights are frozen and it runs in inference
    mode. Build it inside the strategy's scope.
    """
    if not os.path.exists(path):
        raise TeacherError(f"--teacher {path} does not exist. Give a Keras classifier file "
                           "(.keras, .h5 or a SavedModel directory), or --teacher twin.")
    try:
        with custom_objects():
            model = tf.keras.models.load_model(path, compile=False)
    except (OSError, ValueError, TypeError, ImportError) as err:
        line = (str(err).strip().splitlines() or [""])[0][:300]
        raise TeacherError(f"--teacher {path} is not a Keras model file that loads here "
                           f"({type(err).__name__}: {line}).") from err
    if len(model.outputs) != 1 or tuple(model.output_shape[1:]) != (num_classes,):
        raise TeacherError(
            f"The teacher {path} outputs {model.output_shape}, the data have {num_classes} "
            f"classes: a teacher must classify the same classes, in the same order (output "
            f"shape (None, {num_classes})).")
    shape = tuple(model.input_shape[1:]) if len(model.inputs) == 1 else None
    if shape is None or len(shape) != 3 or shape[2] != 3 or any(
            side not in (None, image_size) for side in shape[:2]):
        raise TeacherError(
            f"The teacher {path} takes inputs of shape {model.input_shape}; this run trains on "
            f"{image_size}x{image_size} RGB images. Use a teacher built for that size (or any "
            f"size), or train at its size with --image-size.")
    probabilities = _output_is_probabilities(model, path)
    model.trainable = False

    images = tf.keras.Input((image_size, image_size, 3), name="images")
    x = images if teacher_input == "ours" else TeacherInput(mean, std, teacher_input)(images)
    y = model(x, training=False)
    if not probabilities:
        y = tf.keras.layers.Activation("softmax", dtype="float32", name="teacher_softmax")(y)
    return tf.keras.Model(images, y, name="teacher")


class Distiller(tf.keras.Model):
    """Trains `student` toward `teacher`'s predictions; see the module docstring for the loss.

    Compile it with a categorical cross-entropy without label smoothing (the label term's
    smoothing is `label_smoothing` here, so that the teacher's term is never smoothed) and
    the usual metrics. `fit` trains the student's weights only; save `student`.
    """

    def __init__(self, student, teacher, distill_weight=1.0, label_smoothing=0.0, **kwargs):
        super().__init__(name=kwargs.pop("name", "distiller"), **kwargs)
        self.student = student
        self.teacher = teacher
        self.teacher.trainable = False
        self.distill_weight = float(distill_weight)
        self.label_smoothing = float(label_smoothing)

    def call(self, images, training=None):
        return self.student(images, training=training)

    def targets(self, images, labels):
        """w * p_T + (1 - w) * smoothed labels: the target of the student's cross-entropy."""
        teacher = tf.cast(self.teacher(images, training=False), tf.float32)
        if self.distill_weight == 1.0:
            return tf.stop_gradient(teacher)
        labels = tf.cast(labels, tf.float32)
        if self.label_smoothing:
            labels = labels * (1.0 - self.label_smoothing) + self.label_smoothing / labels.shape[-1]
        return tf.stop_gradient(self.distill_weight * teacher + (1.0 - self.distill_weight) * labels)

    def train_step(self, data):
        images, labels = data
        targets = self.targets(images, labels)
        with tf.GradientTape() as tape:
            predictions = self(images, training=True)
            loss = self.compiled_loss(targets, predictions,
                                      regularization_losses=self.student.losses)
        self.optimizer.minimize(loss, self.student.trainable_variables, tape=tape)
        return self.compute_metrics(images, labels, predictions, None)

    def test_step(self, data):  # the student against the labels
        images, labels = data
        predictions = self(images, training=False)
        self.compiled_loss(labels, predictions, regularization_losses=self.student.losses)
        return self.compute_metrics(images, labels, predictions, None)


class TeacherChain:
    """Which teacher each stage of a run learns from, each loaded once per run.

    A stage that distills learns from the recipe's teacher file, or (`teacher="twin"`)
    from the model of the last stage before it that teaches, once that stage is done:
    a resumed run finds it on disk and does not train it again.
    """

    def __init__(self, recipe, run_dir, strategy):
        self.recipe = recipe
        self.run_dir = run_dir
        self.strategy = strategy
        self._loaded = {}  # path -> the teacher built in the strategy's scope

    def path_before(self, index):
        """The teacher that stage `index` would learn from: a file, or None when it is the
        twin's and the twin is not trained (yet) in this run."""
        if self.recipe.teacher is None:
            return None
        if self.recipe.teacher != TWIN:
            return self.recipe.teacher
        teaching = [i for i, s in enumerate(self.recipe.stages[:index]) if s.teaches]
        if teaching:
            path = self.run_dir.stage_model(teaching[-1], self.recipe.stages[teaching[-1]])
            if os.path.exists(path):
                return path
        return None

    def for_stage(self, index):
        """The teacher path of stage `index`, None if it learns from labels; refuses a stage
        that distills from a twin this run has not trained."""
        stage = self.recipe.stages[index]
        if not self.recipe.distills(stage):
            return None
        path = self.path_before(index)
        if path is None:
            raise TrainingError(
                f"Stage {stage.name} distills from the twin, which is not trained in "
                f"{self.run_dir.path}: start from stage {self.recipe.stages[0].name}, or give a "
                "trained teacher with --teacher PATH.")
        return path

    def model(self, path, spec):
        """The teacher in `path` for data like `spec`'s."""
        if path not in self._loaded:
            with self.strategy.scope():
                self._loaded[path] = load_teacher(
                    path, num_classes=spec.num_classes, image_size=spec.image_size,
                    mean=spec.mean, std=spec.std, teacher_input=self.recipe.teacher_input)
        return self._loaded[path]


__all__ = ["Distiller", "TeacherChain", "TeacherError", "TeacherInput", "load_teacher"]
