#!/usr/bin/env python3
"""Classify photos with a Bi-Real Net .tflite: top-5 class names and scores per image.

    pip install ai-edge-litert pillow numpy
    python predict.py model_portable.tflite photo.jpg [more.jpg ...] [--top 5] [--threads 4]

A single file for the device: it needs numpy, Pillow and ai-edge-litert (stock LiteRT),
not TensorFlow and not bireal_tf. `python -m bireal_tf.export MODEL --portable -o M.tflite`
writes it beside the model together with `M.tflite.json`, which holds the class names
and the preprocessing of training (image size, resize rule, mean and std, gray or RGB);
nothing here is specific to a dataset.

A portable file (builtin ops only) runs on stock LiteRT. An LCE file (custom ops
LceBconv2d, LceQuantize) runs where Larq Compute Engine's Python interpreter is
installed (x86-64 and macOS wheels; none for aarch64).

The model runs in a child process, so a file that crashes the interpreter (a corrupt
flatbuffer can) gives a message and exit status 3, not a silent death. Exit status:
0 done, 2 bad input (one line on stderr saying what and how to fix it), 3 crashed.
"""

import argparse
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np

FORMAT = "bireal_tf.predictor/1"
_WORKER_FLAG = "--_worker"


class PredictError(Exception):
    """Bad input: the message says what is wrong and how to fix it."""


def read_metadata(model_path: str) -> dict:
    """The labels and preprocessing written by the export beside the model (`<model>.json`)."""
    path = model_path + ".json"
    if not os.path.isfile(path):
        raise PredictError(f"'{path}' (the labels and preprocessing of '{model_path}') is missing; keep "
                           "the .json the export wrote beside the model, or export again.")
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, ValueError) as err:
        raise PredictError(f"'{path}' is not readable JSON ({err}); export the model again.") from None
    missing = [k for k in ("labels", "image_size", "resize", "mean", "std", "color", "input_scale")
               if k not in meta]
    if meta.get("format") != FORMAT or missing:
        raise PredictError(f"'{path}' is not a bireal_tf predictor file (format {meta.get('format')!r}, "
                           f"missing {missing}); export the model again with this version.")
    return meta


def _has_tflite_identifier(data: bytes) -> bool:
    """Whether `data` carries TFLite's file identifier, by LiteRT's copy of the schema (the
    one the exporter reads with). Without ai-edge-litert the interpreter alone judges."""
    try:
        from ai_edge_litert.schema_py_generated import Model
    except ImportError:
        return True
    return len(data) >= 8 and bool(Model.ModelBufferHasIdentifier(data[:8], 0))


def check_tflite(model_path: str) -> bytes:
    if not os.path.isfile(model_path):
        raise PredictError(f"model file '{model_path}' does not exist.")
    with open(model_path, "rb") as f:
        data = f.read()
    if not _has_tflite_identifier(data):
        raise PredictError(f"'{model_path}' is not a .tflite file (no TFL3 identifier at bytes 4-8); "
                           "pass the .tflite the export wrote.")
    return data


def _resize(channels: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear with antialiasing, in float, channel by channel ([H, W, C] -> [height, width, C])."""
    from PIL import Image

    bilinear = getattr(Image, "Resampling", Image).BILINEAR
    return np.stack([np.asarray(Image.fromarray(np.ascontiguousarray(channels[..., c]), mode="F")
                                .resize((width, height), bilinear), np.float32)
                     for c in range(channels.shape[-1])], axis=-1)


def preprocess(image_path: str, meta: dict) -> np.ndarray:
    """The evaluation transform of training: float32 [S, S, 3], normalized."""
    from PIL import Image, UnidentifiedImageError

    if not os.path.isfile(image_path):
        raise PredictError(f"image '{image_path}' does not exist.")
    try:
        with Image.open(image_path) as image:
            image.load()
            image = image.convert("L" if meta["color"] == "gray" else "RGB")
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise PredictError(f"cannot read image '{image_path}' ({type(err).__name__}: {err}); pass a "
                           "JPEG, PNG or other image Pillow reads.") from None
    x = np.asarray(image, np.float32) * float(meta["input_scale"])
    if x.ndim == 2:
        x = x[..., None]
    size = int(meta["image_size"])
    if meta["resize"] == "stretch":
        x = _resize(x, size, size)
    else:  # shorter side to round(ratio * S), keeping the aspect ratio, then the central S x S
        target = round(size * float(meta["resize_ratio"]))
        h, w = x.shape[:2]
        scale = target / min(h, w)
        x = _resize(x, max(round(h * scale), target), max(round(w * scale), target))
        top, left = (x.shape[0] - size) // 2, (x.shape[1] - size) // 2
        x = x[top: top + size, left: left + size]
    if x.shape[-1] == 1:
        x = np.repeat(x, 3, axis=-1)
    return (x - np.asarray(meta["mean"], np.float32)) / np.asarray(meta["std"], np.float32)


def _lce_interpreter_class():
    """LCE's Python interpreter without importing its converter (and so TensorFlow), or None."""
    import importlib
    import importlib.util
    import types

    spec = importlib.util.find_spec("larq_compute_engine")
    if spec is None or not spec.submodule_search_locations:
        return None
    if "larq_compute_engine" not in sys.modules:  # its __init__ imports the converter (TensorFlow)
        package = types.ModuleType("larq_compute_engine")
        package.__path__ = list(spec.submodule_search_locations)
        sys.modules["larq_compute_engine"] = package
    try:
        return importlib.import_module("larq_compute_engine.tflite.python.interpreter").Interpreter
    except ImportError:
        return None


class _NativeStderrSilenced:
    """Silence what native code writes to stderr (LiteRT's "INFO: Created ... delegate" lines);
    its errors still arrive as Python exceptions, which carry the message."""

    def __enter__(self):
        sys.stderr.flush()
        self._saved = os.dup(2)
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 2)

    def __exit__(self, *exc):
        os.dup2(self._saved, 2)
        os.close(self._saved)


class Model:
    """A .tflite on stock LiteRT, or on LCE's interpreter when it has LCE's custom ops."""

    def __init__(self, model_path: str, data: bytes, threads: int):
        try:
            from ai_edge_litert.interpreter import Interpreter
        except ImportError:
            Interpreter = None
        error = "ai-edge-litert is not installed (pip install ai-edge-litert)"
        if Interpreter is not None:
            try:
                with _NativeStderrSilenced():
                    self.interpreter = Interpreter(model_content=data, num_threads=threads)
                    self.interpreter.allocate_tensors()
                self.runtime = "LiteRT"
                self._in = self.interpreter.get_input_details()[0]
                self._out = self.interpreter.get_output_details()[0]
                return
            except (RuntimeError, ValueError) as err:
                error = " ".join(str(err).split())
        custom = "custom op" in error
        lce = _lce_interpreter_class() if custom or Interpreter is None else None
        if lce is None:
            if custom:
                raise PredictError(
                    f"'{model_path}' uses custom ops that stock LiteRT does not have ({error[:160]}); "
                    "it is an LCE file and needs Larq Compute Engine's interpreter, which is not "
                    "installed here (LCE has no aarch64 wheel). Export a portable file instead: "
                    "python -m bireal_tf.export MODEL --portable -o model_portable.tflite") from None
            raise PredictError(f"LiteRT cannot load '{model_path}': {error[:300]}") from None
        with _NativeStderrSilenced():
            self.interpreter = lce(data, num_threads=threads)
        self.runtime = "Larq Compute Engine"

    def scores(self, x: np.ndarray) -> np.ndarray:
        if self.runtime != "LiteRT":
            return np.asarray(self.interpreter.predict(x[None].astype(np.float32)), np.float32).reshape(-1)
        i, d = self.interpreter, self._in
        if d["dtype"] != np.float32:  # an int8 input: q = round(x / scale) + zero_point
            scale, zero = d["quantization"]
            info = np.iinfo(d["dtype"])
            x = np.clip(np.round(x / scale) + zero, info.min, info.max)
        i.set_tensor(d["index"], x[None].astype(d["dtype"]))
        i.invoke()
        y = i.get_tensor(self._out["index"]).reshape(-1)
        if self._out["dtype"] != np.float32:
            scale, zero = self._out["quantization"]
            y = (y.astype(np.float32) - zero) * scale
        return y.astype(np.float32)


def _probabilities(scores: np.ndarray, meta: dict) -> np.ndarray:
    if meta.get("output") == "probabilities":
        return scores
    e = np.exp(scores - scores.max())
    return e / e.sum()


def run(args) -> int:
    data = check_tflite(args.model)
    meta = read_metadata(args.model)
    images = [(path, preprocess(path, meta)) for path in args.images]  # bad images fail before the model
    model = Model(args.model, data, args.threads)
    labels = meta["labels"]
    for path, x in images:
        start = time.perf_counter()
        p = _probabilities(model.scores(x), meta)
        ms = (time.perf_counter() - start) * 1000
        if len(p) != len(labels):
            raise PredictError(f"'{args.model}' has {len(p)} outputs but its .json names {len(labels)} "
                               "classes; the two files do not belong together.")
        print(f"{path}  ({model.runtime}, {ms:.1f} ms)")
        for k in np.argsort(-p, kind="stable")[: args.top]:
            print(f"  {p[k]:.4f}  {labels[k]}")
    return 0


def _parser():
    p = argparse.ArgumentParser(description="Top-5 classes of images with a Bi-Real Net .tflite "
                                            "(reads <model>.json for labels and preprocessing).")
    p.add_argument("model", help="the .tflite (portable: stock LiteRT; LCE: needs LCE's interpreter)")
    p.add_argument("images", nargs="+", help="image files (JPEG, PNG, ...)")
    p.add_argument("--top", type=int, default=5, help="classes to print per image (default 5)")
    p.add_argument("--threads", type=int, default=1, help="interpreter threads (default 1)")
    return p


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    worker = _WORKER_FLAG in argv
    args = _parser().parse_args([a for a in argv if a != _WORKER_FLAG])
    if args.top < 1 or args.threads < 1:
        _parser().error("--top and --threads take positive integers")
    if worker:
        try:
            return run(args)
        except PredictError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
    # The interpreter runs in a child: a corrupt flatbuffer can kill the process that loads it.
    try:
        done = subprocess.run([sys.executable, os.path.abspath(__file__), _WORKER_FLAG, *argv])
    except OSError:  # no child possible (e.g. under qemu-user without binfmt): run here, unguarded
        return main([_WORKER_FLAG, *argv])
    if done.returncode < 0:
        try:
            name = signal.Signals(-done.returncode).name
        except ValueError:
            name = f"signal {-done.returncode}"
        print(f"error: '{args.model}': the file crashed the TFLite interpreter: it is corrupt ({name}). "
              "Export it again (or, if the file is good, this ai-edge-litert build does not run on "
              "this machine: try another version).", file=sys.stderr)
        return 3
    return done.returncode


if __name__ == "__main__":
    sys.exit(main())
