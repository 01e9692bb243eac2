"""Input pipelines for Bi-Real Net: datasets, the papers' augmentations, normalisation.

    from bireal_tf.data import load_dataset
    spec = load_dataset("fashion_mnist_embedded", "train", batch_size=64, augmentation="adam", seed=0)
    model.fit(spec.dataset, epochs=...)   # (images [B, S, S, 3] float32, labels [B] int32)

Datasets (DATASETS): the Fashion-MNIST subset shipped in the package (the
default data of the demo and the tests), full Fashion-MNIST (IDX files or
TFDS), ImageNet through TFDS, and an ImageFolder-style tree. Pure tf.data:
this package does not touch Keras or the models.
"""
from bireal_tf.data.base import DataError, DatasetSpec
from bireal_tf.data.pipeline import DATASETS, eval_preprocess, load_dataset, raw_examples
from bireal_tf.data.preprocessing import (
    AUGMENTATIONS,
    FASHION_MNIST_MEAN,
    FASHION_MNIST_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
)

__all__ = [
    "load_dataset",
    "DatasetSpec",
    "DATASETS",
    "DataError",
    "AUGMENTATIONS",
    "raw_examples",
    "eval_preprocess",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "FASHION_MNIST_MEAN",
    "FASHION_MNIST_STD",
]
