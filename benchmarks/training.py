"""Section 1: training throughput of our Bi-Real-18 against larq-zoo's, and the levers.

Method. Both networks are compiled as the training loop compiles them
(`bireal_tf.recipes`: the r18_adam recipe's Adam with its lr scaled to the
batch, categorical cross-entropy with label smoothing 0.1, top-1/top-5
metrics) and trained through Keras' own compiled train function
(`model.make_train_function()`, what `model.fit` runs) on one in-memory batch
repeated by tf.data. A repeat runs whole steps (about `repeat_seconds`) and
reads the loss back, which waits for the last step. Every case of a size
runs in one round robin (A B C ... A B C ...), after a warm-up round.

Levers (each measured against its baseline in the same round robin; all but
mixed_bfloat16 compute exactly the same thing):

- `mixed_bfloat16`: Keras' mixed precision policy (bf16 compute, float32
  variables), for ours and larq-zoo's; the one lever that changes numerics.
- `steps_per_execution`: several steps per call of the train function.
- `jit_compile`: XLA.
- `channels_first`: the same network in NCHW layout (oneDNN has NCHW kernels on CPU).
- `quantizer forward`: `tf.where(x >= 0, 1, -1)` in place of Larq's
  `sign(sign(x) + 0.1)`; also checked with the LCE converter, since LCE only
  binarizes convs whose input quantizer it recognises.
- `quantizer backward`: ApproxSign's gradient as the masked
  `where(|x| <= 1, (2 - 2|x|) dy, 0)` against bireal_tf's `dy * relu(2 - 2|x|)`
  (the same values for finite dy, in fewer ops). The forward graph, hence the
  LCE conversion, is the same for both (a tf.custom_gradient's gradient
  function is not part of the inference graph).
- tf.data options are measured in the pipeline section, where tf.data does work.
"""
import contextlib
from dataclasses import asdict, dataclass, replace
from typing import Dict, List, Optional

import numpy as np

from benchmarks.common import (
    Settings,
    Stopwatch,
    collect,
    log,
    ratio,
    round_robin,
    summarize,
)

QUANTIZERS = ("larq", "where", "where_grad")


@dataclass(frozen=True)
class TrainConfig:
    name: str
    impl: str = "ours"  # ours | larq_zoo
    size: int = 128
    batch: int = 32
    precision: str = "float32"  # float32 | mixed_bfloat16
    jit_compile: bool = False
    steps_per_execution: int = 1
    quantizer: str = "larq"  # QUANTIZERS (ours only)
    layout: str = "channels_last"  # channels_last | channels_first


# --- quantizer variants --------------------------------------------------------------------


def _where_sign(x):
    """sign(x) with sign(0) = +1 as one select: the candidate 'fused' forward."""
    import tensorflow as tf

    one = tf.constant(1, dtype=x.dtype)
    return tf.where(x >= 0, one, -one)


def _where_grad_approx_sign():
    """ApproxSign with its backward as a masked where (bireal_tf's uses relu)."""
    import tensorflow as tf

    from bireal_tf import quantizers

    @tf.custom_gradient
    def approx_sign(x):
        def grad(dy):
            return tf.where(tf.abs(x) <= 1.0, (2.0 - 2.0 * tf.abs(x)) * dy, tf.zeros_like(dy))

        return quantizers._sign(x), grad

    return approx_sign


@contextlib.contextmanager
def quantizer_variant(variant: str):
    """Swap the forward (`_sign`) or the ApproxSign backward of bireal_tf.quantizers.

    bireal_tf.quantizers looks both up when a layer is called, so whatever is
    traced (a train step, a conversion) inside this context uses the variant.
    """
    from bireal_tf import quantizers

    if variant not in QUANTIZERS:
        raise ValueError(f"quantizer variant must be one of {QUANTIZERS}, got {variant!r}")
    saved = quantizers._sign, quantizers.approx_sign
    try:
        if variant == "where":
            quantizers._sign = _where_sign
        elif variant == "where_grad":
            quantizers.approx_sign = _where_grad_approx_sign()
        yield
    finally:
        quantizers._sign, quantizers.approx_sign = saved


# --- models --------------------------------------------------------------------------------


def _channels_first(model):
    """The same network in NCHW: data_format on convs/pools, BatchNorm over axis 1."""
    import tensorflow as tf

    config = model.get_config()
    for layer in config["layers"]:
        layer.pop("build_config", None)  # holds the NHWC input shape the layer was built for
        cfg = layer["config"]
        if "data_format" in cfg:
            cfg["data_format"] = "channels_first"
        if layer["class_name"] == "BatchNormalization":
            cfg["axis"] = 1
        if layer["class_name"] == "InputLayer":
            n, h, w, c = cfg["batch_input_shape"]
            cfg["batch_input_shape"] = [n, c, h, w]
    with tf.keras.utils.custom_object_scope(tf.keras.utils.get_custom_objects()):
        return tf.keras.Model.from_config(config)


def build_model(cfg: TrainConfig, num_classes: int, depth: int = 18, activation: str = "binary"):
    """Our Bi-Real Net or larq-zoo's BiRealNet under the config's precision policy and layout."""
    import tensorflow as tf

    previous = tf.keras.mixed_precision.global_policy()
    tf.keras.mixed_precision.set_global_policy(cfg.precision)
    try:
        shape = (cfg.size, cfg.size, 3)
        if cfg.impl == "ours":
            from bireal_tf.models import bireal_net

            model = bireal_net(depth, input_shape=shape, num_classes=num_classes,
                               activation=activation)
        elif cfg.impl == "larq_zoo":
            import larq_zoo

            if depth != 18:
                raise ValueError("larq-zoo has only the 18-layer BiRealNet")
            model = larq_zoo.literature.BiRealNet(input_shape=shape, weights=None,
                                                  num_classes=num_classes)
        else:
            raise ValueError(f"unknown implementation {cfg.impl!r}")
        if cfg.layout == "channels_first":
            model = _channels_first(model)
        return model
    finally:
        tf.keras.mixed_precision.set_global_policy(previous)


def recipe_optimizer(batch: int, depth: int = 18):
    """The r{depth}_adam recipe's optimizer at this batch size (lr scaled linearly)."""
    from bireal_tf.recipes import get_recipe, make_optimizer

    recipe = get_recipe(f"r{depth}_adam").with_overrides(batch_size=batch)
    stage = recipe.stage("binary")
    return make_optimizer(recipe, stage, steps_per_epoch=10_000), recipe, stage


def compile_like_the_loop(model, cfg: TrainConfig, depth: int = 18):
    """model.compile as bireal_tf.recipes' training loop does, plus the config's switches."""
    import tensorflow as tf

    optimizer, recipe, stage = recipe_optimizer(cfg.batch, depth)
    model.compile(
        optimizer=optimizer,
        loss=tf.keras.losses.CategoricalCrossentropy(label_smoothing=stage.label_smoothing),
        metrics=[tf.keras.metrics.CategoricalAccuracy(name="top1"),
                 tf.keras.metrics.TopKCategoricalAccuracy(5, name="top5")],
        jit_compile=cfg.jit_compile,
        steps_per_execution=cfg.steps_per_execution,
    )
    return {"optimizer": type(optimizer).__name__, "lr": recipe.scaled_lr(stage),
            "label_smoothing": stage.label_smoothing, "recipe": recipe.name}


def in_memory_batch(cfg: TrainConfig, num_classes: int, seed: int = 0):
    """One normalised-image-like batch and its one-hot labels, as numpy arrays."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((cfg.batch, cfg.size, cfg.size, 3), dtype=np.float32)
    if cfg.layout == "channels_first":
        x = np.ascontiguousarray(x.transpose(0, 3, 1, 2))
    labels = rng.integers(0, num_classes, cfg.batch)
    y = np.eye(num_classes, dtype=np.float32)[labels]
    return x, y


def in_memory_dataset(cfg: TrainConfig, num_classes: int):
    import tensorflow as tf

    return tf.data.Dataset.from_tensors(in_memory_batch(cfg, num_classes)).repeat()


def prebuild(model, cfg: TrainConfig, num_classes: int):
    """Create the optimizer's and the metrics' variables before the train function is traced.

    A tf.function that creates variables on its first call is traced twice;
    creating them beforehand halves the set-up time of each case. The step
    itself is unchanged.
    """
    x, y = in_memory_batch(replace(cfg, batch=1), num_classes)
    y_pred = model(x, training=False)
    model.compiled_loss.build(y_pred)
    model.compiled_metrics.build(y_pred, y)
    model.optimizer.build(model.trainable_variables)


class TrainCase:
    """One compiled train function and a data iterator; `run()` is one timed repeat."""

    def __init__(self, cfg: TrainConfig, num_classes: int, repeat_seconds: float, depth: int = 18):
        self.cfg = cfg
        self.num_classes = num_classes
        self.repeat_seconds = repeat_seconds
        self.depth = depth
        self.model = self.fn = self.iterator = None
        self.calls = 1
        self.info = {}

    def setup(self, dataset=None):
        """Build, compile, trace (the first call) and size a repeat from the second call."""
        watch = Stopwatch()
        with quantizer_variant(self.cfg.quantizer):
            self.model = build_model(self.cfg, self.num_classes, self.depth)
            self.info.update(compile_like_the_loop(self.model, self.cfg, self.depth))
            prebuild(self.model, self.cfg, self.num_classes)
            self.fn = self.model.make_train_function()
            self.iterator = iter(dataset if dataset is not None
                                 else in_memory_dataset(self.cfg, self.num_classes))
            build_seconds = watch.seconds
            self._call(1)
        self.info["build_seconds"] = round(build_seconds, 2)
        self.info["first_call_seconds"] = round(watch.seconds - build_seconds, 2)
        watch = Stopwatch()
        self._call(1)
        per_call = max(watch.seconds, 1e-6)
        self.calls = max(1, int(round(self.repeat_seconds / per_call)))
        self.info["steps_per_repeat"] = self.calls * self.cfg.steps_per_execution
        return self

    def _call(self, calls: int):
        logs = None
        for _ in range(calls):
            logs = self.fn(self.iterator)
        loss = float(logs["loss"].numpy())  # waits for the last step
        if not np.isfinite(loss):
            raise FloatingPointError(f"{self.cfg.name}: loss became {loss}")

    def run(self) -> float:
        """One timed repeat; images per second."""
        watch = Stopwatch()
        self._call(self.calls)
        return self.calls * self.cfg.steps_per_execution * self.cfg.batch / watch.seconds

    def with_iterator(self, iterator, calls: Optional[int] = None):
        """A view of this case that feeds the same train function from another iterator."""
        other = TrainCase(self.cfg, self.num_classes, self.repeat_seconds, self.depth)
        other.model, other.fn, other.iterator = self.model, self.fn, iterator
        other.calls = self.calls if calls is None else calls
        other.info = dict(self.info, steps_per_repeat=other.calls * self.cfg.steps_per_execution)
        return other


# --- the section ---------------------------------------------------------------------------

# (lever label, candidate case, baseline case, what the lead would set)
LEVERS = [
    ("mixed_bfloat16 (ours)", "ours_bf16", "ours",
     "tf.keras.mixed_precision.set_global_policy('mixed_bfloat16') before building the model"),
    ("mixed_bfloat16 (larq-zoo)", "zoo_bf16", "zoo", "same policy, larq-zoo's BiRealNet"),
    ("steps_per_execution", "ours_spe", "ours", "model.compile(..., steps_per_execution=N)"),
    ("XLA (jit_compile=True)", "ours_xla", "ours", "model.compile(..., jit_compile=True)"),
    ("input layout NCHW", "ours_nchw", "ours",
     "channels_first data_format on convs/pools, BatchNorm axis=1, NCHW input"),
    ("quantizer forward tf.where(x>=0,1,-1)", "ours_where", "ours",
     "bireal_tf.quantizers._sign = tf.where(x >= 0, 1, -1)"),
    ("quantizer backward as a masked tf.where (vs ours: dy*relu(2-2|x|))", "ours_wheregrad",
     "ours", "ApproxSign gradient written as where(|x| <= 1, (2 - 2|x|) dy, 0)"),
]


def configs_for(size: int, settings: Settings, levers: bool) -> List[TrainConfig]:
    """ours and zoo, the every-size levers, and at the lever size the other levers."""
    b = settings.train_batch
    base = TrainConfig("ours", "ours", size, b)
    zoo = TrainConfig("zoo", "larq_zoo", size, b)
    every = {
        "ours_bf16": replace(base, name="ours_bf16", precision="mixed_bfloat16"),
        "zoo_bf16": replace(zoo, name="zoo_bf16", precision="mixed_bfloat16"),
        "ours_spe": replace(base, name="ours_spe", steps_per_execution=settings.steps_per_execution),
        "ours_xla": replace(base, name="ours_xla", jit_compile=True),
        "ours_nchw": replace(base, name="ours_nchw", layout="channels_first"),
        "ours_where": replace(base, name="ours_where", quantizer="where"),
        "ours_wheregrad": replace(base, name="ours_wheregrad", quantizer="where_grad"),
    }
    names = list(settings.every_size_cases)
    if levers:
        names += [n for n in settings.lever_cases if n not in names]
    return [base, zoo] + [every[n] for n in names]


def verdict(candidate: List[float], baseline: List[float], threshold: float = 0.05) -> dict:
    """Median ratio, per-round (paired) ratios, and a plain-words verdict."""
    paired = [c / b for c, b in zip(candidate, baseline) if b]
    med = float(np.median(candidate) / np.median(baseline))
    if med >= 1 + threshold and min(paired) > 1.0:
        word = "faster"
    elif med <= 1 - threshold and max(paired) < 1.0:
        word = "slower"
    else:
        word = f"no clear effect (within +-{threshold:.0%} or rounds disagree)"
    return {"ratio": round(med, 4), "paired_min": round(min(paired), 4),
            "paired_max": round(max(paired), 4), "verdict": word}


def lce_check_where_quantizer(size: int, num_classes: int) -> dict:
    """Does LCE still binarize every conv when the forward is tf.where(x >= 0, 1, -1)?"""
    import larq_compute_engine as lce

    from bireal_tf.export import op_histogram
    from bireal_tf.models import binary_conv_layers

    out = {}
    for variant in ("where",):  # the default form ("larq") is checked by section 3's export
        watch = Stopwatch()
        with quantizer_variant(variant):
            model = build_model(TrainConfig(variant, size=size, batch=1), num_classes)
            flatbuffer = lce.convert_keras_model(model)
        hist = op_histogram(flatbuffer)
        out[variant] = {
            "keras_binary_convs": len(binary_conv_layers(model)),
            "LceBconv2d": hist.get("LceBconv2d", 0),
            "LceQuantize": hist.get("LceQuantize", 0),
            "LceDequantize": hist.get("LceDequantize", 0),
            "CONV_2D": hist.get("CONV_2D", 0),
            "seconds": round(watch.seconds, 1),
        }
        out[variant]["all_binary"] = out[variant]["LceBconv2d"] == out[variant]["keras_binary_convs"]
        collect()
    return out


def run(settings: Settings, levers: bool = True) -> dict:
    import tensorflow as tf

    groups, headline, lever_rows, bf16_rows = [], [], [], []
    for size in settings.train_sizes:
        with_levers = levers and size == settings.lever_size
        configs = configs_for(size, settings, with_levers)
        log(f"training: {size}x{size}, batch {settings.train_batch}: "
            f"{', '.join(c.name for c in configs)}")
        cases: Dict[str, TrainCase] = {}
        errors = {}
        for cfg in configs:
            try:
                case = TrainCase(cfg, settings.num_classes, settings.repeat_seconds).setup()
                cases[cfg.name] = case
                log(f"  built {cfg.name}: build {case.info['build_seconds']} s, trace + first "
                    f"step {case.info['first_call_seconds']} s, {case.info['steps_per_repeat']} "
                    "steps/repeat")
            except Exception as err:  # a lever that does not run here is a finding, not a crash
                errors[cfg.name] = f"{type(err).__name__}: {str(err).strip().splitlines()[0][:300]}"
                log(f"  {cfg.name} failed: {errors[cfg.name]}")
                collect()
        samples = round_robin({n: c.run for n, c in cases.items()}, settings.repeats,
                              settings.warmup, log=log)
        group = {"size": size, "batch": settings.train_batch, "cases": {}, "errors": errors}
        for name, case in cases.items():
            group["cases"][name] = {"config": asdict(case.cfg), **case.info,
                                    "images_per_second": summarize(samples[name])}
        groups.append(group)
        if "ours" in samples and "zoo" in samples:
            headline.append({"size": size, "ours": summarize(samples["ours"])["median"],
                             "larq_zoo": summarize(samples["zoo"])["median"],
                             **verdict(samples["ours"], samples["zoo"])})
        for cand in ("ours_bf16",):
            if cand in samples and "zoo" in samples:
                bf16_rows.append({"size": size, "case": cand,
                                  "ours_bf16": summarize(samples[cand])["median"],
                                  "larq_zoo": summarize(samples["zoo"])["median"],
                                  **verdict(samples[cand], samples["zoo"])})
        for label, cand, base, how in LEVERS:
            if base not in samples or (cand not in samples and cand not in errors):
                continue
            row = {"lever": label, "size": size, "candidate": cand, "baseline": base, "how": how,
                   "baseline_images_per_second": summarize(samples[base])["median"]}
            if cand in errors:
                row.update(images_per_second=None, ratio=None, verdict="did not run: " + errors[cand])
            else:
                row.update(images_per_second=summarize(samples[cand])["median"],
                           **verdict(samples[cand], samples[base]))
            lever_rows.append(row)
        watch = Stopwatch()
        del cases
        tf.keras.backend.clear_session()
        collect()
        log(f"training: released the {size}x{size} models in {watch.seconds:.1f} s")

    result = {
        "method": ("Keras train function (model.make_train_function(), as model.fit) on one "
                   "in-memory batch repeated by tf.data; optimizer and loss of the r18_adam "
                   "recipe; images/s over whole steps, median of repeats, cases in round robin"),
        "batch": settings.train_batch,
        "repeats": settings.repeats,
        "warmup_rounds": settings.warmup,
        "groups": groups,
        "headline": headline,
        "bf16_vs_zoo_default": bf16_rows,
        "levers": lever_rows,
    }
    if levers and settings.lce_check:
        log("training: LCE check of the tf.where quantizer forward")
        try:
            result["where_quantizer_lce"] = lce_check_where_quantizer(96, settings.num_classes)
        except Exception as err:
            result["where_quantizer_lce"] = {"error": f"{type(err).__name__}: {err}"[:400]}
    return result


def consumption(results: dict, size: int) -> Dict[str, float]:
    """Images/s the training step consumes at `size`, per case, from a training result."""
    for group in (results or {}).get("groups", []):
        if group["size"] == size:
            return {n: c["images_per_second"]["median"] for n, c in group["cases"].items()}
    return {}


__all__ = ["TrainConfig", "TrainCase", "run", "consumption", "quantizer_variant", "build_model",
           "ratio"]
