"""Training recipes: small dataclasses of hyper-parameters and the stages they run.

Three families, with the authors' numbers (docs/design.md, "Recipes"):

* `rNN_adam`: Adam from scratch, as the authors' 2019 PyTorch code. lr 0.001 at
  batch 512 (R50: 0.0005 at 256), decayed linearly to 0 over 256 epochs, no
  weight decay, label smoothing 0.1, random-resized crop + lighting noise.
* `rNN_paper`: the ECCV paper's pipeline. A real-valued network is trained with
  ReLU, finetuned with leaky-clip, then with clip; its weights initialize the
  binary network (SGD, momentum 0.9, no weight decay); last, the weights are
  fixed to +-1 (no scale) and only BatchNorm is retrained for one epoch.

* `rNN_react` (18 and 34): ReActNet's two steps on the Bi-Real structure with its block
  (Liu et al., ECCV 2020; their resnet/1_step1 and 2_step2 train.py and run.sh). Step 1:
  binary activations, real-valued weights, weight decay 1e-5 on the conv kernels; step 2:
  binary weights, no weight decay, starting from step 1's network. Both: Adam, lr 2.5e-3 at
  batch 512, 128 epochs, linear decay to 0, and the loss is distillation from a real-valued
  teacher (no labels). Their teacher was torchvision's ResNet-34; ours defaults to the
  network's real-valued twin, trained first in the same run (`teacher="twin"`), and takes any
  Keras classifier file instead (`with_teacher(PATH)`, `--teacher PATH`).

Every recipe can distill (bireal_tf.recipes.distill): `with_teacher(PATH or "twin")`.

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
# Adam's learning rate on small images, given at batch 128: measured with r18_adam on full
# Fashion-MNIST, 32 px, 8 epochs (79.4% with the ImageNet settings, 90.97% with these).
SMALL_IMAGE_ADAM_LR, SMALL_IMAGE_ADAM_BATCH = 0.004, 128
# The batch every small-image figure was measured at: 128 on full Fashion-MNIST (and any
# other small images), 64 on the embedded 10,000-image subset (the demo's). A recipe's
# ImageNet batch of 512 would leave 19 steps an epoch on the embedded set.
SMALL_IMAGE_BATCH = {"fashion_mnist_embedded": 64}
SMALL_IMAGE_DEFAULT_BATCH = 128
SCHEDULES = ("linear", "step", "constant")
STAGE_KINDS = ("relu", "leaky_clip", "clip", "binary", "bn_retrain")
WEIGHT_DECAY_MODES = ("decoupled", "conv_l2")
BLOCKS = ("bireal", "react")
TWIN = "twin"  # the teacher that is the network's real-valued twin, trained by the run
# How a teacher expects its input images (bireal_tf.recipes.distill.TeacherInput).
TEACHER_INPUTS = ("ours", "pixels", "caffe", "tf", "torch")


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
    weight_decay: float = 0.0  # how it applies: weight_decay_mode
    # "decoupled": Keras' optimizer weight_decay, W -= lr * wd * W after each step, on every
    # weight. "conv_l2": coupled L2 on the conv kernels only, (wd / 2) * sum(W**2) added to
    # the loss, so wd * W joins the gradient before Adam's moments, exactly as torch's
    # Adam(weight_decay=wd) on ReActNet's conv parameters (see `conv_l2_loss`).
    weight_decay_mode: str = "decoupled"
    label_smoothing: float = 0.0
    augmentation: str = "adam"  # adam / paper / none
    kernel_quantizer: str = "magnitude_aware"  # magnitude_aware / sign (+-1, no scale)
    binary_weights: bool = True  # False: binary activations, real weights (ReActNet's step 1)
    train_only_batchnorm: bool = False  # the BatchNorm-retrain stage
    teaches: bool = False  # its trained model is the teacher of the stages after it
    initializes_next: bool = True  # the next stage starts from its weights (not a twin's)
    # Re-estimate BatchNorm's moving statistics after each epoch's training steps, before
    # validation and checkpoint (recipes/batchnorm.py): for stages whose weights change
    # faster than the moving averages follow (ReActNet's step 2).
    reestimate_batchnorm: bool = False

    def __post_init__(self):
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}.")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}.")
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}.")
        if self.weight_decay_mode not in WEIGHT_DECAY_MODES:
            raise ValueError(f"weight_decay_mode must be one of {WEIGHT_DECAY_MODES}, "
                             f"got {self.weight_decay_mode!r}.")


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
    block: str = "bireal"  # the network's block: Bi-Real's, or ReActNet's ("react")
    # Distillation (bireal_tf.recipes.distill). teacher: None, "twin" (a stage of the run
    # trains it; set through with_teacher) or the path of a Keras classifier file.
    teacher: str | None = None
    distill_weight: float = 1.0  # loss = w * CE(teacher, student) + (1 - w) * CE(labels, student)
    teacher_input: str = "ours"  # how the teacher expects its images: TEACHER_INPUTS

    def __post_init__(self):
        if self.block not in BLOCKS:
            raise ValueError(f"block must be one of {BLOCKS}, got {self.block!r}.")
        if not 0.0 <= self.distill_weight <= 1.0:
            raise ValueError(f"distill_weight must be in [0, 1], got {self.distill_weight}.")
        if self.teacher_input not in TEACHER_INPUTS:
            raise ValueError(f"teacher_input must be one of {TEACHER_INPUTS}, "
                             f"got {self.teacher_input!r}.")
        if (self.teacher == TWIN) != any(s.teaches for s in self.stages):
            raise ValueError("teacher='twin' goes with a stage that trains the twin (and only "
                             "then): set it through recipe.with_teacher('twin').")

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
        settings measured here (r18_adam on full Fashion-MNIST, 32 px, batch 128,
        8 epochs: 79.4% with the ImageNet settings, 90.97% with these):

        - the batch those figures were measured at (SMALL_IMAGE_BATCH: 128, and 64 on
          the embedded subset), in place of the recipe's ImageNet batch; every stage's
          learning rate scales with it as usual;
        - Adam stages: lr 0.004 at batch 128 (scaled linearly with the batch size);
        - the paper pipeline's binary stage: Adam with linear decay in place of SGD (full
          Fashion-MNIST, 2 epochs from the same clip-stage network: SGD 76.72%, Adam
          86.32%); its real-valued stages keep SGD (Adam was no better there: 76.4% vs
          76.1% after 20,000 images of the ReLU stage) and the BatchNorm retrain its own;
        - no augmentation: random crops of centred 28 px garments cost accuracy;
        - binary convs pad with +1 (pad_values=1.0): LCE computes zero padding wrongly
          on feature maps smaller than the kernel, which inputs below 65 px have.

        ReActNet's recipes are Adam throughout, so both steps (and a twin) take the same lr
        as r18_adam; step 1 keeps its conv-kernel L2 and step 2 none, and a teacher given
        for such a run must take the same small images (`distill.load_teacher` checks).

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
        batch = SMALL_IMAGE_BATCH.get(dataset, SMALL_IMAGE_DEFAULT_BATCH)
        adapted = replace(self, stages=tuple(stages), pad_values=1.0, batch_size=batch)
        changed = {"batch_size": batch, "pad_values": 1.0, "augmentation": "none"}
        adam = [s for s in adapted.stages if s.optimizer == "adam"]
        if adam:
            changed["lr"] = (f"{SMALL_IMAGE_ADAM_LR:g} at batch {SMALL_IMAGE_ADAM_BATCH}, scaled "
                            "linearly with the batch (Adam stages)")
        if sgd_binary:
            changed["binary stage"] = "Adam with linear decay in place of SGD"
        return adapted, changed

    def with_overrides(self, stage=None, **overrides):
        """A copy with recipe fields and stage fields replaced.

        Stage fields (`epochs`, `lr`, `optimizer`, ...) go to `stage` when given,
        else to every stage but the BatchNorm retrain (which stays one epoch), except
        `augmentation`, which goes to it too: the retrain re-estimates BatchNorm on the
        training images, so they must look like those the network was trained on
        (measured: 'none' everywhere but 'paper' there cost 2.6 points, loss 0.56 -> 2.19).

        A new `epochs` without new `milestones` moves a step schedule's milestones in
        proportion (90 epochs x0.1 at 30 and 60 -> 3 epochs x0.1 at 1 and 2), so a short
        run still decays as the full one does. Kept in place, milestones beyond a short
        run never fire: 2-epoch stages then ran at the full lr and ended at 100x the
        lr the BatchNorm retrain assumes.
        """
        stage_fields = {f.name for f in dataclasses.fields(Stage)} - {"name"}
        recipe_fields = {f.name for f in dataclasses.fields(Recipe)} - {"stages"}
        unknown = set(overrides) - stage_fields - recipe_fields
        if unknown:
            raise ValueError(f"Unknown recipe fields {sorted(unknown)}.")
        teacher = overrides.pop("teacher", None)
        if teacher is not None:  # after the other overrides: a twin copies the stage they made
            return self.with_overrides(stage, **overrides).with_teacher(teacher)
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


    def with_teacher(self, teacher):
        """A copy that distills from `teacher`: a Keras classifier file, "twin", or None/"none".

        Every stage distills from the teacher except the one that trains it. "twin" is the
        same network, real-valued with ReLU (activation="relu", block kept): where the first
        stage is already that network (the paper pipeline's relu stage), it is the twin and
        the stages after it distill from its model; otherwise a stage "twin" runs first, with
        the first stage's hyper-parameters, trained on the labels. Its model teaches and does
        not initialise the next stage, so the student still starts as its recipe says.
        """
        if teacher in (None, "none"):
            teacher = None
        stages = [replace(s, teaches=False) for s in self.stages if not s.name == TWIN]
        if teacher == TWIN:
            first = stages[0]
            if first.activation == "relu":
                stages[0] = replace(first, teaches=True)
            else:
                twin = replace(first, name=TWIN, activation="relu", binary_weights=True,
                               teaches=True, initializes_next=False)
                stages.insert(0, twin)
        return replace(self, stages=tuple(stages), teacher=teacher)

    def distills(self, stage):
        """Whether `stage` learns from the run's teacher."""
        return self.teacher is not None and not stage.teaches


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
    """The stage's optimizer with its schedule, the lr scaled to the batch size.

    The optimizer's own (decoupled) weight decay only with weight_decay_mode "decoupled";
    "conv_l2" is a loss term (`conv_l2_loss`)."""
    schedule = learning_rate_schedule(recipe, stage, steps_per_epoch)
    decay = (stage.weight_decay if stage.weight_decay_mode == "decoupled" else 0.0) or None
    if stage.optimizer == "sgd":
        return tf.keras.optimizers.SGD(schedule, momentum=stage.momentum, weight_decay=decay)
    return tf.keras.optimizers.Adam(schedule, weight_decay=decay)


def conv_l2_loss(model, weight_decay):
    """(wd / 2) * sum of W**2 over the conv kernels of `model` (its 4-D trainable weights).

    ReActNet's step 1 gives torch's Adam `weight_decay=1e-5` for the parameters with 4
    dimensions or "conv" in their name: the conv kernels, and nothing else (not BatchNorm,
    the shifts, PReLU or the classifier). torch's Adam adds wd * W to the gradient before
    its moment estimates (coupled L2), which is the gradient of this term. Keras' Adam
    `weight_decay` is decoupled (AdamW: W -= lr * wd * W after the step); at lr 2.5e-3 and
    1e-5 it would shrink a weight by well under 1% over the 128 epochs, a different and
    much weaker regulariser, so the recipe uses this term. A zero-argument callable for
    `model.add_loss`; Larq's quantized kernels count with their latent real values.
    """
    kernels = [getattr(w, "latent_variable", w) for w in model.trainable_weights
               if w.shape.rank == 4]
    if not kernels:
        raise ValueError(f"{model.name} has no conv kernels to decay.")

    def loss():
        return 0.5 * weight_decay * tf.add_n([tf.reduce_sum(tf.square(k)) for k in kernels])

    return loss


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


def _react_recipe(depth):
    adam = dict(epochs=128, optimizer="adam", lr=2.5e-3, schedule="linear", augmentation="adam")
    recipe = Recipe(
        name=f"r{depth}_react",
        depth=depth,
        block="react",
        batch_size=512,
        base_batch_size=512,
        description=(f"ReAct-ResNet-{depth}: Bi-Real-{depth} with ReActNet's block, two steps "
                     "distilled from a real-valued teacher (default: the twin)"),
        stages=(
            Stage("step1", "binary", binary_weights=False, weight_decay=1e-5,
                  weight_decay_mode="conv_l2", **adam),
            # Its binary weights change faster than BatchNorm's moving averages follow
            # (measured: validation 10% while training at 92%, recipes/batchnorm.py), so
            # each epoch's statistics are re-estimated.
            Stage("step2", "binary", weight_decay=0.0, reestimate_batchnorm=True, **adam),
        ),
    )
    return recipe.with_teacher(TWIN)


RECIPES = {
    r.name: r
    for r in (
        _adam_recipe(18),
        _adam_recipe(34),
        _adam_recipe(50, lr=5e-4, batch=256),
        _paper_recipe(18, 20, 0.01, (10, 15), batch=128),
        _paper_recipe(34, 40, 0.08, (20, 30), batch=1024),
        _react_recipe(18),
        _react_recipe(34),
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
    "conv_l2_loss",
    "get_recipe",
    "learning_rate_schedule",
    "make_optimizer",
]
