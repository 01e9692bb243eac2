"""Top-1 / top-5 of a Keras model or of its LCE .tflite on bireal_tf.data's datasets.

    python -m bireal_tf.evaluate runs/demo/model.keras  --dataset fashion_mnist_embedded
    python -m bireal_tf.evaluate runs/demo/model.tflite --dataset fashion_mnist_embedded --json eval.json

    from bireal_tf.evaluate import evaluate
    result = evaluate("model.tflite", "fashion_mnist_embedded", limit=1000)
    result["top1"], result["top5"]

Evaluation preprocessing: the dataset's "test" split (or `split`), no
augmentation (`augmentation="none"`: resize / center crop and normalise as
bireal_tf.data does for evaluation). A .tflite runs through LCE's Python
interpreter (`larq_compute_engine.testing.Interpreter`), which knows the LCE
ops; it has a fixed input shape (batch 1 for models converted by
`bireal_tf.export`) and no resize call, so each batch is fed sample by sample.
On x86-64 that interpreter uses LCE's portable kernels: correct, not fast.
A portable file (`python -m bireal_tf.export --portable`: builtin ops only)
runs through stock LiteRT (`ai_edge_litert`), as on a device.

Accuracies are fractions in [0, 1]. top-5 is top-min(5, classes). Hits are
counted by `bireal_tf.metrics.top_k_hits`, as the training loop's `top1` and
`top5` count them: tied scores rank by class index, lowest first, so the top k
are always k classes.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

__all__ = ["EvaluationError", "evaluate", "main"]


class EvaluationError(ValueError):
    """The model cannot be evaluated on the dataset as asked; the message says why and the fix."""


def _is_tflite_path(path: Path) -> bool:
    if path.suffix.lower() == ".tflite":
        return True
    if path.is_file():
        from bireal_tf.export.schema import has_tflite_identifier

        with open(path, "rb") as f:
            return has_tflite_identifier(f.read(8))
    return False


def _load(model_or_path, allow_non_lce, num_threads):
    """('keras' | 'tflite', model or TFLiteRunner, description, op histogram or None)."""
    import tensorflow as tf

    from bireal_tf.export.files import (ModelFileError, check_tflite, first_line, load_keras_model,
                                        read_flatbuffer_file)
    from bireal_tf.export.flatbuffer import LCE_OPS, op_histogram
    from bireal_tf.export.portable import is_portable_file
    from bireal_tf.export.runtime import LiteRTRunner, TFLiteRunner

    if isinstance(model_or_path, tf.keras.Model):
        return "keras", model_or_path, f"<in-memory Keras model '{model_or_path.name}'>", None
    if isinstance(model_or_path, (bytes, bytearray)):
        flatbuffer, source = bytes(model_or_path), "<in-memory .tflite>"
        check_tflite(flatbuffer, source)  # a corrupt file must not kill this process
    elif isinstance(model_or_path, (str, Path)):
        path = Path(model_or_path)
        if not _is_tflite_path(path):
            return "keras", load_keras_model(path), str(path), None
        flatbuffer, source = read_flatbuffer_file(path), str(path)
    else:
        raise EvaluationError(
            "model_or_path must be a Keras model, a .tflite's bytes, or the path of a .keras / "
            f".h5 / SavedModel / .tflite; got {type(model_or_path).__name__}."
        )
    histogram = dict(op_histogram(flatbuffer))
    if is_portable_file(flatbuffer):
        try:
            runner = LiteRTRunner(flatbuffer, num_threads=num_threads or 1, source=source)
            return "tflite", runner, source, histogram
        except (RuntimeError, ValueError) as err:
            raise ModelFileError(f"LiteRT cannot load the portable file '{source}' ({first_line(err)}); "
                                 "it may be corrupt. Export it again with `python -m bireal_tf.export "
                                 "MODEL --portable`.") from err
    if not any(op in histogram for op in LCE_OPS) and not allow_non_lce:
        raise EvaluationError(
            f"'{source}' contains no LCE op (LceBconv2d, LceQuantize, ...): it is not an LCE binary "
            "model (a plain TFLite model, or one whose binary convs stayed float). Export the "
            "binary network with `python -m bireal_tf.export`, or pass --allow-non-lce "
            "(allow_non_lce=True) to evaluate it anyway."
        )
    try:
        runner = TFLiteRunner(flatbuffer, num_threads=num_threads or 1, source=source)
    except ModelFileError:
        raise
    except Exception as err:
        raise ModelFileError(
            f"LCE's interpreter cannot load '{source}' ({type(err).__name__}: "
            f"{(str(err).strip().splitlines() or [''])[0][:300]}); the file may be corrupt. "
            "Export it again with `python -m bireal_tf.export`."
        ) from err
    return "tflite", runner, source, histogram


def _dataset(dataset, split, data_dir, image_size, batch_size, limit):
    if hasattr(dataset, "dataset") and hasattr(dataset, "num_classes"):
        return dataset
    if not isinstance(dataset, str):
        raise EvaluationError(
            f"dataset must be a DatasetSpec or a dataset name, got {type(dataset).__name__}."
        )
    from bireal_tf.data import load_dataset

    return load_dataset(dataset, split, batch_size=batch_size, image_size=image_size,
                        augmentation="none", data_dir=data_dir, limit=limit, shuffle=False)


def _fmt(shape):
    return "x".join("?" if d is None else str(d) for d in shape)


def _check_compatible(kind, model, source, spec):
    channels = getattr(spec, "channels", 3) or 3
    data_shape = (spec.image_size, spec.image_size, channels)
    if kind == "tflite":
        expected = tuple(model.input_shape[1:])
        classes = model.output_shape[-1]
    else:
        if len(model.inputs) != 1:
            raise EvaluationError(f"'{source}' has {len(model.inputs)} inputs; evaluate needs one.")
        expected = tuple(model.inputs[0].shape[1:])
        classes = model.outputs[0].shape[-1]
    fits = len(expected) == 3 and all(e is None or e == d for e, d in zip(expected, data_shape))
    if not fits:
        fix = ""
        if len(expected) == 3 and expected[0] is not None and expected[0] == expected[1]:
            fix = (f" Pass --image-size {expected[0]} (evaluate(..., image_size={expected[0]})) "
                   "to resize the images to the model's input.")
        elif len(expected) == 3 and expected[0] != expected[1]:
            fix = " The model's input is not square; bireal_tf.data yields square images."
        if len(expected) == 3 and expected[2] is not None and expected[2] != channels:
            fix += f" The model wants {expected[2]} channels; the dataset has {channels}."
        raise EvaluationError(
            f"'{source}' expects inputs of shape {_fmt(expected)} but dataset '{spec.name}' yields "
            f"{_fmt(data_shape)} images.{fix}"
        )
    if classes is not None and classes != spec.num_classes:
        raise EvaluationError(
            f"'{source}' has {classes} outputs but dataset '{spec.name}' has {spec.num_classes} "
            "classes; evaluate the model on the dataset it was trained for."
        )


def evaluate(
    model_or_path,
    dataset="fashion_mnist_embedded",
    *,
    split="test",
    data_dir=None,
    image_size=None,
    batch_size=64,
    limit=None,
    allow_non_lce=False,
    num_threads=None,
    progress=None,
) -> dict:
    """Top-1 and top-5 accuracy of a Keras model or an LCE .tflite on a dataset.

    Args:
        model_or_path: a Keras model; the path of a saved one (.keras / .h5 /
            SavedModel directory); the path (or bytes) of a .tflite.
        dataset: a DatasetSpec from `bireal_tf.data.load_dataset`, used as it is,
            or a dataset name (loaded with `split`, `augmentation="none"`, no shuffle,
            `image_size`, `batch_size`, `data_dir`, `limit`).
        allow_non_lce: evaluate a .tflite that holds no LCE op (refused by default).
        num_threads: LCE interpreter threads (default 1: on a loaded x86 host LCE's
            portable kernels were slower with 2 threads than with 1).
        progress: optional callable(examples_done, running_top1) called per batch.

    Returns:
        dict: top1, top5 (fractions), top5_k, correct_top1, correct_top5,
        num_examples, num_classes, dataset, split, image_size, model, model_kind
        ("keras" | "tflite"), runtime (None for Keras, "lce" for LCE's interpreter,
        "litert" for a portable file), seconds, examples_per_second.

    Raises:
        EvaluationError (input shape or classes do not fit, not an LCE model),
        bireal_tf.export.ModelFileError (missing / corrupt file),
        bireal_tf.data.DataError (dataset problems).
    """
    from bireal_tf.metrics import top_k_hits

    kind, model, source, _ = _load(model_or_path, allow_non_lce, num_threads)
    spec = _dataset(dataset, split, data_dir, image_size, batch_size, limit)
    _check_compatible(kind, model, source, spec)
    k = min(5, int(spec.num_classes))

    n = top1 = topk = 0
    start = time.perf_counter()
    for images, labels in spec.dataset:
        if kind == "keras":
            scores = np.asarray(model(images, training=False))
        else:
            scores = model.predict(np.asarray(images))
        scores = scores.reshape(scores.shape[0], -1)
        labels = np.asarray(labels).reshape(-1).astype(np.int64)
        top1 += int(np.sum(top_k_hits(labels, scores, 1).numpy()))
        topk += int(np.sum(top_k_hits(labels, scores, k).numpy()))
        n += int(labels.shape[0])
        if progress is not None:
            progress(n, top1 / max(1, n))
    seconds = time.perf_counter() - start
    if n == 0:
        raise EvaluationError(f"Dataset '{spec.name}' ({split}) yielded no examples.")
    return {
        "top1": top1 / n,
        "top5": topk / n,
        "top5_k": k,
        "correct_top1": top1,
        "correct_top5": topk,
        "num_examples": n,
        "num_classes": int(spec.num_classes),
        "dataset": spec.name,
        "split": getattr(spec, "split", split) or split,
        "image_size": int(spec.image_size),
        "model": source,
        "model_kind": kind,
        "runtime": None if kind == "keras" else model.runtime,
        "seconds": round(seconds, 3),
        "examples_per_second": round(n / seconds, 2) if seconds > 0 else None,
    }


def _parser():
    p = argparse.ArgumentParser(
        prog="python -m bireal_tf.evaluate",
        description="Top-1 / top-5 of a Keras model or an LCE .tflite on a bireal_tf.data dataset.",
    )
    p.add_argument("model", metavar="MODEL_OR_TFLITE",
                   help=".keras / .h5 / SavedModel directory, or a .tflite (run by LCE's interpreter)")
    p.add_argument("--dataset", default="fashion_mnist_embedded",
                   help="dataset name (default fashion_mnist_embedded); see bireal_tf.data.DATASETS")
    p.add_argument("--split", default="test", help="split to evaluate (default test)")
    p.add_argument("--data-dir", help="where the dataset lives (TFDS dir, IDX files, folder tree)")
    p.add_argument("--image-size", type=int, help="resize to this size (default: the dataset's)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--limit", type=int, help="evaluate the first N examples only")
    p.add_argument("--threads", type=int, help="LCE interpreter threads (default 1)")
    p.add_argument("--allow-non-lce", action="store_true",
                   help="evaluate a .tflite even if it holds no LCE op")
    p.add_argument("--json", metavar="OUT", help="also write the result as JSON (atomically)")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    return p


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    import bireal_tf  # noqa: F401  (Keras 2 first)
    from bireal_tf.data import DataError
    from bireal_tf.export.files import ModelFileError, check_output_path
    from bireal_tf.utils import EXIT_WRITE_ERROR, OutputWriteError, atomic_write_text

    last = [0.0]

    def progress(done, running):
        now = time.perf_counter()
        if not args.quiet and now - last[0] > 10:
            last[0] = now
            print(f"  {done} examples, running top-1 {running:.4f}", file=sys.stderr)

    try:
        if args.json:
            check_output_path(args.json, "JSON output")
        result = evaluate(args.model, args.dataset, split=args.split, data_dir=args.data_dir,
                          image_size=args.image_size, batch_size=args.batch_size, limit=args.limit,
                          allow_non_lce=args.allow_non_lce, num_threads=args.threads,
                          progress=progress)
    except (EvaluationError, ModelFileError, DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    kind = result["model_kind"] + (f", {result['runtime']}" if result["runtime"] else "")
    print(f"{result['model']} ({kind}) on {result['dataset']}/{result['split']} "
          f"at {result['image_size']}px: top-1 {result['top1']:.4f}  top-{result['top5_k']} "
          f"{result['top5']:.4f}  ({result['num_examples']} examples, {result['seconds']:.1f} s)")
    if args.json:
        try:
            atomic_write_text(args.json, json.dumps(result, indent=2) + "\n")
        except OutputWriteError as err:  # a full disk, a read-only directory
            print(f"error: {err}", file=sys.stderr)
            return EXIT_WRITE_ERROR
    return 0


if __name__ == "__main__":
    sys.exit(main())
