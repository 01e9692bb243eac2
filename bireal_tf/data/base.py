"""The types shared by the data modules: the error, the returned spec, a raw source."""
import math
from dataclasses import dataclass
from typing import Callable, Optional, Tuple

import tensorflow as tf


class DataError(ValueError):
    """A dataset cannot be loaded as asked; the message names the problem and the fix."""


@dataclass(frozen=True)
class DatasetSpec:
    """A batched input pipeline and what the model and the training loop need to know about it.

    `dataset` yields (images, labels): images float32 [B, S, S, 3], normalised
    with `mean`/`std` (per channel, on the [0, 1] scale); labels int32 [B] sparse.
    """

    dataset: tf.data.Dataset
    num_classes: int
    num_examples: int
    image_size: int
    channels: int
    class_names: Optional[list]
    name: str
    split: str = ""
    batch_size: int = 0
    drop_remainder: bool = False
    augmentation: str = "none"
    mean: Tuple[float, ...] = ()
    std: Tuple[float, ...] = ()
    corrupt_files: Tuple[str, ...] = ()  # folder datasets: files left out (or refused) by the header check

    @property
    def steps_per_epoch(self) -> int:
        """Batches in one pass over `num_examples`: floor with drop_remainder, else ceil."""
        if self.drop_remainder:
            return self.num_examples // self.batch_size
        return math.ceil(self.num_examples / self.batch_size)


@dataclass(frozen=True)
class Source:
    """Unbatched, undecoded examples of one split, as a loader hands them to the pipeline.

    `examples` yields (raw, label); `decode` turns raw (an image tensor, the
    bytes of an encoded image or a file path) into a uint8 [H, W, C] image.
    """

    examples: tf.data.Dataset
    decode: Callable[[tf.Tensor], tf.Tensor]
    num_examples: int
    num_classes: int
    class_names: Optional[list]
    profile: "object"  # a preprocessing.Profile
    shuffle_buffer: int
    decode_can_fail: bool = False  # drop examples whose decode fails (folder, on_corrupt="skip")
    corrupt_files: Tuple[str, ...] = ()
