"""Tests of bireal_tf.data on real files: the embedded subset, IDX files, JPEG/PNG trees, TFDS mock data."""
import gzip
import hashlib
import logging
import lzma
import os
import re
import struct

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402
import tensorflow_datasets as tfds  # noqa: E402

from bireal_tf.data import (  # noqa: E402
    AUGMENTATIONS,
    DATASETS,
    DataError,
    DatasetSpec,
    eval_preprocess,
    load_dataset,
    raw_examples,
)
from bireal_tf.data import fashion_mnist, make_embedded, preprocessing  # noqa: E402
from bireal_tf.data.imagenet import prepare_imagenet2012  # noqa: E402


def _all(spec):
    """Concatenate every batch of a spec's dataset into NumPy arrays."""
    xs, ys = zip(*[(x.numpy(), y.numpy()) for x, y in spec.dataset])
    return np.concatenate(xs), np.concatenate(ys)


def _first_batches(spec, n=3):
    return [(x.numpy(), y.numpy()) for x, y in spec.dataset.take(n)]


# --------------------------------------------------------------------------- embedded subset


def test_embedded_train_is_balanced_and_normalised():
    spec = load_dataset("fashion_mnist_embedded", "train", batch_size=1000, shuffle=False)
    assert isinstance(spec, DatasetSpec)
    assert (spec.num_classes, spec.num_examples, spec.image_size, spec.channels) == (10, 10000, 32, 3)
    assert spec.class_names[0] == "T-shirt/top" and len(spec.class_names) == 10
    assert spec.steps_per_epoch == 10
    x, y = _all(spec)
    assert x.shape == (10000, 32, 32, 3) and x.dtype == np.float32 and y.dtype == np.int32
    assert np.bincount(y, minlength=10).tolist() == [1000] * 10
    assert abs(x.mean()) < 0.15 and 0.85 < x.std() < 1.15
    np.testing.assert_array_equal(x[..., 0], x[..., 2])  # gray tiled to three channels


def test_embedded_test_split_and_first_batch_shape():
    spec = load_dataset("fashion_mnist_embedded", "test", batch_size=64)
    x, y = next(iter(spec.dataset))
    assert x.shape == (64, 32, 32, 3)
    _, y = _all(spec)
    assert spec.num_examples == 2000 and np.bincount(y, minlength=10).tolist() == [200] * 10


def test_embedded_files_match_notice_and_size_budget():
    folder = fashion_mnist.EMBEDDED_DIR
    notice = open(os.path.join(folder, "NOTICE"), encoding="utf-8").read()
    assert "MIT" in open(os.path.join(folder, "LICENSE"), encoding="utf-8").read()
    total = 0
    for name in sorted(os.listdir(folder)):
        total += os.path.getsize(os.path.join(folder, name))
        if name.endswith(".xz"):
            digest = hashlib.sha256(lzma.open(os.path.join(folder, name)).read()).hexdigest()
            assert re.search(rf"{digest}\s+{name[:-3]}", notice), name
    assert total <= 5_000_000


def test_embedded_takes_no_data_dir(tmp_path):
    with pytest.raises(DataError, match="fashion_mnist"):
        load_dataset("fashion_mnist_embedded", "train", batch_size=8, data_dir=str(tmp_path))


def test_raw_examples_and_eval_preprocess_match_the_test_pipeline():
    images, labels = raw_examples("fashion_mnist_embedded", "test", n=4)
    assert len(images) == 4 and images[0].shape == (28, 28, 1) and images[0].dtype == np.uint8
    x, y = next(iter(load_dataset("fashion_mnist_embedded", "test", batch_size=4, limit=4).dataset))
    np.testing.assert_array_equal(labels, y.numpy())
    np.testing.assert_allclose(eval_preprocess(images), x.numpy(), atol=1e-6)
    np.testing.assert_allclose(eval_preprocess(np.stack(images)[..., 0]), x.numpy(), atol=1e-6)


# --------------------------------------------------------------------------- argument errors


def test_unknown_dataset_lists_valid_names():
    with pytest.raises(DataError) as err:
        load_dataset("cifar10", "train", batch_size=8)
    for name in DATASETS:
        assert name in str(err.value)


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        (dict(split="dev"), "split"),
        (dict(augmentation="autoaugment"), "augmentation.*none.*paper.*adam"),
        (dict(batch_size=0), "batch_size"),
        (dict(image_size=4), "image_size"),
        (dict(limit=0), "limit"),
        (dict(on_corrupt="ignore"), "on_corrupt"),
        (dict(seed=-1), "seed"),
    ],
)
def test_bad_arguments_are_data_errors(kwargs, pattern):
    args = dict(split="train", batch_size=8) | kwargs
    with pytest.raises(DataError, match=pattern):
        load_dataset("fashion_mnist_embedded", args.pop("split"), **args)


def test_limit_and_steps_per_epoch():
    spec = load_dataset("fashion_mnist_embedded", "train", batch_size=32, limit=100)
    assert spec.num_examples == 100 and spec.steps_per_epoch == 4
    assert len(list(spec.dataset)) == 4
    spec = load_dataset("fashion_mnist_embedded", "train", batch_size=32, limit=100, drop_remainder=True)
    assert spec.steps_per_epoch == 3 and len(list(spec.dataset)) == 3
    assert spec.dataset.element_spec[0].shape.as_list() == [32, 32, 32, 3]


# --------------------------------------------------------------------------- augmentations


@pytest.mark.parametrize("augmentation", AUGMENTATIONS)
def test_fashion_augmentations_shape_and_range(augmentation):
    spec = load_dataset("fashion_mnist_embedded", "train", batch_size=64, image_size=40,
                        augmentation=augmentation, limit=64, seed=0)
    x, _ = next(iter(spec.dataset))
    x = x.numpy()
    assert x.shape == (64, 40, 40, 3) and np.isfinite(x).all()
    mean, std = preprocessing.FASHION_MNIST_MEAN[0], preprocessing.FASHION_MNIST_STD[0]
    slack = 0.1 / std  # lighting noise, unclipped
    assert x.min() >= (0 - mean) / std - slack and x.max() <= (1 - mean) / std + slack


def _photo(height=120, width=160):
    """A smooth colour image with structure in both directions, uint8."""
    yy, xx = np.mgrid[0:height, 0:width]
    rgb = np.stack([xx / width, yy / height, 0.5 + 0.5 * np.sin(xx / 7.0) * np.cos(yy / 5.0)], -1)
    return tf.constant((rgb * 255).astype(np.uint8))


@pytest.mark.parametrize("augmentation", AUGMENTATIONS)
def test_imagenet_augmentations_shape_and_range(augmentation):
    out = preprocessing.preprocess(_photo(), augmentation=augmentation, size=64,
                                   profile=preprocessing.IMAGENET, seed=tf.constant([1, 2], tf.int64)).numpy()
    assert out.shape == (64, 64, 3)
    mean, std = np.array(preprocessing.IMAGENET_MEAN), np.array(preprocessing.IMAGENET_STD)
    assert (out >= (0 - mean) / std - 0.5).all() and (out <= (1 - mean) / std + 0.5).all()


def test_random_resized_crop_varies_and_is_a_function_of_the_seed():
    image = preprocessing.to_float_rgb(_photo())
    crops = [preprocessing.random_resized_crop(image, 48, tf.constant([s, 0], tf.int64), min_area=0.08).numpy()
             for s in range(6)]
    assert all(c.shape == (48, 48, 3) for c in crops)
    assert len({c.tobytes() for c in crops}) == 6  # six seeds, six different boxes
    again = preprocessing.random_resized_crop(image, 48, tf.constant([3, 0], tf.int64), min_area=0.08).numpy()
    np.testing.assert_array_equal(again, crops[3])


def test_eval_center_crop_drops_the_borders():
    # A wide image: the left and right quarters are red and blue; the centre crop sees only gray.
    image = np.full((100, 200, 3), 128, np.uint8)
    image[:, :50] = (255, 0, 0)
    image[:, 150:] = (0, 0, 255)
    out = preprocessing.eval_transform(tf.constant(image), 64, preprocessing.IMAGENET).numpy()
    rgb = out * preprocessing.IMAGENET_STD + np.array(preprocessing.IMAGENET_MEAN)
    np.testing.assert_allclose(rgb, 128 / 255, atol=1e-3)


def test_lighting_is_gray_for_fashion_mnist_and_coloured_for_imagenet():
    zero = tf.zeros((4, 4, 3))
    seed = tf.constant([5, 6], tf.int64)
    fm = preprocessing.FASHION_MNIST
    gray = preprocessing.lighting(zero, seed, eigval=fm.eigval, eigvec=fm.eigvec).numpy()
    assert np.ptp(gray[0, 0]) < 1e-7 and abs(gray[0, 0, 0]) > 0
    inet = preprocessing.IMAGENET
    rgb = preprocessing.lighting(zero, seed, eigval=inet.eigval, eigvec=inet.eigvec).numpy()
    assert np.ptp(rgb[0, 0]) > 1e-5 and np.abs(rgb).max() < 0.2


# --------------------------------------------------------------------------- determinism


def test_seeded_train_pipeline_is_reproducible():
    def build(seed):
        return load_dataset("fashion_mnist_embedded", "train", batch_size=16, augmentation="adam",
                            seed=seed, limit=256)

    a, b = build(7), build(7)
    epoch1_a, epoch1_b = _first_batches(a), _first_batches(b)
    epoch2_a, epoch2_b = _first_batches(a), _first_batches(b)
    for (xa, ya), (xb, yb) in zip(epoch1_a + epoch2_a, epoch1_b + epoch2_b):
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ya, yb)
    assert not np.array_equal(epoch1_a[0][0], epoch2_a[0][0])  # the next epoch reshuffles and redraws
    assert not np.array_equal(epoch1_a[0][0], _first_batches(build(8), 1)[0][0])


def test_unshuffled_test_pipeline_keeps_order():
    a = _first_batches(load_dataset("fashion_mnist_embedded", "test", batch_size=32, limit=64), 2)
    b = _first_batches(load_dataset("fashion_mnist_embedded", "test", batch_size=32, limit=64), 2)
    for (xa, ya), (xb, yb) in zip(a, b):
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ya, yb)


# --------------------------------------------------------------------------- image folder

COLOURS = {"ant": (255, 0, 0), "bee": (0, 255, 0), "cat": (0, 0, 255)}  # sorted: labels 0, 1, 2


def _write_image(path, colour, fmt, size=(40, 52)):
    image = np.zeros(size + (3,), np.uint8) + np.array(colour, np.uint8)
    encoded = tf.io.encode_png(image) if fmt == "png" else tf.io.encode_jpeg(image, quality=95)
    tf.io.write_file(str(path), encoded)


def _make_tree(root, per_class=4, splits=("train", "val")):
    for split in splits:
        for name, colour in COLOURS.items():
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(per_class):
                ext = ("jpg", "JPEG", "png", "jpeg")[i % 4]
                _write_image(folder / f"img{i}.{ext}", colour, "png" if ext == "png" else "jpeg")
            (folder / "notes.txt").write_text("not an image, ignored by extension")
    return root


def test_folder_reads_classes_in_sorted_order(tmp_path):
    root = _make_tree(tmp_path / "data")
    spec = load_dataset("folder", "test", batch_size=5, image_size=32, data_dir=str(root))
    assert spec.class_names == ["ant", "bee", "cat"] and spec.num_classes == 3 and spec.num_examples == 12
    x, y = _all(spec)
    assert x.shape == (12, 32, 32, 3)
    rgb = x * preprocessing.IMAGENET_STD + np.array(preprocessing.IMAGENET_MEAN)
    np.testing.assert_array_equal(rgb.mean(axis=(1, 2)).argmax(-1), y)  # red -> 0, green -> 1, blue -> 2
    limited = load_dataset("folder", "train", batch_size=3, image_size=32, data_dir=str(root), limit=3)
    assert sorted(_all(limited)[1].tolist()) == [0, 1, 2]  # a limit takes a balanced prefix


def test_folder_train_with_augmentation(tmp_path):
    root = _make_tree(tmp_path / "data")
    spec = load_dataset("folder", "train", batch_size=4, image_size=32, data_dir=str(root),
                        augmentation="adam", seed=1, drop_remainder=True)
    x, y = next(iter(spec.dataset))
    assert x.shape == (4, 32, 32, 3) and y.dtype == tf.int32


def test_folder_skips_and_counts_corrupt_files(tmp_path, caplog):
    root = _make_tree(tmp_path / "data")
    (root / "train" / "bee" / "broken.jpg").write_bytes(b"<html>404 not found</html>")
    (root / "train" / "cat" / "empty.png").write_bytes(b"")
    with caplog.at_level(logging.WARNING):
        spec = load_dataset("folder", "train", batch_size=8, image_size=32, data_dir=str(root), seed=0)
    assert spec.num_examples == 12
    assert sorted(os.path.basename(p) for p in spec.corrupt_files) == ["broken.jpg", "empty.png"]
    assert "broken.jpg" in caplog.text and "Skipping 2 of 14" in caplog.text
    assert len(_all(spec)[1]) == 12


def test_folder_drops_files_that_fail_to_decode(tmp_path):
    root = _make_tree(tmp_path / "data")
    good = tf.io.encode_jpeg(np.full((64, 64, 3), 90, np.uint8)).numpy()
    (root / "train" / "ant" / "truncated.jpg").write_bytes(good[: len(good) // 2])  # header intact
    spec = load_dataset("folder", "train", batch_size=8, image_size=32, data_dir=str(root), shuffle=False)
    assert spec.num_examples == 13 and spec.corrupt_files == ()
    assert len(_all(spec)[1]) == 12


def test_folder_fail_mode_names_the_corrupt_file(tmp_path):
    root = _make_tree(tmp_path / "data")
    (root / "val" / "cat" / "broken.JPEG").write_bytes(b"GIF89a but not really")
    with pytest.raises(DataError, match=r"broken\.JPEG"):
        load_dataset("folder", "test", batch_size=8, data_dir=str(root), on_corrupt="fail")


def test_folder_errors(tmp_path):
    with pytest.raises(DataError, match="needs data_dir"):
        load_dataset("folder", "train", batch_size=8)
    with pytest.raises(DataError, match="does not exist"):
        load_dataset("folder", "train", batch_size=8, data_dir=str(tmp_path / "nowhere"))
    with pytest.raises(DataError, match=r"train does not exist"):
        load_dataset("folder", "train", batch_size=8, data_dir=str(tmp_path))
    (tmp_path / "train").mkdir()
    with pytest.raises(DataError, match="is empty"):
        load_dataset("folder", "train", batch_size=8, data_dir=str(tmp_path))
    _write_image(tmp_path / "train" / "loose.jpg", (1, 2, 3), "jpeg")
    with pytest.raises(DataError, match="no class folders"):
        load_dataset("folder", "train", batch_size=8, data_dir=str(tmp_path))
    (tmp_path / "train" / "ant").mkdir()
    (tmp_path / "train" / "ant" / "readme.md").write_text("no images here")
    with pytest.raises(DataError, match=r"class folder .*ant has no images"):
        load_dataset("folder", "train", batch_size=8, data_dir=str(tmp_path))


def test_folder_splits_must_have_the_same_classes(tmp_path):
    root = _make_tree(tmp_path / "data", per_class=1)
    (root / "val" / "dog").mkdir()
    _write_image(root / "val" / "dog" / "a.jpg", (9, 9, 9), "jpeg")
    with pytest.raises(DataError, match=r"different class folders.*dog"):
        load_dataset("folder", "train", batch_size=8, data_dir=str(root))


# --------------------------------------------------------------------------- Fashion-MNIST IDX files


def _idx_bytes(array):
    return struct.pack(">BBBB", 0, 0, 8, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


def _write_fashion_idx(folder, n_train=30, n_test=10, gz=True):
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        arrays[prefix] = (images, labels)
        for stem, array in ((f"{prefix}-images-idx3-ubyte", images), (f"{prefix}-labels-idx1-ubyte", labels)):
            data = _idx_bytes(array)
            if gz:
                (folder / f"{stem}.gz").write_bytes(gzip.compress(data))
            else:
                (folder / stem).write_bytes(data)
    return arrays


@pytest.mark.parametrize("gz", [True, False])
def test_fashion_mnist_from_idx_files(tmp_path, gz):
    arrays = _write_fashion_idx(tmp_path / "fm", gz=gz)
    spec = load_dataset("fashion_mnist", "train", batch_size=30, data_dir=str(tmp_path / "fm"), shuffle=False)
    assert (spec.num_examples, spec.num_classes, spec.image_size) == (30, 10, 32)
    x, y = _all(spec)
    assert x.shape == (30, 32, 32, 3)
    np.testing.assert_array_equal(y, arrays["train"][1])
    images, labels = raw_examples("fashion_mnist", "test", n=10, data_dir=str(tmp_path / "fm"))
    np.testing.assert_array_equal(np.stack(images)[..., 0], arrays["t10k"][0])


def test_idx_truncated_and_corrupt_files_are_named(tmp_path):
    folder = tmp_path / "fm"
    _write_fashion_idx(folder, gz=False)
    path = folder / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte is truncated"):
        load_dataset("fashion_mnist", "train", batch_size=8, data_dir=str(folder))
    path.write_bytes(b"\x12\x34\x56\x78" + b"\0" * 64)
    with pytest.raises(DataError, match="not an IDX file"):
        load_dataset("fashion_mnist", "train", batch_size=8, data_dir=str(folder))
    path.unlink()
    gz = gzip.compress(_idx_bytes(np.zeros((30, 28, 28), np.uint8)))
    (folder / "train-images-idx3-ubyte.gz").write_bytes(gz[: len(gz) // 2])
    with pytest.raises(DataError, match="truncated or corrupt compressed file"):
        load_dataset("fashion_mnist", "train", batch_size=8, data_dir=str(folder))
    (folder / "train-images-idx3-ubyte.gz").unlink()
    with pytest.raises(DataError, match="no train-images-idx3-ubyte"):
        load_dataset("fashion_mnist", "train", batch_size=8, data_dir=str(folder))


def test_fashion_mnist_without_idx_or_network_says_how(tmp_path, monkeypatch):
    monkeypatch.setattr(fashion_mnist, "_hosts_reachable", lambda urls, timeout=5.0: False)
    with pytest.raises(DataError) as err:
        load_dataset("fashion_mnist", "train", batch_size=8, data_dir=str(tmp_path))
    assert "--data-dir" in str(err.value) and "t10k-images-idx3-ubyte" in str(err.value)


def test_fashion_mnist_failed_download_is_a_data_error(tmp_path, monkeypatch):
    monkeypatch.setattr(fashion_mnist, "_hosts_reachable", lambda urls, timeout=5.0: True)

    def no_network(self, *args, **kwargs):
        raise ConnectionError("name resolution failed")

    monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", no_network)
    with pytest.raises(DataError, match=r"could not download.*--data-dir"):
        load_dataset("fashion_mnist", "test", batch_size=8, data_dir=str(tmp_path))


def test_fashion_mnist_through_tfds(tmp_path, monkeypatch):
    monkeypatch.setattr(fashion_mnist, "_hosts_reachable", lambda urls, timeout=5.0: True)
    with tfds.testing.mock_data(num_examples=12, policy=tfds.testing.MockPolicy.USE_CODE):
        spec = load_dataset("fashion_mnist", "train", batch_size=6, data_dir=str(tmp_path), seed=0,
                            augmentation="paper")
        x, y = _all(spec)
    assert spec.num_examples == 12 and x.shape == (12, 32, 32, 3) and y.max() < 10


def test_make_embedded_regenerates_a_balanced_subset(tmp_path, monkeypatch):
    arrays = _write_fashion_idx(tmp_path / "src", n_train=40, n_test=20)
    monkeypatch.setattr(make_embedded, "PER_CLASS", {"train": 3, "test": 1})
    make_embedded.main(["--source", str(tmp_path / "src"), "--out", str(tmp_path / "out")])
    from bireal_tf.data import idx

    images, labels = idx.read_image_label_pair(str(tmp_path / "out"), "train")
    assert np.bincount(labels).tolist() == [3] * 10
    np.testing.assert_array_equal(images, arrays["train"][0][:30])  # labels cycle 0..9: first 30 = 3 per class
    assert sorted(os.listdir(tmp_path / "out"))[0].endswith(".xz")


# --------------------------------------------------------------------------- ImageNet through TFDS


def _fake_prepared_imagenet(data_dir, num_examples):
    """TFDS metadata of a prepared imagenet2012 (no records): mock_data serves the examples."""
    builder = tfds.builder("imagenet2012", data_dir=str(data_dir))
    builder.info.set_splits(tfds.core.SplitDict([
        tfds.core.SplitInfo(name=name, shard_lengths=[num_examples], num_bytes=0)
        for name in ("train", "validation")
    ]))
    os.makedirs(builder.data_dir, exist_ok=True)
    builder.info.write_to_directory(builder.data_dir)


@pytest.mark.parametrize("split, augmentation", [("test", "none"), ("train", "adam"), ("train", "paper")])
def test_imagenet2012_through_tfds_mock(tmp_path, split, augmentation):
    _fake_prepared_imagenet(tmp_path, num_examples=6)
    with tfds.testing.mock_data(num_examples=6, data_dir=str(tmp_path)):
        spec = load_dataset("imagenet2012", split, batch_size=4, image_size=32, data_dir=str(tmp_path),
                            augmentation=augmentation, seed=3)
        x, y = _all(spec)
    assert (spec.num_classes, spec.num_examples, spec.image_size) == (1000, 6, 32)
    assert spec.class_names[0] == "n01440764" and spec.mean == preprocessing.IMAGENET_MEAN
    assert x.shape == (6, 32, 32, 3) and y.dtype == np.int32 and 0 <= y.min() and y.max() < 1000
    assert np.isfinite(x).all()


def test_imagenet2012_limit(tmp_path):
    _fake_prepared_imagenet(tmp_path, num_examples=6)
    with tfds.testing.mock_data(num_examples=6, data_dir=str(tmp_path)):
        assert load_dataset("imagenet2012", "test", batch_size=2, image_size=32, data_dir=str(tmp_path),
                            limit=4).num_examples == 4
        assert load_dataset("imagenet2012", "test", batch_size=2, image_size=32, data_dir=str(tmp_path),
                            limit=100).num_examples == 6


def test_imagenet2012_not_prepared_says_how(tmp_path):
    with pytest.raises(DataError) as err:
        load_dataset("imagenet2012", "train", batch_size=8, data_dir=str(tmp_path))
    message = str(err.value)
    assert "ILSVRC2012_img_train.tar" in message and "ILSVRC2012_img_val.tar" in message
    assert os.path.join(str(tmp_path), "downloads", "manual") in message
    assert f"python -m bireal_tf.data.prepare_imagenet --data-dir {tmp_path}" in message


def test_prepare_imagenet_needs_the_tars(tmp_path):
    with pytest.raises(DataError, match="ILSVRC2012_img_train.tar, ILSVRC2012_img_val.tar not found"):
        prepare_imagenet2012(str(tmp_path))


@pytest.mark.parametrize("augmentation", ["none", "adam"])
def test_a_stream_started_inside_an_epoch_continues_the_uninterrupted_one(augmentation):
    """start_epoch e, start_step s yields the batches an uninterrupted stream yields from
    epoch e's step s on, and whole epochs after it (what a run resumed mid-epoch trains on)."""
    args = dict(batch_size=8, augmentation=augmentation, image_size=32, seed=3, limit=64,
                steps_per_epoch=5)
    whole = load_dataset("fashion_mnist_embedded", "train", start_epoch=1, **args)
    resumed = load_dataset("fashion_mnist_embedded", "train", start_epoch=1, start_step=3, **args)
    expected = _first_batches(whole, 10)[3:]  # epoch 1 steps 3-4, then epoch 2
    got = _first_batches(resumed, 7)
    for (x, y), (x2, y2) in zip(expected, got):
        np.testing.assert_array_equal(y, y2)
        np.testing.assert_array_equal(x, x2)
    with pytest.raises(DataError, match="start_step"):
        load_dataset("fashion_mnist_embedded", "train", start_epoch=0, start_step=5, **args)
