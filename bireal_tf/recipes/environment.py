"""The process-wide state a run trains in: precision policy, seeds, determinism, devices.

    with TrainingEnvironment(options, image_size) as env:
        with env.strategy.scope():
            ...

Keras' precision policy and TensorFlow's op determinism are global to the process; the
environment sets them for the run and puts back what it found, so a model built after
`train_recipe(...)` in the same notebook is float32 again.
"""
import os
from dataclasses import dataclass

import tensorflow as tf
from tensorflow.python.framework import config as tf_config  # determinism's off switch

from bireal_tf.recipes.errors import TrainingError
from bireal_tf.recipes.options import STRATEGIES
from bireal_tf.recipes.recipe import SMALL_IMAGE_MAX_SIZE
from bireal_tf.utils import bf16_cpu_flags


def make_strategy(name, tpu=None):
    """A tf.distribute strategy by name (see STRATEGIES)."""
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "one_device":
        gpus = tf.config.list_logical_devices("GPU")
        return tf.distribute.OneDeviceStrategy(gpus[0].name if gpus else "/cpu:0")
    if name == "mirrored":
        gpus = tf.config.list_logical_devices("GPU")
        devices = [d.name for d in gpus] or [d.name for d in tf.config.list_logical_devices("CPU")]
        return tf.distribute.MirroredStrategy(devices)
    if name == "multi_worker":
        if "TF_CONFIG" not in os.environ:
            raise TrainingError(
                "--strategy multi_worker needs the TF_CONFIG environment variable describing "
                'the cluster, e.g. {"cluster": {"worker": ["host1:port", "host2:port"]}, '
                '"task": {"type": "worker", "index": 0}}.'
            )
        return tf.distribute.MultiWorkerMirroredStrategy()
    if name == "tpu":
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu or "")
        tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
        return tf.distribute.TPUStrategy(resolver)
    raise ValueError(f"Unknown strategy {name!r}; valid strategies: {', '.join(STRATEGIES)}.")


def worker_info(strategy):
    """(is_chief, task_id) of this process in a multi-worker cluster; (True, 0) otherwise."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return True, 0
    task_type, task_id = resolver.task_type, resolver.task_id
    is_chief = task_type == "chief" or (task_type == "worker" and task_id == 0
                                        and "chief" not in resolver.cluster_spec().as_dict())
    return is_chief, task_id


def resolve_mixed_precision(requested, strategy="default", image_size=None):
    """(the mixed precision to train in: None (float32), "bfloat16" or "float16", why).

    "auto" picks bfloat16 only on a CPU with AVX512_BF16 or AMX, and only for inputs
    larger than SMALL_IMAGE_MAX_SIZE: there it trained Bi-Real-18 1.45x (128 px) and
    1.56x (224 px) as fast as float32 (BENCHMARKS.md), with test top-1 within the float32
    seeds' spread (docs/training.md). Float32 elsewhere: for small
    images, where bfloat16 trained no faster; on GPUs and TPUs, where it was not measured;
    on CPUs without bfloat16 instructions (AVX2 ones among them), where it would be slower.
    """
    if requested in (None, "float32"):
        return None, "float32 asked for" if requested else "float32 (the Python API's default)"
    if requested != "auto":
        return requested, f"{requested} asked for"
    if strategy == "tpu" or tf.config.list_physical_devices("GPU"):
        return None, "auto: float32 on an accelerator (bfloat16 is measured here on CPUs only)"
    flags = bf16_cpu_flags()
    if not flags:
        return None, "auto: this CPU has no AVX512_BF16 or AMX"
    if image_size is not None and image_size <= SMALL_IMAGE_MAX_SIZE:
        return None, f"auto: float32 for {image_size} px inputs, where bfloat16 trains no faster"
    return "bfloat16", f"auto: this CPU has {' and '.join(flags)}"


@dataclass(frozen=True)
class Environment:
    """What a run trains in, as `TrainingEnvironment` set it up."""

    strategy: tf.distribute.Strategy
    is_chief: bool
    task_id: int
    mixed_precision: str | None  # None: float32
    precision_reason: str


class TrainingEnvironment:
    """Sets precision policy, seed, determinism and strategy for a run; restores on exit.

    The precision is resolved when the environment is made (so it can be announced
    before the run); the global state changes only inside the `with` block.
    """

    def __init__(self, options, image_size, seed=0):
        self.options = options
        self.seed = seed
        self.mixed_precision, self.precision_reason = resolve_mixed_precision(
            options.mixed_precision, options.strategy, image_size)

    def __enter__(self) -> Environment:
        self._policy = tf.keras.mixed_precision.global_policy()
        self._determinism = tf_config.is_op_determinism_enabled()
        if self.mixed_precision:
            tf.keras.mixed_precision.set_global_policy(f"mixed_{self.mixed_precision}")
        try:
            if self.options.deterministic:
                tf.config.experimental.enable_op_determinism()
            tf.keras.utils.set_random_seed(self.seed)
            strategy = make_strategy(self.options.strategy, self.options.tpu)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        is_chief, task_id = worker_info(strategy)
        return Environment(strategy, is_chief, task_id, self.mixed_precision,
                           self.precision_reason)

    def __exit__(self, *exc):
        tf.keras.mixed_precision.set_global_policy(self._policy)
        if not self._determinism and tf_config.is_op_determinism_enabled():
            tf_config.disable_op_determinism()
        return False
