"""`load_dataset`: one entry point from a dataset name to a batched, preprocessed tf.data pipeline.

The pipeline, for every source:

    raw examples -> [shuffle] -> [repeat] -> decode + preprocess (parallel map)
                 -> [drop undecodable files] -> batch -> prefetch

Shuffling happens before decoding, on what is cheap to hold (in-memory arrays,
file paths, JPEG bytes). With a `seed`, the run is reproducible: the shuffle is
seeded, each example's augmentation is a stateless function of (image, seed
pair) with the seed pairs drawn from a seeded `Dataset.random` stream in the
example's position, and the maps keep their order (deterministic=True). A
second iteration of the same dataset (the next epoch) reshuffles and redraws,
deterministically too; building the pipeline again with the same seed
replays the same epochs.
"""
import numpy as np
import tensorflow as tf

from bireal_tf.data import fashion_mnist, folder, imagenet
from bireal_tf.data.base import DataError, DatasetSpec, Source
from bireal_tf.data.preprocessing import AUGMENTATIONS, FASHION_MNIST, IMAGENET, preprocess

DATASETS = {
    "fashion_mnist_embedded": "Fashion-MNIST subset shipped in the package (10,000 train / 2,000 test, 10 classes); no data_dir",
    "fashion_mnist": "full Fashion-MNIST (60,000 / 10,000): data_dir with the four IDX files, or TFDS",
    "imagenet2012": "ImageNet through TFDS, prepared from the manually downloaded tars in data_dir",
    "folder": "image-folder tree data_dir/train/<class>/*.JPEG, data_dir/val/<class>/*.JPEG (PyTorch ImageFolder layout)",
}
SPLITS = ("train", "test")
_SPLIT_ALIASES = {"val": "test", "validation": "test"}
ON_CORRUPT = ("skip", "fail")


def _in_memory(images, labels, class_names):
    """A Source over uint8 [N, H, W] gray images held in memory."""
    examples = tf.data.Dataset.from_tensor_slices((images[..., None], labels.astype(np.int32)))
    return Source(
        examples=examples,
        decode=lambda image: image,
        num_examples=len(labels),
        num_classes=len(class_names),
        class_names=list(class_names),
        profile=FASHION_MNIST,
        shuffle_buffer=max(len(labels), 1),
    )


def _source(name, split, *, data_dir, shuffle, seed, limit, on_corrupt):
    if name == "fashion_mnist_embedded":
        if data_dir is not None:
            raise DataError(
                "fashion_mnist_embedded ships inside the package and takes no data_dir; "
                "to read your own IDX files use the dataset name 'fashion_mnist' with that data_dir."
            )
        images, labels = fashion_mnist.load_embedded(split)
    elif name == "fashion_mnist":
        images, labels = fashion_mnist.load_arrays(split, data_dir)
    elif name == "imagenet2012":
        return imagenet.load(split, data_dir=data_dir, shuffle=shuffle, seed=seed, limit=limit)
    else:
        return folder.load(split, data_dir=data_dir, limit=limit, on_corrupt=on_corrupt)
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    return _in_memory(images, labels, fashion_mnist.CLASS_NAMES)


def _check_args(name, split, batch_size, image_size, augmentation, limit, on_corrupt, seed=None):
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; valid names: {', '.join(DATASETS)}. "
                        "Pick one of them (fashion_mnist_embedded needs no download).")
    split = _SPLIT_ALIASES.get(split, split)
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; use 'train' or 'test' ('test' is ImageNet's validation set and a folder's val/).")
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise DataError(f"batch_size must be a positive integer, got {batch_size!r}.")
    if image_size is not None and (not isinstance(image_size, (int, np.integer)) or image_size < 8):
        raise DataError(f"image_size must be an integer >= 8 (or None for the dataset's default), got {image_size!r}.")
    if augmentation not in AUGMENTATIONS:
        raise DataError(f"unknown augmentation {augmentation!r}; use one of {', '.join(AUGMENTATIONS)} "
                        "('none' for evaluation, 'paper' for the ECCV recipe, 'adam' for the PyTorch recipe).")
    if limit is not None and (not isinstance(limit, (int, np.integer)) or limit < 1):
        raise DataError(f"limit must be a positive integer or None, got {limit!r}.")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0):
        raise DataError(f"seed must be a non-negative integer or None, got {seed!r}.")
    if on_corrupt not in ON_CORRUPT:
        raise DataError(f"on_corrupt must be 'skip' or 'fail', got {on_corrupt!r}.")
    return split


def _seeds(seed):
    """Two independent 31-bit seeds (shuffle, augmentation) from one user seed; (None, None) without one."""
    if seed is None:
        return None, None
    a, b = np.random.SeedSequence(int(seed)).generate_state(2) >> 1
    return int(a), int(b)


def _epoch_seeds(shuffle_seed, augment_seed, epoch):
    """(shuffle seed, augmentation seed) of one epoch: int64 tensors, functions of the run's
    two seeds (`_seeds`) and the epoch."""
    epoch = tf.cast(epoch, tf.int64)
    return ((shuffle_seed * 1_000_003 + epoch) % (2**31 - 1),
            (augment_seed * 1_000_003 + epoch) % (2**31 - 1))


def load_dataset(
    name,
    split,
    *,
    batch_size,
    image_size=None,
    augmentation="none",
    data_dir=None,
    shuffle=None,
    seed=None,
    repeat=False,
    drop_remainder=False,
    limit=None,
    on_corrupt="skip",
    start_epoch=None,
    steps_per_epoch=None,
    start_step=0,
):
    """Build the input pipeline of `split` ("train"/"test") of dataset `name` (one of DATASETS).

    Returns a DatasetSpec whose `.dataset` yields (float32 [B, S, S, 3]
    normalised images, int32 [B] labels). `shuffle` defaults to True for
    "train". `limit` keeps the first N examples. Raises DataError, with the
    fix in its message, for every bad input.

    Training by epochs (the training loop): with `start_epoch` and
    `steps_per_epoch`, the dataset yields epoch `start_epoch`, then the next, ...
    without end, each `steps_per_epoch` full batches (default: one pass) whose order and augmentation
    are functions of (`seed`, epoch) only. The source (file list, arrays, TFDS
    reader) is built once; a run resumed at epoch k sees what an uninterrupted
    run saw in epoch k. With `start_step` s, the first epoch starts at its step s (a run
    resumed in the middle of an epoch), and the epochs after it are whole.
    """
    split = _check_args(name, split, batch_size, image_size, augmentation, limit, on_corrupt, seed)
    shuffle = split == "train" if shuffle is None else bool(shuffle)
    by_epoch = start_epoch is not None
    if by_epoch and seed is None:
        raise DataError("start_epoch needs a seed: each epoch's data are drawn from (seed, epoch).")
    shuffle_seed, augment_seed = _seeds(seed)
    source = _source(name, split, data_dir=data_dir, shuffle=shuffle, seed=shuffle_seed,
                     limit=limit, on_corrupt=on_corrupt)
    profile = source.profile
    size = int(image_size or profile.default_size)
    # Order only matters to reproduce a run or when nothing random happens (e.g. comparing two models on test).
    deterministic = seed is not None or (not shuffle and augmentation == "none")
    decode = source.decode

    def transform(example, pair=None):
        raw, label = example
        image = preprocess(decode(raw), augmentation=augmentation, size=size, profile=profile,
                           seed=pair)
        return image, label

    def batches(ds, shuffle_seed, augment_seeds, reshuffle, drop, skip=0):
        """shuffle -> repeat -> decode + preprocess -> batch, for one pass or an endless stream;
        `skip` examples of the stream are dropped before they are decoded."""
        if shuffle:
            ds = ds.shuffle(source.shuffle_buffer, seed=shuffle_seed,
                            reshuffle_each_iteration=reshuffle)
        if repeat or by_epoch:
            ds = ds.repeat()
        if augmentation == "none":
            ds = ds.skip(skip).map(lambda raw, label: transform((raw, label)),
                                   num_parallel_calls=tf.data.AUTOTUNE, deterministic=deterministic)
        else:
            # Each example gets its own stateless seed pair, drawn in its position in the stream.
            ds = tf.data.Dataset.zip((ds, augment_seeds)).skip(skip)
            ds = ds.map(transform, num_parallel_calls=tf.data.AUTOTUNE, deterministic=deterministic)
        if source.decode_can_fail:
            ds = ds.ignore_errors(log_warning=True)
        return ds.batch(batch_size, drop_remainder=drop, num_parallel_calls=tf.data.AUTOTUNE,
                        deterministic=deterministic)

    if by_epoch:
        steps_per_epoch = steps_per_epoch or source.num_examples // batch_size
        if steps_per_epoch < 1:
            raise DataError(f"batch_size {batch_size} is larger than the {source.num_examples} "
                            f"examples of {name} {split}; lower the batch size.")
        if not 0 <= int(start_step) < steps_per_epoch:
            raise DataError(f"start_step must be in [0, {steps_per_epoch}), got {start_step}.")
        # A run resumed inside epoch `start_epoch` skips the steps it took there. Where a
        # decode can fail (and so drop an example) it skips whole batches, else it skips
        # their examples before they are decoded.
        cut = 0 if source.decode_can_fail else int(start_step)  # steps not taken in the epoch

        def one_epoch(epoch):
            # The shuffle's seed is a tensor here; TF's seed logic compares the op seed in
            # Python when the graph seed is 0 (set_random_seed(0)), which a tensor cannot
            # answer. A fixed graph seed for this function only sidesteps that comparison.
            tf.random.set_seed(1)
            epoch_shuffle, epoch_augment = _epoch_seeds(shuffle_seed, augment_seed, epoch)
            pairs = tf.data.Dataset.range(2**62).map(
                lambda i: tf.stack([epoch_augment, i]))
            first = tf.equal(tf.cast(epoch, tf.int64), int(start_epoch))
            steps = tf.where(first, tf.constant(cut, tf.int64), tf.constant(0, tf.int64))
            ds = batches(source.examples, epoch_shuffle, pairs, True, True, steps * batch_size)
            return ds.take(steps_per_epoch - steps)

        ds = tf.data.Dataset.range(int(start_epoch), 2**62).flat_map(one_epoch)
        if start_step and not cut:
            ds = ds.skip(int(start_step))
        drop_remainder = True
    else:
        pairs = tf.data.Dataset.random(seed=augment_seed, rerandomize_each_iteration=True).batch(2)
        ds = batches(source.examples, shuffle_seed, pairs, True, drop_remainder)
    ds = ds.prefetch(tf.data.AUTOTUNE)
    options = tf.data.Options()
    options.deterministic = deterministic
    ds = ds.with_options(options)

    return DatasetSpec(
        dataset=ds,
        num_classes=source.num_classes,
        num_examples=source.num_examples,
        image_size=size,
        channels=3,
        class_names=source.class_names,
        name=name,
        split=split,
        batch_size=int(batch_size),
        drop_remainder=bool(drop_remainder),
        augmentation=augmentation,
        mean=tuple(profile.mean),
        std=tuple(profile.std),
        corrupt_files=source.corrupt_files,
    )


def raw_examples(name="fashion_mnist_embedded", split="test", *, n=8, data_dir=None):
    """The first `n` examples before preprocessing: (list of uint8 [H, W, C] arrays, int32 labels).

    For showing images and for feeding a deployed model its own preprocessing;
    `eval_preprocess` turns them into exactly what the test pipeline yields.
    """
    split = _check_args(name, split, 1, None, "none", n, "skip")
    source = _source(name, split, data_dir=data_dir, shuffle=False, seed=None, limit=n, on_corrupt="skip")
    images, labels = [], []
    for raw, label in source.examples.take(n):
        images.append(source.decode(raw).numpy())
        labels.append(int(label))
    return images, np.asarray(labels, np.int32)


def profile_for(name):
    """The preprocessing profile of dataset `name`: Fashion-MNIST's or ImageNet's."""
    return FASHION_MNIST if name.startswith("fashion_mnist") else IMAGENET


def eval_preprocess(images, name="fashion_mnist_embedded", image_size=None):
    """Apply the evaluation transform of dataset `name` to uint8 images; returns float32 [N, S, S, 3].

    `images` is one image [H, W] / [H, W, C] or a list/array of them (sizes may differ).
    """
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; valid names: {', '.join(DATASETS)}.")
    profile = profile_for(name)
    size = int(image_size or profile.default_size)
    single = isinstance(images, np.ndarray) and images.ndim in (2, 3) and (images.ndim == 2 or images.shape[-1] in (1, 3))
    batch = [images] if single else list(images)
    out = []
    for image in batch:
        image = np.asarray(image, np.uint8)
        if image.ndim == 2:
            image = image[..., None]
        out.append(preprocess(tf.constant(image), augmentation="none", size=size, profile=profile).numpy())
    return np.stack(out)
