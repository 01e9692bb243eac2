"""Reader and writer for the IDX format of (Fashion-)MNIST.

An IDX file is a 4-byte magic number, then one big-endian uint32 per dimension,
then the values in C order, big-endian:

    byte 0, 1   always 0
    byte 2      value type: 0x08 uint8, 0x09 int8, 0x0B int16, 0x0C int32,
                0x0D float32, 0x0E float64
    byte 3      number of dimensions

Files may be stored raw, gzip-compressed (as the upstream and Debian files are)
or xz-compressed (as the embedded subset is, which is 14% smaller than gzip);
the compression is recognised from the first bytes, not from the file name.
Every check failure raises `DataError` naming the file and what to do about it.
"""
import gzip
import lzma
import os
import struct
import zlib

import numpy as np

from bireal_tf.data.base import DataError

_TYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_GZIP_MAGIC = b"\x1f\x8b"
_XZ_MAGIC = b"\xfd7zXZ\x00"

_REFETCH = (
    "The file is damaged or incomplete: fetch it again (for Fashion-MNIST, "
    "`apt-get download dataset-fashion-mnist && dpkg -x dataset-fashion-mnist_*.deb DIR` "
    "puts the four files in DIR/usr/share/datasets/fashion-mnist/)."
)


def _read_bytes(path):
    """The file's bytes, decompressed when it starts with a gzip or xz header."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as err:
        raise DataError(f"cannot read IDX file {path}: {err}. Check the path and its permissions.") from err
    try:
        if raw.startswith(_GZIP_MAGIC):
            return gzip.decompress(raw)
        if raw.startswith(_XZ_MAGIC):
            return lzma.decompress(raw)
    except (OSError, EOFError, zlib.error, lzma.LZMAError) as err:
        raise DataError(f"{path} is a truncated or corrupt compressed file ({err}). {_REFETCH}") from err
    return raw


def read_idx(path):
    """Parse one IDX file into a NumPy array in native byte order.

    Validates the magic number, the value type and that the payload holds
    exactly prod(dims) values (a short payload means a truncated download).
    """
    data = _read_bytes(path)
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _TYPES:
        raise DataError(
            f"{path} is not an IDX file: its magic number is {data[:4].hex() or 'missing'}, "
            "expected 0000 followed by a type byte (08 for uint8) and the number of dimensions. "
            "Pass the original *-ubyte or *-ubyte.gz files."
        )
    dtype, ndim = _TYPES[data[2]], data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{path} is truncated inside its header ({len(data)} bytes). {_REFETCH}")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    found = len(data) - header
    if found != expected:
        what = "truncated" if found < expected else "longer than its header says"
        raise DataError(
            f"{path} is {what}: its header announces shape {dims} ({expected} bytes of values) "
            f"but it holds {found}. {_REFETCH}"
        )
    array = np.frombuffer(data, dtype=dtype, offset=header).reshape(dims)
    return array.astype(dtype.newbyteorder("="))


def write_idx(path, array, *, compress=None):
    """Write `array` as an IDX file; compress is None, "gzip" or "xz"."""
    array = np.asarray(array)
    codes = {dt.newbyteorder("="): code for code, dt in _TYPES.items()}
    code = codes.get(array.dtype.newbyteorder("="))
    if code is None:
        raise ValueError(f"IDX cannot store dtype {array.dtype}")
    payload = struct.pack(f">BBBB{array.ndim}I", 0, 0, code, array.ndim, *array.shape)
    payload += array.astype(_TYPES[code]).tobytes()
    if compress == "gzip":
        payload = gzip.compress(payload, compresslevel=9, mtime=0)
    elif compress == "xz":
        payload = lzma.compress(payload, preset=9 | lzma.PRESET_EXTREME)
    elif compress is not None:
        raise ValueError(f"compress must be None, 'gzip' or 'xz', not {compress!r}")
    with open(path, "wb") as f:
        f.write(payload)


# The four Fashion-MNIST files, keyed by split; the same names as MNIST's.
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_SUFFIXES = ("", ".gz", ".xz")


def find_idx_file(directory, stem):
    """Path of `stem`, `stem.gz` or `stem.xz` inside `directory`, or None."""
    for suffix in _SUFFIXES:
        path = os.path.join(directory, stem + suffix)
        if os.path.isfile(path):
            return path
    return None


def has_idx_files(directory):
    """True when `directory` holds at least one of the four Fashion-MNIST IDX files."""
    stems = [stem for pair in FASHION_MNIST_FILES.values() for stem in pair]
    return any(find_idx_file(directory, stem) for stem in stems)


def read_image_label_pair(directory, split, *, num_classes=10):
    """(images uint8 [N, H, W], labels int32 [N]) of one split of an MNIST-style folder."""
    paths = []
    for stem in FASHION_MNIST_FILES[split]:
        path = find_idx_file(directory, stem)
        if path is None:
            raise DataError(
                f"{directory} has no {stem}[.gz] file. A Fashion-MNIST folder needs all four IDX files: "
                + ", ".join(s + "[.gz]" for pair in FASHION_MNIST_FILES.values() for s in pair)
                + "."
            )
        paths.append(path)
    images, labels = read_idx(paths[0]), read_idx(paths[1])
    if images.ndim != 3 or images.dtype != np.uint8:
        raise DataError(f"{paths[0]} holds {images.dtype} values of shape {images.shape}; "
                        "expected uint8 images [N, height, width]. Is it an images file?")
    if labels.ndim != 1:
        raise DataError(f"{paths[1]} holds shape {labels.shape}; expected labels [N]. Is it a labels file?")
    if len(images) != len(labels):
        raise DataError(f"{paths[0]} has {len(images)} images but {paths[1]} has {len(labels)} labels; "
                        "the two files come from different sets. Fetch them again together.")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(f"{paths[1]} has labels outside 0..{num_classes - 1}; it is not a Fashion-MNIST labels file.")
    return images, labels.astype(np.int32)
