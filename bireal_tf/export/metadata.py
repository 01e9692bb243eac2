"""What a device needs beside the .tflite: class names and the evaluation preprocessing.

The export writes it as JSON next to the model (`<model>.tflite.json`, `sidecar_path`),
and the predictor (`predict.py`, copied beside it) reads it, so no constant is copied by
hand. The preprocessing is the one bireal_tf.data applies to test images
(`bireal_tf.data.preprocessing.eval_transform`):

    image -> RGB (gray tiled; a gray-trained model sees its photo as gray) -> [0, 1]
    "stretch":     resize to S x S                                   (small images)
    "center_crop": resize the shorter side to round(S * resize_ratio), central S x S
    -> (x - mean) / std per channel

Resizing is bilinear with antialiasing. Keys (`FORMAT` names the version):

    format, dataset, labels, image_size, resize, resize_ratio, mean, std, color,
    input_scale, output ("probabilities" | "logits"), target ("lce" | "portable")
"""

import json
from pathlib import Path

from bireal_tf.export.files import ExportError

__all__ = ["FORMAT", "class_names", "model_metadata", "run_dataset", "sidecar_path"]

FORMAT = "bireal_tf.predictor/1"


def sidecar_path(tflite_path) -> Path:
    """`model.tflite` -> `model.tflite.json`."""
    path = Path(tflite_path)
    return path.with_name(path.name + ".json")


def run_dataset(model_path):
    """(dataset name, data_dir) recorded by the training CLI beside a saved model, or (None, None).

    The CLI writes `summary.json` (and `run.json`) into the run directory that holds
    `model.keras`; a stage's model sits two levels further down.
    """
    if model_path is None:
        return None, None
    path = Path(model_path)
    for folder in [path.parent, *path.parents][:3]:
        summary = folder / "summary.json"
        if summary.is_file():
            try:
                dataset = json.loads(summary.read_text()).get("dataset") or {}
            except (OSError, ValueError):
                continue
            if dataset.get("name"):
                return dataset["name"], dataset.get("data_dir")
    return None, None


def class_names(dataset: str, data_dir=None, num_classes=None) -> list:
    """The class names of `dataset`, in label order; ExportError when they cannot be had."""
    from bireal_tf.data import DATASETS, DataError

    if dataset not in DATASETS:
        raise ExportError(f"Unknown dataset {dataset!r} for the labels; use one of {', '.join(DATASETS)}, "
                          "or pass the class names (labels=[...], CLI --labels FILE, one per line).")
    if dataset.startswith("fashion_mnist"):
        from bireal_tf.data.fashion_mnist import CLASS_NAMES

        return list(CLASS_NAMES)
    try:
        from bireal_tf.data import load_dataset

        names = load_dataset(dataset, "test", batch_size=1, data_dir=data_dir, limit=1).class_names
    except (DataError, OSError, ValueError) as err:
        raise ExportError(f"Could not read the class names of {dataset!r} from data_dir {data_dir!r} "
                          f"({type(err).__name__}: {err}). Pass data_dir (CLI --data-dir), or the class "
                          "names themselves (labels=[...], CLI --labels FILE, one per line).") from err
    return list(names)


def model_metadata(dataset: str, image_size: int, labels, *, output: str, target: str) -> dict:
    """The sidecar's content for a model trained on `dataset` at `image_size` px."""
    from bireal_tf.data.pipeline import profile_for
    from bireal_tf.data.preprocessing import RESIZE_RATIO

    profile = profile_for(dataset)
    return {
        "format": FORMAT,
        "dataset": dataset,
        "labels": [str(name) for name in labels],
        "image_size": int(image_size),
        "resize": "stretch" if profile.small_images else "center_crop",
        "resize_ratio": RESIZE_RATIO,
        "mean": list(profile.mean),
        "std": list(profile.std),
        "color": "gray" if dataset.startswith("fashion_mnist") else "rgb",
        "input_scale": 1.0 / 255.0,
        "output": output,
        "target": target,
    }
