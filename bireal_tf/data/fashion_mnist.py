"""Fashion-MNIST: the subset embedded in the package, a folder of IDX files, or TFDS.

All three end as NumPy arrays held in memory (70,000 images of 28 x 28 bytes
are 55 MB), which the pipeline slices with `from_tensor_slices`.

- "fashion_mnist_embedded": 1,000 training and 200 test images per class,
  the first ones of each class in the original files, in their original order
  (so any prefix, as taken by `limit`, is close to balanced). Made by
  `python -m bireal_tf.data.make_embedded`; see embedded/NOTICE.
- "fashion_mnist": the four IDX files when `data_dir` holds them (no network
  needed), else `tfds.load("fashion_mnist", data_dir=...)`, which downloads
  when the dataset is not prepared. Where the download hosts cannot be
  reached, we stop at once with a DataError instead of letting TFDS retry for
  minutes.
"""
import logging
import os
import socket
from urllib.parse import urlparse

import numpy as np

from bireal_tf.data import idx
from bireal_tf.data.base import DataError

log = logging.getLogger(__name__)

CLASS_NAMES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]
EMBEDDED_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "embedded")

_IDX_HINT = (
    "Pass data_dir (--data-dir DIR) pointing at a folder with the four IDX files "
    "train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz and "
    "t10k-labels-idx1-ubyte.gz; Debian ships them: `apt-get download dataset-fashion-mnist && "
    "dpkg -x dataset-fashion-mnist_*.deb /tmp/fm` and use --data-dir "
    "/tmp/fm/usr/share/datasets/fashion-mnist. Or use the built-in subset: fashion_mnist_embedded."
)


def load_embedded(split):
    """(images uint8 [N, 28, 28], labels int32 [N]) of the embedded subset."""
    if not os.path.isdir(EMBEDDED_DIR):
        raise DataError(
            f"the embedded Fashion-MNIST subset is missing ({EMBEDDED_DIR}). Reinstall bireal_tf, "
            "or regenerate it: python -m bireal_tf.data.make_embedded --source DIR_WITH_IDX_FILES"
        )
    return idx.read_image_label_pair(EMBEDDED_DIR, split)


def load_arrays(split, data_dir=None):
    """(images uint8 [N, 28, 28], labels int32 [N]) of full Fashion-MNIST, from IDX files or TFDS."""
    if data_dir is not None and idx.has_idx_files(data_dir):
        return idx.read_image_label_pair(data_dir, split)
    return _load_tfds(split, data_dir)


def _hosts_reachable(urls, timeout=5.0):
    """True when a TCP connection to the host of the first URL opens within `timeout` seconds."""
    for url in list(urls)[:1]:
        parsed = urlparse(url)
        port = parsed.port or (443 if parsed.scheme == "https" else 80)
        try:
            with socket.create_connection((parsed.hostname, port), timeout=timeout):
                return True
        except OSError:
            return False
    return True  # nothing to probe: let TFDS try


def _load_tfds(split, data_dir):
    import tensorflow_datasets as tfds

    where = data_dir or "TFDS's default data_dir (~/tensorflow_datasets)"
    if data_dir is not None and not os.path.isdir(data_dir):
        raise DataError(f"data_dir {data_dir} does not exist. {_IDX_HINT}")
    builder = tfds.builder("fashion_mnist", data_dir=data_dir)
    if not builder.data_path.exists():
        if not _hosts_reachable(builder.url_infos or {}):
            raise DataError(
                f"Fashion-MNIST is neither in {where} as IDX files nor prepared for TFDS, and TFDS "
                f"cannot download it (its download host is not reachable from this machine). {_IDX_HINT}"
            )
        log.info("Downloading Fashion-MNIST with TFDS into %s", builder.data_dir)
        try:
            builder.download_and_prepare()
        except Exception as err:  # TFDS raises network, checksum and I/O errors of many types
            raise DataError(f"TFDS could not download Fashion-MNIST ({type(err).__name__}: {err}). {_IDX_HINT}") from err
    batches = list(tfds.as_numpy(builder.as_dataset(split=split, as_supervised=True).batch(10000)))
    images = np.concatenate([b[0] for b in batches])[..., 0].astype(np.uint8)
    labels = np.concatenate([b[1] for b in batches]).astype(np.int32)
    return images, labels
