"""An image-folder tree, read the way the authors' PyTorch code (torchvision's ImageFolder) reads it.

    DATA_DIR/train/<class>/**/*.{jpg,jpeg,png}   (any case: .JPEG is ImageNet's)
    DATA_DIR/val/<class>/**/*.{jpg,jpeg,png}

Classes are the sub-folder names sorted by name (hidden folders such as
.ipynb_checkpoints are ignored) and a label is the index of its class in that
order, so labels agree with ImageFolder's and with the authors' checkpoints.
When both splits exist they must have the same classes, or labels would mean
different things in training and evaluation. Files with other extensions are
ignored, as ImageFolder ignores them.

Example order. Files are listed class by class in sorted order, then
interleaved across classes (the first file of every class, then the second,
...), so that `limit=N` takes a class-balanced prefix for a smoke run.
Training shuffles the whole file list (paths are small) with the given seed.

Corrupt images. While listing we read the first bytes of every file (cheap,
threaded) and call a file corrupt when it is not a JPEG (FF D8 FF) or PNG
(89 'PNG' 0D 0A 1A 0A): empty files, partial downloads that lost their
header, HTML error pages saved as .jpg. The policy is `on_corrupt`:

- "skip" (default): leave those files out, log a warning with their count and
  names, and list them in `DatasetSpec.corrupt_files`. One bad file among a
  million should not stop a multi-day run. Files whose header is fine but whose
  data is damaged (a truncated JPEG) only fail when decoded; the pipeline then
  drops them with `ignore_errors`, which logs each one as a warning but cannot
  count them in advance.
- "fail": raise DataError naming the corrupt files, for users who want a
  clean dataset. A file whose damage is past its header still stops the
  iteration, with TensorFlow's decode error.
"""
import logging
import os
from concurrent.futures import ThreadPoolExecutor

import tensorflow as tf

from bireal_tf.data.base import DataError, Source
from bireal_tf.data.imagenet import decode_image_bytes
from bireal_tf.data.preprocessing import IMAGENET

log = logging.getLogger(__name__)

SPLIT_DIRS = {"train": "train", "test": "val"}
EXTENSIONS = (".jpg", ".jpeg", ".png")
_SIGNATURES = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n")
_LAYOUT = "DATA_DIR/train/<class>/*.JPEG and DATA_DIR/val/<class>/*.JPEG"


def _class_dirs(split_dir):
    return sorted(e.name for e in os.scandir(split_dir) if e.is_dir() and not e.name.startswith("."))


def _list_class(class_dir):
    """Image files under `class_dir` (recursively, following links), sorted."""
    found = []
    for root, dirs, files in os.walk(class_dir, followlinks=True):
        dirs.sort()
        found.extend(os.path.join(root, f) for f in sorted(files) if f.lower().endswith(EXTENSIONS))
    return found


def _looks_like_image(path):
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError:
        return False
    return any(head.startswith(sig) for sig in _SIGNATURES)


def list_split(data_dir, split):
    """(paths, labels, class_names) of one split, interleaved across classes; raises DataError on a bad tree."""
    if data_dir is None:
        raise DataError(f"the 'folder' dataset needs data_dir: pass --data-dir DATA_DIR with {_LAYOUT}.")
    if not os.path.isdir(data_dir):
        raise DataError(f"data_dir {data_dir} does not exist or is not a folder; pass --data-dir DATA_DIR with {_LAYOUT}.")
    split_dir = os.path.join(data_dir, SPLIT_DIRS[split])
    if not os.path.isdir(split_dir):
        raise DataError(f"{split_dir} does not exist: the {split!r} split of a folder dataset is read from it. Expected {_LAYOUT}.")
    classes = _class_dirs(split_dir)
    if not classes:
        what = "is empty" if not os.listdir(split_dir) else "has no class folders (only files)"
        raise DataError(f"{split_dir} {what}: put each class's images in its own sub-folder, {_LAYOUT}.")

    other_dir = os.path.join(data_dir, SPLIT_DIRS["test" if split == "train" else "train"])
    if os.path.isdir(other_dir):
        other = _class_dirs(other_dir)
        if other != classes:
            only_here, only_there = sorted(set(classes) - set(other)), sorted(set(other) - set(classes))
            raise DataError(
                f"{split_dir} and {other_dir} have different class folders "
                f"(only in {SPLIT_DIRS[split]}/: {only_here[:10]}, only in {os.path.basename(other_dir)}/: "
                f"{only_there[:10]}); labels are indices into the sorted class names, so both splits "
                "need the same ones. Add the missing folders (or remove the extra ones)."
            )

    per_class = []
    for name in classes:
        files = _list_class(os.path.join(split_dir, name))
        if not files:
            raise DataError(
                f"class folder {os.path.join(split_dir, name)} has no images (extensions "
                f"{', '.join(EXTENSIONS)}, any case). Add images or remove the folder from both splits."
            )
        per_class.append(files)
    # Interleave: rank within class first, then class index.
    order = sorted((rank, label) for label, files in enumerate(per_class) for rank in range(len(files)))
    paths = [per_class[label][rank] for rank, label in order]
    labels = [label for _, label in order]
    return paths, labels, classes


def find_corrupt(paths, workers=16):
    """The paths whose first bytes are not a JPEG or PNG signature (I/O bound, so threaded)."""
    with ThreadPoolExecutor(max_workers=workers) as pool:
        ok = list(pool.map(_looks_like_image, paths, chunksize=256))
    return [p for p, good in zip(paths, ok) if not good]


def load(split, *, data_dir, limit, on_corrupt):
    """A Source of (file path, label) for one split of an image-folder tree."""
    paths, labels, classes = list_split(data_dir, split)
    if limit is not None:
        paths, labels = paths[:limit], labels[:limit]
    corrupt = find_corrupt(paths)
    if corrupt:
        shown = "\n  ".join(corrupt[:20]) + ("\n  ..." if len(corrupt) > 20 else "")
        if on_corrupt == "fail":
            raise DataError(
                f"{len(corrupt)} of {len(paths)} files in {data_dir} are not JPEG or PNG images "
                f"(corrupt or not images):\n  {shown}\nDelete or replace them, or pass "
                "on_corrupt='skip' (--on-corrupt skip) to leave them out."
            )
        log.warning("Skipping %d of %d files that are not JPEG or PNG images (corrupt or not images):\n  %s",
                    len(corrupt), len(paths), shown)
        bad = set(corrupt)
        kept = [(p, y) for p, y in zip(paths, labels) if p not in bad]
        paths, labels = [p for p, _ in kept], [y for _, y in kept]
    if not paths:
        raise DataError(f"no readable images left in {data_dir} for split {split!r}.")
    examples = tf.data.Dataset.from_tensor_slices((tf.constant(paths), tf.constant(labels, tf.int32)))
    return Source(
        examples=examples,
        decode=lambda path: decode_image_bytes(tf.io.read_file(path)),
        num_examples=len(paths),
        num_classes=len(classes),
        class_names=classes,
        profile=IMAGENET,
        shuffle_buffer=len(paths),
        decode_can_fail=on_corrupt == "skip",
        corrupt_files=tuple(corrupt),
    )
