"""A run's data: each stage's training epochs, the test split, the BatchNorm images.

Epoch e of stage i is shuffled and augmented from (seed, i, e) alone, so a resumed run
sees the batches of an uninterrupted one.
"""
import tensorflow as tf

from bireal_tf.data import load_dataset
from bireal_tf.recipes.batchnorm import reestimation_steps


def input_size(recipe) -> int:
    """The image size `recipe` trains at: its own, else its dataset's default."""
    from bireal_tf.data.pipeline import profile_for

    return int(recipe.image_size or profile_for(recipe.dataset).default_size)


def stage_seed(recipe, index) -> int:
    return recipe.seed * 1_000_003 + index * 10_007


def one_hot(spec):
    """(image, label) -> (image, one-hot label): what the loss and top-k metrics take."""
    n = spec.num_classes
    return spec.dataset.map(lambda x, y: (x, tf.one_hot(y, n)), num_parallel_calls=tf.data.AUTOTUNE)


class RunData:
    """The datasets of `recipe` under `options` (data_dir, limits, on_corrupt)."""

    def __init__(self, recipe, options):
        self.recipe = recipe
        self.options = options

    def _load(self, split, augmentation, seed, limit, **by_epoch):
        train = split == "train"
        return load_dataset(
            self.recipe.dataset, split, batch_size=self.recipe.batch_size,
            image_size=self.recipe.image_size, augmentation=augmentation,
            data_dir=self.options.data_dir, shuffle=train, seed=seed, repeat=train,
            drop_remainder=train, limit=limit, on_corrupt=self.options.on_corrupt, **by_epoch)

    def train(self, index, stage, start_epoch=0, start_step=0):
        """Stage `index`'s training batches from step `start_step` of epoch `start_epoch` on,
        epoch after epoch."""
        return self._load("train", stage.augmentation, stage_seed(self.recipe, index),
                          self.options.limit_train, start_epoch=start_epoch,
                          start_step=start_step, steps_per_epoch=self.recipe.steps_per_epoch)

    def test(self):
        return self._load("test", "none", None, self.options.limit_eval)

    def batchnorm_images(self, index, stage):
        """(image batches, count) on which stage `index` re-estimates BatchNorm: the first
        batches of its first epoch, augmented as training sees them; the same ones every
        epoch and after a resume."""
        steps = reestimation_steps(self.recipe.batch_size)
        spec = self._load("train", stage.augmentation, stage_seed(self.recipe, index),
                          self.options.limit_train, start_epoch=0, steps_per_epoch=steps)
        return spec.dataset, min(steps, spec.steps_per_epoch)
