"""Regenerate the embedded Fashion-MNIST subset (bireal_tf/data/embedded/) from the original IDX files.

    apt-get download dataset-fashion-mnist && dpkg -x dataset-fashion-mnist_*.deb /tmp/fm
    python -m bireal_tf.data.make_embedded --source /tmp/fm/usr/share/datasets/fashion-mnist

Selection: the first 1,000 training and the first 200 test images of every
class, kept in their original order. Storage: the four IDX files, xz-compressed
(4.3 MiB in all; gzip would need 5.0 MiB). The output depends only on the
source files: the script prints the SHA-256 of each uncompressed file to
compare with embedded/NOTICE.
"""
import argparse
import hashlib
import lzma
import os

import numpy as np

from bireal_tf.data import idx
from bireal_tf.data.fashion_mnist import EMBEDDED_DIR

PER_CLASS = {"train": 1000, "test": 200}


def first_per_class(labels, per_class, num_classes=10):
    """Indices of the first `per_class` examples of each class, in ascending (original) order."""
    picked = [np.flatnonzero(labels == c)[:per_class] for c in range(num_classes)]
    short = [c for c, p in enumerate(picked) if len(p) < per_class]
    if short:
        raise SystemExit(f"classes {short} have fewer than {per_class} examples in the source")
    return np.sort(np.concatenate(picked))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", required=True, help="folder with the four Fashion-MNIST *-ubyte[.gz] files")
    parser.add_argument("--out", default=EMBEDDED_DIR, help="output folder (default: the package's embedded/)")
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    for split, (images_stem, labels_stem) in idx.FASHION_MNIST_FILES.items():
        images, labels = idx.read_image_label_pair(args.source, split)
        keep = first_per_class(labels, PER_CLASS[split])
        for stem, array in ((images_stem, images[keep]), (labels_stem, labels[keep].astype(np.uint8))):
            path = os.path.join(args.out, stem + ".xz")
            idx.write_idx(path, array, compress="xz")
            digest = hashlib.sha256(lzma.open(path).read()).hexdigest()
            print(f"{path}: {array.shape} {os.path.getsize(path)} bytes, sha256 of the IDX data {digest}")


if __name__ == "__main__":
    main()
