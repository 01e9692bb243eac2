"""Training recipes (hyper-parameters and stages) and the loop they share.

    from bireal_tf.recipes import get_recipe, train_recipe
    summary = train_recipe(get_recipe("r18_adam"), "runs/r18_adam")

`bireal_tf.recipes.train` is the command-line module (`python -m bireal_tf.recipes.train`).
"""
from bireal_tf.recipes.loop import (
    STRATEGIES,
    RunDirError,
    Trainer,
    TrainingError,
    TrainOptions,
    make_strategy,
    train_recipe,
)
from bireal_tf.recipes.recipe import (
    RECIPES,
    Recipe,
    Stage,
    get_recipe,
    learning_rate_schedule,
    make_optimizer,
)

__all__ = [
    "RECIPES",
    "STRATEGIES",
    "Recipe",
    "RunDirError",
    "Stage",
    "Trainer",
    "TrainingError",
    "TrainOptions",
    "get_recipe",
    "learning_rate_schedule",
    "make_optimizer",
    "make_strategy",
    "train_recipe",
]
