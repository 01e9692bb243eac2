"""How a run trains, apart from its recipe: the options of `train_recipe` and of the CLI.

The recipe says what the network learns (stages, hyper-parameters); `TrainOptions` says
where the data is, which devices and precision, and how much to log. Frozen: a run
reads its options and never changes them.
"""
from dataclasses import dataclass, field

STRATEGIES = ("default", "one_device", "mirrored", "multi_worker", "tpu")
MIXED_PRECISION = ("float16", "bfloat16")
PRECISION_CHOICES = ("auto", "float32", *MIXED_PRECISION)
# Train steps per call of the compiled train function: the same steps, with less Python
# and dispatch overhead between them (1.04-1.13x at batch 32 on 2 CPU cores, BENCHMARKS.md).
STEPS_PER_EXECUTION = 4
ON_CORRUPT = ("skip", "fail")


@dataclass(frozen=True)
class TrainOptions:
    """Everything a run needs besides the recipe and the output directory.

    data_dir:        TFDS data dir, folder tree, or the IDX files' folder (by dataset).
    start_stage:     start at this stage; the ones before it are skipped (CLI --stage).
    init_weights:    a .keras model or weights file the first trained stage starts from,
                     or "larq_zoo" for larq-zoo's ImageNet Bi-Real-18.
    overwrite:       delete the run found in the output directory (never worker-<i>/).
    strategy, tpu:   the tf.distribute strategy by name (STRATEGIES), a TPU's address.
    mixed_precision: None (float32), "auto", "float32", "float16" or "bfloat16".
    steps_per_execution: train steps per call of the compiled train function.
    deterministic:   TensorFlow's deterministic ops (reproducible, slower).
    limit_train, limit_eval: use only the first N examples of a split.
    on_corrupt:      the folder dataset: "skip" files that are not images, or "fail".
    data_settings:   what the small-image settings changed, recorded in summary.json.
    validate:        evaluate on the test split after every epoch.
    verbose:         0 no progress bars (the run's state lines still print), 1 bars.
    checkpoint_every: also checkpoint every N training steps (for machines that die
                     without a signal); a signal always checkpoints the step it stops at.
    """

    data_dir: str | None = None
    start_stage: str | None = None
    init_weights: str | None = None
    overwrite: bool = False
    strategy: str = "default"
    tpu: str | None = None
    mixed_precision: str | None = None
    steps_per_execution: int = STEPS_PER_EXECUTION
    deterministic: bool = False
    limit_train: int | None = None
    limit_eval: int | None = None
    on_corrupt: str = "skip"
    data_settings: dict = field(default_factory=dict)
    validate: bool = True
    verbose: int = 1
    checkpoint_every: int | None = None

    def __post_init__(self):
        if self.mixed_precision not in (None, *PRECISION_CHOICES):
            raise ValueError(f"mixed_precision must be one of {PRECISION_CHOICES} or None.")
        if int(self.steps_per_execution) < 1:
            raise ValueError(f"steps_per_execution must be >= 1, got {self.steps_per_execution}.")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"Unknown strategy {self.strategy!r}; valid strategies: "
                             f"{', '.join(STRATEGIES)}.")
        if self.checkpoint_every is not None and int(self.checkpoint_every) < 1:
            raise ValueError(f"checkpoint_every must be >= 1, got {self.checkpoint_every}.")
        if self.on_corrupt not in ON_CORRUPT:
            raise ValueError(f"on_corrupt must be one of {ON_CORRUPT}, got {self.on_corrupt!r}.")

