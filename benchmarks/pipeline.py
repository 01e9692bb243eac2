"""Input pipeline throughput from real JPEG files, against what training consumes.

A folder tree DIR/train/<class>/*.jpg of synthetic photo-like JPEGs (multi-scale
smooth noise plus grain, quality 90, ImageNet-like ~375x500) is read by
`bireal_tf.data.load_dataset("folder", "train", augmentation=...)`, as training
reads it.

1. Pipeline alone: images/s of the "adam" and "paper" augmentations. Each repeat
   opens a fresh iterator, runs `WARM_BATCHES` batches untimed, times
   `pipeline_batches` batches and closes it, so no idle iterator refills its
   buffers while the other side is timed.
2. Pipeline feeding training: our Bi-Real-18 train step (mixed_bfloat16, the
   faster consumer, so the harder test) fed by the Adam pipeline (default
   tf.data options, and tf.data on a private one-thread pool) against the same
   step on an in-memory batch; each repeat a fresh iterator and one untimed step.
   This answers "is the pipeline the bottleneck?" where pipeline and step share
   the cores.
"""
import os
import shutil
import tempfile

import numpy as np

from benchmarks.common import Timer, f1, log, round_robin, spread, summarize, table, times
from benchmarks.training import TrainCase, TrainConfig, consumption, in_memory_dataset

TITLE = "Input pipeline (images/s)"
TARGET = "input pipeline >= 2x the images/s the training step consumes, on 2 cores"
WARM_BATCHES = 2
CLASSES_ON_DISK = 8
FEED_PRECISION = "mixed_bfloat16"
FEED_OPTIONS = {"in_memory": "reference: no input pipeline",
                "adam_pipeline": "load_dataset defaults (AUTOTUNE everywhere)",
                "adam_pipeline_1thread": "tf.data.Options().threading.private_threadpool_size = 1"}


def write_jpegs(root: str, count: int, shape, seed: int = 0) -> dict:
    """`count` photo-like JPEGs in root/train/<class>/ (and one per class in root/val/).

    16 smooth multi-scale textures; each file is one of them rolled, maybe flipped,
    tinted, with fresh grain: distinct files of about ImageNet's bytes per pixel.
    """
    import tensorflow as tf

    rng = np.random.default_rng(seed)
    h, w = shape
    n = min(16, count)
    bases = np.zeros((n, h, w, 3), np.float32)
    for cells, weight in ((4, 80.0), (16, 40.0), (64, 22.0), (160, 12.0)):
        coarse = rng.standard_normal((n, max(2, cells * h // w) + 2, cells + 2, 3)).astype(np.float32)
        bases += weight * tf.image.resize(coarse, (h, w), method="bicubic").numpy()
    sizes = []
    for i in range(count + CLASSES_ON_DISK):
        split = "train" if i < count else "val"
        folder = os.path.join(root, split, f"class_{i % CLASSES_ON_DISK:02d}")
        os.makedirs(folder, exist_ok=True)
        image = np.roll(bases[i % n], (rng.integers(h), rng.integers(w)), axis=(0, 1))
        if rng.random() < 0.5:
            image = image[:, ::-1]
        image = image + rng.normal(0.0, 10.0, image.shape).astype(np.float32)
        image = np.clip(image + 120.0 + rng.uniform(-30, 30, 3), 0, 255).astype(np.uint8)
        data = tf.io.encode_jpeg(image, quality=90).numpy()
        with open(os.path.join(folder, f"img_{i:05d}.jpg"), "wb") as f:
            f.write(data)
        sizes.append(len(data))
    mean = float(np.mean(sizes[:count]))
    return {"count": count, "height": h, "width": w, "classes": CLASSES_ON_DISK, "quality": 90,
            "mean_kib": round(mean / 1024, 1), "bytes_per_pixel": round(mean / (h * w), 3)}


def _load(root, augmentation, batch, size, one_hot=None, threadpool=None):
    import tensorflow as tf

    from bireal_tf.data import load_dataset

    ds = load_dataset("folder", "train", batch_size=batch, image_size=size, augmentation=augmentation,
                      data_dir=root, repeat=True, drop_remainder=True).dataset
    if one_hot:
        ds = ds.map(lambda x, y: (x, tf.one_hot(y, one_hot)), num_parallel_calls=tf.data.AUTOTUNE)
    if threadpool:
        options = tf.data.Options()
        options.threading.private_threadpool_size = threadpool
        ds = ds.with_options(options)
    return ds


def _pipeline_repeat(root, settings, augmentation):
    def run() -> float:
        it = iter(_load(root, augmentation, settings.pipeline_batch, settings.pipeline_size))
        for _ in range(WARM_BATCHES):
            next(it)
        timer = Timer()
        for _ in range(settings.pipeline_batches):
            next(it)  # returns a materialised batch
        return settings.pipeline_batches * settings.pipeline_batch / timer.seconds

    return run


def _feed_repeat(case: TrainCase, make_dataset, steps: int):
    def run() -> float:
        iterator = iter(make_dataset())
        case.train(iterator, 1)  # untimed: the pipeline fills its buffers meanwhile
        timer = Timer()
        case.train(iterator, steps)
        return steps * case.cfg.batch / timer.seconds

    return run


def run(settings, sections=None) -> dict:
    import tensorflow as tf

    root = tempfile.mkdtemp(prefix="bireal_bench_jpegs_")
    try:
        files = write_jpegs(root, settings.jpeg_count, settings.jpeg_shape)
        log(f"pipeline: wrote {files['count']} JPEGs of {files['height']}x{files['width']} "
            f"(mean {files['mean_kib']} KiB)")
        samples = round_robin({aug: _pipeline_repeat(root, settings, aug) for aug in ("adam", "paper")},
                              settings.repeats, settings.warmup)
        rates = {aug: summarize(v) for aug, v in samples.items()}

        # What the training step consumes at this size (the training section of this or an earlier run).
        consumed = consumption((sections or {}).get("training"), settings.pipeline_size)
        consumed = {k: v for k, v in consumed.items() if k in ("ours", "ours_bf16")}
        headroom = [{"augmentation": aug, "training_case": case, "pipeline": rates[aug]["median"],
                     "consumption": rate, "headroom": round(rates[aug]["median"] / rate, 3)}
                    for case, rate in consumed.items() for aug in rates]

        n = settings.num_classes
        cfg = TrainConfig("feed", "ours", settings.pipeline_size, settings.pipeline_batch,
                          precision=FEED_PRECISION)
        case = TrainCase(cfg, n, 0.0)
        makers = {"in_memory": lambda: in_memory_dataset(cfg, n),
                  "adam_pipeline": lambda: _load(root, "adam", cfg.batch, cfg.size, one_hot=n),
                  "adam_pipeline_1thread": lambda: _load(root, "adam", cfg.batch, cfg.size, one_hot=n,
                                                         threadpool=1)}
        fed = round_robin({k: _feed_repeat(case, make, settings.feed_steps) for k, make in makers.items()},
                          settings.repeats, 0)  # every repeat starts with its own untimed step
        fed = {k: summarize(v) for k, v in fed.items()}
        del case
        tf.keras.backend.clear_session()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return {
        "files": files, "batch": settings.pipeline_batch, "size": settings.pipeline_size,
        "pipeline_batches": settings.pipeline_batches,
        "cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "pipeline_images_per_second": rates, "training_consumption": consumed, "headroom": headroom,
        "feeding": {"precision": FEED_PRECISION, "steps_per_repeat": settings.feed_steps,
                    "images_per_second": fed,
                    "relative_to_in_memory": {k: round(v["median"] / fed["in_memory"]["median"], 4)
                                              for k, v in fed.items()}},
    }


def _verdict(h) -> str:
    x = h["headroom"]
    if x >= 2:
        return f"{x:.1f}x the consumption: meets the 2x target"
    if x >= 1:
        return f"{x:.2f}x the consumption: keeps up, but short of 2x by {2 - x:.2f}x"
    return f"{x:.2f}x the consumption: the pipeline is the bottleneck"


def markdown(r: dict) -> str:
    f, feeding = r["files"], r["feeding"]
    parts = [
        f"{f['count']} synthetic photo-like JPEGs of {f['height']}x{f['width']} (mean "
        f"{f['mean_kib']} KiB = {f['bytes_per_pixel']} byte/pixel, quality {f['quality']}; "
        "ImageNet's average about 110 KB at ~0.6 byte/pixel) in a temp folder tree, read by "
        f"load_dataset('folder', 'train', augmentation=...), batch {r['batch']}, "
        f"{r['size']}x{r['size']}; fresh iterator per repeat, {WARM_BATCHES} batches untimed, "
        f"then {r.get('pipeline_batches', '?')} timed; adam/paper alternate. {r['cpus']} CPUs. "
        f"Target: {TARGET}.",
        table(["augmentation", "images/s (pipeline alone)", "min-max"],
              [[aug, f1(s["median"]), spread(s)] for aug, s in r["pipeline_images_per_second"].items()]),
    ]
    if r["headroom"]:
        parts += [f"Against what the training step consumes at {r['size']}x{r['size']} "
                  "(training section, in-memory data):",
                  table(["augmentation", "training case", "pipeline img/s", "step consumes img/s",
                         "headroom", "verdict"],
                        [[h["augmentation"], h["training_case"], f1(h["pipeline"]),
                          f1(h["consumption"]), times(h["headroom"]), _verdict(h)]
                         for h in r["headroom"]])]
    parts += [f"Training fed by the pipeline ({feeding['precision']}; our Bi-Real-18 train function "
              "fed by each source, fresh iterator per repeat, one untimed step, then "
              f"{feeding['steps_per_repeat']} timed steps; sources alternate):",
              table(["source", "train images/s", "min-max", "vs in-memory", "tf.data options"],
                    [[k, f1(s["median"]), spread(s), times(feeding["relative_to_in_memory"][k]),
                      FEED_OPTIONS[k]] for k, s in feeding["images_per_second"].items()])]
    return "\n\n".join(parts)


def findings(r: dict) -> list:
    out = [f"Input pipeline, {h['augmentation']} vs {h['training_case']}: {_verdict(h)}."
           for h in r["headroom"]]
    rel = r["feeding"]["relative_to_in_memory"]
    out.append(f"Training ({r['feeding']['precision']}) fed by the Adam pipeline runs at "
               f"{rel['adam_pipeline']:.2f}x its in-memory speed (default tf.data options), "
               f"{rel['adam_pipeline_1thread']:.2f}x with tf.data on a private 1-thread pool.")
    return out
