"""The run directory: which run it belongs to, and where each output of the run lives.

    run.json                 which recipe and config the directory belongs to
    stages/<i>_<stage>/      per stage: checkpoints/ (every epoch), model.keras (done)
    logs/<stage>/            TensorBoard
    metrics.csv              one row per epoch of every stage
    model.keras              the final model
    summary.json             recipe, config, top-1/top-5, wall time, images/s, versions
    curves.png               training curves

In a multi-worker run the chief writes the directory itself and worker i writes
`worker-<i>/` inside it (TensorFlow saves on every worker; only the chief's copy counts).
"""
import json
import os
import shutil

from bireal_tf.recipes.errors import RunDirError
from bireal_tf.utils import atomic_write_text


class RunDirectory:
    """The paths of one run's outputs, and `claim`, which makes the directory this run's."""

    def __init__(self, path):
        self.path = os.path.abspath(path)

    @classmethod
    def for_worker(cls, output_dir, is_chief=True, task_id=0):
        """The directory this process writes: the output dir (chief), or worker-<i>/ in it."""
        output_dir = os.path.abspath(output_dir)
        return cls(output_dir if is_chief else os.path.join(output_dir, f"worker-{task_id}"))

    # -- paths --

    def stage_dir(self, index, stage):
        return os.path.join(self.path, "stages", f"{index}_{stage.name}")

    def stage_model(self, index, stage):
        """Where stage `index` saves its trained model; the stage is done once it exists."""
        return os.path.join(self.stage_dir(index, stage), "model.keras")

    def checkpoints(self, index, stage):
        return os.path.join(self.stage_dir(index, stage), "checkpoints")

    def logs(self, stage):
        return os.path.join(self.path, "logs", stage.name)

    def file(self, name):
        """run.json, metrics.csv, model.keras, summary.json, curves.png."""
        return os.path.join(self.path, name)

    # -- ownership --

    def claim(self, recipe, overwrite=False):
        """Make the directory `recipe`'s run: refuse one that holds another recipe's run or
        other files, unless `overwrite`, which deletes them (never worker-<i>/ folders)."""
        marker = self.file("run.json")
        if os.path.exists(marker):
            with open(marker) as f:
                previous = json.load(f)
            if previous.get("recipe") != recipe.name:
                if not overwrite:
                    raise RunDirError(
                        f"{self.path} holds a run of recipe {previous.get('recipe')!r}, "
                        f"not {recipe.name!r}. Choose another --output-dir, or pass "
                        "--overwrite to delete that run (the workers' worker-<i>/ folders in "
                        "it are kept: each worker clears its own)."
                    )
                self._delete_run()
            elif overwrite:
                self._delete_run()
        # The other workers of a multi-worker run write to worker-<i>/ inside the chief's
        # directory and may create it before the chief gets here: not a foreign entry.
        elif os.path.isdir(self.path) and not overwrite and any(
                not name.startswith("worker-") for name in os.listdir(self.path)):
            raise RunDirError(
                f"{self.path} is not empty and holds no bireal_tf run. Choose another "
                "--output-dir, or pass --overwrite to use it anyway."
            )
        os.makedirs(self.path, exist_ok=True)
        atomic_write_text(marker, json.dumps({"recipe": recipe.name, "config": recipe.to_dict()},
                                             indent=2))

    def _delete_run(self):
        """Delete the run but not its worker-<i>/ folders: in a multi-worker run the other
        workers write there, and may already be; each worker clears its own."""
        for entry in os.scandir(self.path):
            if entry.name.startswith("worker-") and entry.is_dir(follow_symlinks=False):
                continue
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)
