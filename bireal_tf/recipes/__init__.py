"""Training recipes (hyper-parameters and stages) and the loop they share."""
from bireal_tf.recipes.loop import (
    STRATEGIES,
    RunDirError,
    Trainer,
    TrainingError,
    make_strategy,
    train,
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
    "get_recipe",
    "learning_rate_schedule",
    "make_optimizer",
    "make_strategy",
    "train",
]
