"""Training recipes: small dataclasses of hyper-parameters and the stages they run.

Two families, with the authors' numbers (DESIGN.md, "Recipes"):

* `rNN_adam`: Adam from scratch, as the authors' 2019 PyTorch code. lr 0.001 at
  batch 512 (R50: 0.0005 at 256), decayed linearly to 0 over 256 epochs, no
  weight decay, label smoothing 0.1, random-resized crop + lighting noise.
* `rNN_paper`: the ECCV paper's pipeline. A real-valued network is trained with
  ReLU, finetuned with leaky-clip, then with clip; its weights initialize the
  binary network (SGD, momentum 0.9, no weight decay); last, the weights are
  fixed to +-1 (no scale) and only BatchNorm is retrained for one epoch.

The paper does not give the real-valued stages' schedule. Ours: ReLU as the
standard ResNet ImageNet recipe (SGD 0.1 at batch 256, momentum 0.9, weight
decay 1e-4, 90 epochs, x0.1 at 30 and 60); leaky-clip and clip each finetune
for 20 epochs from lr 0.01 (x0.1 at 10 and 15) with the same momentum and
decay. Every number is a field and can be overridden.

Learning rates are given at `base_batch_size` and scale linearly with the
batch size actually used (Goyal et al. 2017).
"""
import dataclasses
from dataclasses import dataclass, replace

import tensorflow as tf


OPTIMIZERS = ("adam", "sgd")
# Small images: the datasets the project knows, and the size up to which any data counts.
SMALL_IMAGE_DATASETS = ("fashion_mnist", "fashion_mnist_embedded")
SMALL_IMAGE_MAX_SIZE = 64
SMALL_IMAGE_ADAM_LR, SMALL_IMAGE_ADAM_BATCH = 0.004, 128  # measured here, DESIGN.md
SCHEDULES = ("linear", "step", "constant")
STAGE_KINDS = ("relu", "leaky_clip", "clip", "binary", "bn_retrain")


@dataclass(frozen=True)
class Stage:
    """One training stage: which network variant, how long, and how it is optimized."""

    name: str
    activation: str = "binary"  # model variant: binary / relu / leaky_clip / clip
    epochs: int = 1
    optimizer: str = "adam"
    lr: float = 1e-3  # at the recipe's base_batch_size
    schedule: str = "linear"  # linear decay to 0, step (x0.1 at milestones), constant
    milestones: tuple = ()  # epochs (may be fractional) at which a step schedule multiplies lr by 0.1
    momentum: float = 0.9  # SGD only
    weight_decay: float = 0.0  # decoupled, as Keras' optimizers apply it
    label_smoothing: float = 0.0
    augmentation: str = "adam"  # adam / paper / none
    kernel_quantizer: str = "magnitude_aware"  # magnitude_aware / sign (+-1, no scale)
    train_only_batchnorm: bool = False  # the BatchNorm-retrain stage

    def __post_init__(self):
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}.")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}.")
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}.")


@dataclass(frozen=True)
class Recipe:
    """A model, a dataset, and the stages that train it."""

    name: str
    depth: int = 18
    dataset: str = "imagenet2012"
    image_size: int | None = None  # None: the dataset's default (224 for ImageNet)
    batch_size: int = 512
    base_batch_size: int = 512  # the batch size the stages' lr are given for
    stages: tuple = ()
    padding: str = "same"
    pad_values: float = 0.0  # binary convs' padding: 0 (the authors) or 1 (LCE's fast path)
    seed: int = 0
    steps_per_epoch: int | None = None  # None: a full pass over the training split
    description: str = ""

    def scaled_lr(self, stage):
        return stage.lr * self.batch_size / self.base_batch_size

    def stage(self, name):
        for s in self.stages:
            if s.name == name:
                return s
        raise ValueError(
            f"Unknown stage {name!r} for recipe {self.name}; valid stages: "
            f"{', '.join(s.name for s in self.stages)}."
        )

    def stage_names(self):
        return [s.name for s in self.stages]

    def to_dict(self):
        return dataclasses.asdict(self)

    def fit_to_data(self, dataset=None, image_size=None):
        """This recipe adapted to small images; (recipe, {field: value} of what changed).

        The recipes carry the authors' ImageNet numbers, which train small 28-32 px
        images poorly in a few epochs. For the small-image datasets the project knows
        (SMALL_IMAGE_DATASETS) and any `image_size` <= SMALL_IMAGE_MAX_SIZE, it uses
        settings measured here (DESIGN.md: r18_adam on full Fashion-MNIST, 32 px,
        batch 128, 8 epochs: 79.4% with the ImageNet settings, 90.97% with these):

        - Adam stages: lr 0.004 at batch 128 (scaled linearly with the batch size);
        - the paper pipeline's binary stage: Adam with linear decay in place of SGD (full
          Fashion-MNIST, 2 epochs from the same clip-stage network: SGD 76.72%, Adam
          86.32%); its real-valued stages keep SGD (Adam was no better there: 76.4% vs
          76.1% after 20,000 images of the ReLU stage) and the BatchNorm retrain its own;
        - no augmentation: random crops of centred 28 px garments cost accuracy;
        - binary convs pad with +1 (pad_values=1.0): LCE computes zero padding wrongly
          on feature maps smaller than the kernel, which inputs below 65 px have.

        On ImageNet-sized data the recipe is returned unchanged. Apply user overrides
        after this, so they win.
        """
        dataset = dataset or self.dataset
        size = image_size or self.image_size
        small = dataset in SMALL_IMAGE_DATASETS or (size is not None and size <= SMALL_IMAGE_MAX_SIZE)
        if not small:
            return self, {}
        stages, sgd_binary = [], False
        for s in self.stages:
            fields = {"augmentation": "none"}
            if s.activation == "binary" and s.optimizer == "sgd" and not s.train_only_batchnorm:
                fields.update(optimizer="adam", schedule="linear", milestones=(), weight_decay=0.0)
                sgd_binary = True
            if s.optimizer == "adam" or "optimizer" in fields:
                fields["lr"] = SMALL_IMAGE_ADAM_LR * self.base_batch_size / SMALL_IMAGE_ADAM_BATCH
            stages.append(replace(s, **fields))
        adapted = replace(self, stages=tuple(stages), pad_values=1.0)
        changed = {"pad_values": 1.0, "augmentation": "none"}
        adam = [s for s in adapted.stages if s.optimizer == "adam"]
        if adam:
            changed["lr"] = f"{SMALL_IMAGE_ADAM_LR:g} at batch {SMALL_IMAGE_ADAM_BATCH} (Adam stages)"
        if sgd_binary:
            changed["binary stage"] = "Adam with linear decay in place of SGD"
        return adapted, changed

    def with_overrides(self, stage=None, **overrides):
        """A copy with recipe fields and stage fields replaced.

        Stage fields (`epochs`, `lr`, `optimizer`, ...) go to `stage` when given,
        else to every stage but the BatchNorm retrain (which stays one epoch), except
        `augmentation`, which goes to it too: the retrain re-estimates BatchNorm on the
        training images, so they must look like those the network was trained on
        (issue 13: 'none' everywhere but 'paper' there cost 2.6 points, loss 0.56 -> 2.19).

        A new `epochs` without new `milestones` moves a step schedule's milestones in
        proportion (90 epochs x0.1 at 30 and 60 -> 3 epochs x0.1 at 1 and 2), so a short
        run still decays as the full one does. Kept in place, milestones beyond a short
        run never fire: issue 13's 2-epoch stages ran at the full lr and ended at 100x the
        lr the BatchNorm retrain assumes.
        """
        stage_fields = {f.name for f in dataclasses.fields(Stage)} - {"name"}
        recipe_fields = {f.name for f in dataclasses.fields(Recipe)} - {"stages"}
        unknown = set(overrides) - stage_fields - recipe_fields
        if unknown:
            raise ValueError(f"Unknown recipe fields {sorted(unknown)}.")
        for_stages = {k: v for k, v in overrides.items() if k in stage_fields and v is not None}
        for_recipe = {k: v for k, v in overrides.items() if k in recipe_fields and v is not None}
        if stage is not None:
            self.stage(stage)  # validates the name
        stages = []
        for s in self.stages:
            applies = s.name == stage if stage is not None else not s.train_only_batchnorm
            if applies:
                fields = dict(for_stages)
                if "epochs" in fields and "milestones" not in fields and s.milestones:
                    scale = fields["epochs"] / s.epochs
                    fields["milestones"] = tuple(round(m * scale, 4) for m in s.milestones)
                s = replace(s, **fields)
            elif stage is None and "augmentation" in for_stages:
                s = replace(s, augmentation=for_stages["augmentation"])
            stages.append(s)
        return replace(self, stages=tuple(stages), **for_recipe)


def learning_rate_schedule(recipe, stage, steps_per_epoch):
    """The stage's learning rate per step, as Keras' built-in schedules (serializable).

    linear:   lr * (1 - step / total_steps)          PolynomialDecay, power 1, to 0
    step:     lr * 0.1 ** (milestones passed)        PiecewiseConstantDecay; milestone m
                                                     takes effect at step
                                                     round(m * steps_per_epoch)
    constant: lr

    The optimizer evaluates the schedule at its iteration count before the update,
    so step 0 is the first step of epoch 0.
    """
    lr = recipe.scaled_lr(stage)
    schedules = tf.keras.optimizers.schedules
    if stage.schedule == "linear":
        return schedules.PolynomialDecay(lr, stage.epochs * steps_per_epoch, 0.0, power=1.0)
    if stage.schedule == "step" and stage.milestones:
        # PiecewiseConstantDecay keeps values[i] while step <= boundaries[i].
        boundaries = [round(m * steps_per_epoch) - 1 for m in sorted(stage.milestones)]
        values = [lr * 0.1**i for i in range(len(boundaries) + 1)]
        return schedules.PiecewiseConstantDecay(boundaries, values)
    return lr


def make_optimizer(recipe, stage, steps_per_epoch):
    """The stage's optimizer with its schedule, the lr scaled to the batch size."""
    schedule = learning_rate_schedule(recipe, stage, steps_per_epoch)
    decay = stage.weight_decay or None
    if stage.optimizer == "sgd":
        return tf.keras.optimizers.SGD(schedule, momentum=stage.momentum, weight_decay=decay)
    return tf.keras.optimizers.Adam(schedule, weight_decay=decay)


# --- the recipes -----------------------------------------------------------------------


def _adam_recipe(depth, lr=1e-3, batch=512):
    return Recipe(
        name=f"r{depth}_adam",
        depth=depth,
        batch_size=batch,
        base_batch_size=batch,
        description=f"Bi-Real-{depth}, Adam from scratch (authors' PyTorch recipe)",
        stages=(
            Stage(
                "binary",
                epochs=256,
                optimizer="adam",
                lr=lr,
                schedule="linear",
                label_smoothing=0.1,
                augmentation="adam",
            ),
        ),
    )


def _paper_recipe(depth, binary_epochs, binary_lr, binary_milestones, batch):
    real = dict(optimizer="sgd", momentum=0.9, weight_decay=1e-4, augmentation="paper")
    return Recipe(
        name=f"r{depth}_paper",
        depth=depth,
        batch_size=batch,
        base_batch_size=batch,
        description=(
            f"Bi-Real-{depth}, the paper's pipeline: ReLU -> leaky-clip -> clip -> "
            "binary (SGD) -> BatchNorm retrain"
        ),
        stages=(
            # Real-valued stages: our choice (the paper does not give it), lr at
            # batch 256 expressed at this recipe's base batch size.
            Stage("relu", "relu", 90, lr=0.1 * batch / 256, schedule="step",
                  milestones=(30, 60), **real),
            Stage("leaky_clip", "leaky_clip", 20, lr=0.01 * batch / 256, schedule="step",
                  milestones=(10, 15), **real),
            Stage("clip", "clip", 20, lr=0.01 * batch / 256, schedule="step",
                  milestones=(10, 15), **real),
            Stage("binary", "binary", binary_epochs, optimizer="sgd", lr=binary_lr,
                  schedule="step", milestones=binary_milestones, momentum=0.9,
                  weight_decay=0.0, augmentation="paper"),
            # Weights fixed to +-1, conv lr 0: only BatchNorm learns, for one epoch, at
            # the binary stage's final learning rate.
            Stage("bn_retrain", "binary", 1, optimizer="sgd",
                  lr=binary_lr * 0.1 ** len(binary_milestones), schedule="constant",
                  momentum=0.9, augmentation="paper", kernel_quantizer="sign",
                  train_only_batchnorm=True),
        ),
    )  # fmt: skip


RECIPES = {
    r.name: r
    for r in (
        _adam_recipe(18),
        _adam_recipe(34),
        _adam_recipe(50, lr=5e-4, batch=256),
        _paper_recipe(18, 20, 0.01, (10, 15), batch=128),
        _paper_recipe(34, 40, 0.08, (20, 30), batch=1024),
    )
}


def get_recipe(name):
    if name not in RECIPES:
        raise ValueError(f"Unknown recipe {name!r}; valid recipes: {', '.join(RECIPES)}.")
    return RECIPES[name]


__all__ = [
    "RECIPES",
    "Recipe",
    "Stage",
    "get_recipe",
    "learning_rate_schedule",
    "make_optimizer",
]
