"""Prepare TFDS's imagenet2012 from the two manually downloaded tars (run once; takes hours).

    python -m bireal_tf.data.prepare_imagenet --data-dir ~/tensorflow_datasets
    # reads DATA_DIR/downloads/manual/ILSVRC2012_img_{train,val}.tar unless --manual-dir says otherwise
"""
import argparse
import sys

from bireal_tf.data.base import DataError
from bireal_tf.data.imagenet import prepare_imagenet2012


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=None, help="TFDS data_dir (default ~/tensorflow_datasets)")
    parser.add_argument("--manual-dir", default=None, help="folder with the tars (default DATA_DIR/downloads/manual)")
    args = parser.parse_args(argv)
    try:
        builder = prepare_imagenet2012(args.data_dir, args.manual_dir)
    except DataError as err:
        sys.exit(f"error: {err}")
    print(f"imagenet2012 prepared in {builder.data_dir}: {builder.info.splits}")


if __name__ == "__main__":
    main()
