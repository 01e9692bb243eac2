"""Section 2: input pipeline throughput from real JPEG files, against what training consumes.

The benchmark writes a folder tree DIR/train/<class>/*.jpg of synthetic
photo-like JPEGs (multi-scale smooth noise plus fine grain, quality 90, sizes
like ImageNet's ~375x500, ~100 KB) and reads it with
`bireal_tf.data.load_dataset("folder", "train", augmentation=...)`, as training
would.

1. Pipeline alone: images/s of the "adam" and "paper" augmentations, batches
   of `pipeline_batch` at `pipeline_size`. Each repeat opens a fresh iterator,
   lets it run `WARM_BATCHES` batches untimed, times `pipeline_batches`
   batches, and closes it, so no idle iterator refills its buffers in the
   background while the other side is timed.
2. Pipeline feeding training: our Bi-Real-18 train step fed by the Adam
   pipeline (default tf.data options, and with tf.data confined to a private
   one-thread pool) against the same step on an in-memory batch, round robin,
   each repeat with a fresh iterator and one untimed step. This is the direct
   answer to "is the pipeline the bottleneck?" on this machine, where the
   pipeline and the train step share the cores.
"""
import os
import shutil
import tempfile
from typing import Dict, Optional

import numpy as np

from benchmarks.common import Settings, Stopwatch, collect, log, round_robin, summarize
from benchmarks.training import TrainCase, TrainConfig

WARM_BATCHES = 2
NUM_CLASSES_ON_DISK = 8


def _textures(rng, n: int, h: int, w: int) -> np.ndarray:
    """n smooth multi-scale colour textures [n, h, w, 3], float around 0."""
    import tensorflow as tf

    out = np.zeros((n, h, w, 3), np.float32)
    for cells, weight in ((4, 80.0), (16, 40.0), (64, 22.0), (160, 12.0)):
        coarse = rng.standard_normal((n, max(2, cells * h // w) + 2, cells + 2, 3)).astype(np.float32)
        out += weight * tf.image.resize(coarse, (h, w), method="bicubic").numpy()
    return out


def write_jpegs(root: str, count: int, shape, seed: int = 0) -> dict:
    """`count` photo-like JPEGs in root/train/<class>/ (and one per class in root/val/).

    16 smooth multi-scale textures, each file one of them rolled by a random
    offset, flipped, tinted, with fresh sensor grain: distinct files whose
    JPEG size per pixel is close to ImageNet's (~0.5 byte/pixel).
    """
    import tensorflow as tf

    rng = np.random.default_rng(seed)
    h, w = shape
    bases = _textures(rng, min(16, count), h, w)
    sizes = []
    for i in range(count + NUM_CLASSES_ON_DISK):
        split = "train" if i < count else "val"
        folder = os.path.join(root, split, f"class_{i % NUM_CLASSES_ON_DISK:02d}")
        os.makedirs(folder, exist_ok=True)
        image = np.roll(bases[i % len(bases)], (rng.integers(h), rng.integers(w)), axis=(0, 1))
        if rng.random() < 0.5:
            image = image[:, ::-1]
        image = image + rng.normal(0.0, 10.0, image.shape).astype(np.float32)  # sensor grain
        image = np.clip(image + 120.0 + rng.uniform(-30, 30, 3), 0, 255).astype(np.uint8)
        data = tf.io.encode_jpeg(image, quality=90).numpy()
        with open(os.path.join(folder, f"img_{i:05d}.jpg"), "wb") as f:
            f.write(data)
        if split == "train":
            sizes.append(len(data))
    mean = float(np.mean(sizes))
    return {"count": count, "height": h, "width": w, "classes": NUM_CLASSES_ON_DISK,
            "mean_kib": round(mean / 1024, 1), "bytes_per_pixel": round(mean / (h * w), 3),
            "quality": 90}


def _load(data_dir, settings: Settings, augmentation: str, batch: int, size: int,
          one_hot: Optional[int] = None, threadpool: Optional[int] = None):
    import tensorflow as tf

    from bireal_tf.data import load_dataset

    spec = load_dataset("folder", "train", batch_size=batch, image_size=size,
                        augmentation=augmentation, data_dir=data_dir, repeat=True,
                        drop_remainder=True)
    ds = spec.dataset
    if one_hot:
        ds = ds.map(lambda x, y: (x, tf.one_hot(y, one_hot)), num_parallel_calls=tf.data.AUTOTUNE)
    if threadpool:
        options = tf.data.Options()
        options.threading.private_threadpool_size = int(threadpool)
        ds = ds.with_options(options)
    return ds


def _pipeline_repeat(data_dir, settings: Settings, augmentation: str):
    def run() -> float:
        ds = _load(data_dir, settings, augmentation, settings.pipeline_batch, settings.pipeline_size)
        it = iter(ds)
        for _ in range(WARM_BATCHES):
            next(it)
        watch = Stopwatch()
        for _ in range(settings.pipeline_batches):
            images, _labels = next(it)
        _ = images.shape  # the batch is materialised when next() returns
        seconds = watch.seconds
        del it
        collect()
        return settings.pipeline_batches * settings.pipeline_batch / seconds

    return run


def _feed_repeat(case: TrainCase, make_dataset, steps: int):
    def run() -> float:
        iterator = iter(make_dataset())
        view = case.with_iterator(iterator, calls=1)
        view._call(1)  # untimed: the pipeline fills its buffers while this step runs
        watch = Stopwatch()
        view._call(steps)
        value = steps * case.cfg.batch / watch.seconds
        del view, iterator
        collect()
        return value

    return run


def run(settings: Settings, training_results: Optional[dict] = None, feed: bool = True,
        feed_precision: str = "float32") -> dict:
    import tensorflow as tf

    from benchmarks.training import consumption, in_memory_dataset

    root = tempfile.mkdtemp(prefix="bireal_bench_jpegs_")
    try:
        watch = Stopwatch()
        files = write_jpegs(root, settings.jpeg_count, settings.jpeg_shape)
        files["write_seconds"] = round(watch.seconds, 1)
        log(f"pipeline: wrote {files['count']} JPEGs of {files['height']}x{files['width']} "
            f"(mean {files['mean_kib']} KiB) in {files['write_seconds']} s")

        samples = round_robin({aug: _pipeline_repeat(root, settings, aug) for aug in ("adam", "paper")},
                              settings.repeats, settings.warmup, log=log)
        rates = {aug: summarize(v) for aug, v in samples.items()}

        result = {
            "files": files,
            "batch": settings.pipeline_batch,
            "size": settings.pipeline_size,
            "cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "method": (f"load_dataset('folder', 'train', augmentation=...), batch "
                       f"{settings.pipeline_batch}, {settings.pipeline_size}x{settings.pipeline_size}; "
                       f"fresh iterator per repeat, {WARM_BATCHES} batches untimed, then "
                       f"{settings.pipeline_batches} timed; adam/paper alternate"),
            "pipeline_images_per_second": rates,
        }

        # What the training step consumes at this size (section 1 of this or an earlier run).
        consumed = consumption(training_results, settings.pipeline_size)
        result["training_consumption"] = {k: v for k, v in consumed.items()
                                          if k in ("ours", "ours_bf16")}
        comparisons = []
        for case, rate in result["training_consumption"].items():
            for aug in rates:
                comparisons.append({"augmentation": aug, "training_case": case,
                                    "pipeline": rates[aug]["median"], "consumption": rate,
                                    "headroom": round(rates[aug]["median"] / rate, 3)})
        result["headroom"] = comparisons

        if feed:
            cfg = TrainConfig("feed", "ours", settings.pipeline_size, settings.pipeline_batch,
                              precision=feed_precision)
            log(f"pipeline: feeding ours ({feed_precision}) from the Adam pipeline")
            case = TrainCase(cfg, settings.num_classes, 0.0).setup()
            n = settings.num_classes
            makers = {
                "in_memory": lambda: in_memory_dataset(cfg, n),
                "adam_pipeline": lambda: _load(root, settings, "adam", cfg.batch, cfg.size, one_hot=n),
                "adam_pipeline_1thread": lambda: _load(root, settings, "adam", cfg.batch, cfg.size,
                                                       one_hot=n, threadpool=1),
            }
            feed_samples = round_robin(
                {name: _feed_repeat(case, make, settings.feed_steps) for name, make in makers.items()},
                settings.repeats, 0, log=log)  # every repeat starts with its own untimed step
            fed = {name: summarize(v) for name, v in feed_samples.items()}
            base = fed["in_memory"]["median"]
            result["feeding"] = {
                "precision": feed_precision,
                "steps_per_repeat": settings.feed_steps,
                "method": ("our Bi-Real-18 train function fed by each source; fresh iterator per "
                           "repeat, one untimed step, then the timed steps; sources alternate"),
                "images_per_second": fed,
                "relative_to_in_memory": {k: round(v["median"] / base, 4) for k, v in fed.items()},
                "options": {"adam_pipeline": "load_dataset defaults (AUTOTUNE everywhere)",
                            "adam_pipeline_1thread":
                                "tf.data.Options().threading.private_threadpool_size = 1"},
            }
            watch = Stopwatch()
            del case
            tf.keras.backend.clear_session()
            collect()
            log(f"pipeline: released the model in {watch.seconds:.1f} s")
        return result
    finally:
        shutil.rmtree(root, ignore_errors=True)


def bottleneck_verdict(result: dict) -> Dict[str, str]:
    """Plain words: does the pipeline keep up with training here?"""
    out = {}
    for row in result.get("headroom", []):
        key = f"{row['augmentation']} vs {row['training_case']}"
        h = row["headroom"]
        if h >= 2:
            out[key] = f"{h:.1f}x the consumption: meets the 2x target"
        elif h >= 1:
            out[key] = f"{h:.2f}x the consumption: keeps up, but short of 2x by {2 - h:.2f}x"
        else:
            out[key] = f"{h:.2f}x the consumption: the pipeline is the bottleneck"
    return out
