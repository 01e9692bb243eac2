"""ImageNet (ILSVRC 2012) through TFDS's `imagenet2012`, prepared from the manually downloaded tars.

TFDS cannot download ImageNet: the tars come from image-net.org after sign-up.
Preparing converts them (about 155 GB) into TFRecord shards of the same size
and takes hours; we run it only when asked, through `prepare_imagenet2012` or
`python -m bireal_tf.data.prepare_imagenet`. Reading keeps the JPEG bytes
(SkipDecoding) through the file shuffle and the shuffle buffer, and decodes in
the parallel map after them, so the buffer holds ~110 kB per image rather than
a decoded array. Nothing is cached: a decoded split would not fit in memory.
"""
import os

import tensorflow as tf

from bireal_tf.data.base import DataError, Source
from bireal_tf.data.preprocessing import IMAGENET

TFDS_SPLITS = {"train": "train", "test": "validation"}
SHUFFLE_BUFFER = 8192  # encoded images (about 0.9 GB), behind TFDS's shuffle of the shard files
_TARS = ("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar")


def default_data_dir(data_dir):
    return data_dir or os.path.join(os.path.expanduser("~"), "tensorflow_datasets")


def how_to_prepare(data_dir):
    """The instructions a DataError gives when imagenet2012 is not prepared in `data_dir`."""
    data_dir = default_data_dir(data_dir)
    manual = os.path.join(data_dir, "downloads", "manual")
    return (
        f"Prepare it once: download {_TARS[0]} (138 GB) and {_TARS[1]} (6.3 GB) from "
        f"https://image-net.org (needs an account), put both in {manual}/, then run\n"
        f"    python -m bireal_tf.data.prepare_imagenet --data-dir {data_dir}\n"
        "(about 160 GB more disk and several hours). Alternatively use the 'folder' dataset on "
        "an extracted train/<class>/*.JPEG, val/<class>/*.JPEG tree."
    )


def _builder(data_dir):
    import tensorflow_datasets as tfds

    try:
        return tfds.builder("imagenet2012", data_dir=data_dir)
    except FileNotFoundError as err:  # a version folder without dataset_info.json: an interrupted prepare
        raise DataError(
            f"imagenet2012 in {default_data_dir(data_dir)} is incompletely prepared ({err}). "
            "Delete the imagenet2012/ folder named there and prepare again. " + how_to_prepare(data_dir)
        ) from err


def prepare_imagenet2012(data_dir=None, manual_dir=None):
    """Convert the two ILSVRC2012 tars into TFDS's imagenet2012 in `data_dir` (hours; run once)."""
    import tensorflow_datasets as tfds

    manual_dir = manual_dir or os.path.join(default_data_dir(data_dir), "downloads", "manual")
    missing = [t for t in _TARS if not os.path.isfile(os.path.join(manual_dir, t))]
    if missing:
        raise DataError(f"{', '.join(missing)} not found in {manual_dir}. " + how_to_prepare(data_dir))
    builder = _builder(data_dir)
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
    return builder


def load(split, *, data_dir, shuffle, seed, limit):
    """A Source of (JPEG bytes, label) from a prepared imagenet2012."""
    import tensorflow_datasets as tfds

    builder = _builder(data_dir)
    tfds_split = TFDS_SPLITS[split]
    if not builder.data_path.exists() or tfds_split not in builder.info.splits:
        raise DataError(f"imagenet2012 is not prepared in {default_data_dir(data_dir)}. " + how_to_prepare(data_dir))
    if limit is not None and limit < builder.info.splits[tfds_split].num_examples:
        tfds_split = f"{tfds_split}[:{limit}]"  # TFDS refuses a slice longer than the split
    examples = builder.as_dataset(
        split=tfds_split,
        as_supervised=True,
        shuffle_files=shuffle,
        decoders={"image": tfds.decode.SkipDecoding()},
        read_config=tfds.ReadConfig(shuffle_seed=seed, try_autocache=False),
    )
    labels = builder.info.features["label"]
    return Source(
        examples=examples.map(lambda image, label: (image, tf.cast(label, tf.int32))),
        decode=decode_image_bytes,
        num_examples=builder.info.splits[tfds_split].num_examples,
        num_classes=labels.num_classes,
        class_names=list(labels.names),
        profile=IMAGENET,
        shuffle_buffer=SHUFFLE_BUFFER,
    )


def decode_image_bytes(contents):
    """JPEG/PNG/GIF/BMP bytes -> uint8 [H, W, 3] (gray is expanded, alpha dropped)."""
    return tf.io.decode_image(contents, channels=3, expand_animations=False)
