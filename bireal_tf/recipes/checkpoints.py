"""A stage's checkpoints: after every epoch, and in the middle of one (on a signal, or
every N steps), with a fallback past a damaged checkpoint.

Keras' `BackupAndRestore` keeps one checkpoint and deletes it when training ends, and it
saves the whole model it is given (a `Distiller` would carry its teacher along), so it has
nothing to fall back to when that one file is damaged. A stage keeps its last two epoch
checkpoints, of the student and its optimizer only, and reads every value of the newest
before trusting it.

    checkpoints/ckpt-<epoch>             after each epoch (model, optimizer, epoch)
    checkpoints/mid_epoch/ckpt-<step>    inside an epoch (and the step in it)

A failed save (a full disk) raises `OutputWriteError`, naming the directory and the
cause, and leaves no temporary files; the checkpoints before it stay as they were.
"""
import glob
import os
import shutil
import sys

import tensorflow as tf

from bireal_tf.utils import write_error

# Two: when the newest is damaged (a truncated copy, a full disk), the one before it is whole.
KEEP = 2
MID_EPOCH = "mid_epoch"


def _value(reader, name, default=0):
    key = f"{name}/.ATTRIBUTES/VARIABLE_VALUE"
    return int(reader.get_tensor(key)) if reader.has_tensor(key) else default


def latest_readable(directory, stage_name):
    """(path, epoch, step) of the newest checkpoint in `directory` whose every value reads:
    it holds the state after `step` steps of epoch `epoch` (0-based; step 0 for an epoch
    checkpoint, which completes `epoch` epochs). (None, 0, 0) if there is none.

    A checkpoint that cannot be read (truncated or corrupt files) is skipped with a
    warning naming it, and the one before it is used.
    """
    state = tf.train.get_checkpoint_state(directory) if os.path.isdir(directory) else None
    paths = list(state.all_model_checkpoint_paths) if state else []
    for path in reversed(paths):
        try:
            reader = tf.train.load_checkpoint(path)
            for name in reader.get_variable_to_shape_map():
                reader.get_tensor(name)  # reads every value: a damaged file fails here
            return path, _value(reader, "epoch"), _value(reader, "step")
        except (tf.errors.OpError, ValueError, IndexError, RuntimeError) as err:
            line = (str(err).strip().splitlines() or [""])[0][:200]
            print(f"Warning: checkpoint {path} of stage {stage_name} cannot be read "
                  f"({type(err).__name__}: {line}); using the one before it.",
                  file=sys.stderr, flush=True)
    if paths:
        print(f"Warning: no checkpoint of stage {stage_name} could be read in {directory}; "
              "the one before it is used.", file=sys.stderr, flush=True)
    return None, 0, 0


def remove_partial_saves(directory):
    """Delete what an interrupted save left in `directory` (TensorFlow writes a checkpoint
    into `<name>_temp/` first); returns the paths removed."""
    partial = glob.glob(os.path.join(glob.escape(directory), "*_temp*"))
    for path in partial:
        shutil.rmtree(path, ignore_errors=True) if os.path.isdir(path) else os.unlink(path)
    return partial


def resume_point(directory, stage_name):
    """(path, epoch, step) of a stage whose checkpoints are in `directory` to resume from:
    the newer of its readable epoch and mid-epoch checkpoints; (None, 0, 0) to start the
    stage afresh. Removes what an interrupted save left behind."""
    mid_epoch_dir = os.path.join(directory, MID_EPOCH)
    for path in (directory, mid_epoch_dir):
        if os.path.isdir(path):
            remove_partial_saves(path)
    at_epoch = latest_readable(directory, stage_name)
    mid_epoch = latest_readable(mid_epoch_dir, stage_name)
    if mid_epoch[0] and mid_epoch[1:] > at_epoch[1:]:
        return mid_epoch
    return at_epoch


class StageCheckpoints:
    """Checkpoints of one stage in `directory`: ckpt-<epoch> after each epoch, and
    mid_epoch/ckpt-<optimizer step> inside one."""

    def __init__(self, model, optimizer, directory):
        self.directory = directory
        # The counters live outside any strategy scope: plain variables on the host.
        self.epoch = tf.Variable(0, dtype=tf.int64, trainable=False)
        self.step = tf.Variable(0, dtype=tf.int64, trainable=False)
        self.optimizer = optimizer
        # An epoch checkpoint holds no step (its files are as they were before mid-epoch
        # checkpoints existed, so older runs resume).
        epochs = tf.train.Checkpoint(model=model, optimizer=optimizer, epoch=self.epoch)
        steps = tf.train.Checkpoint(model=model, optimizer=optimizer, epoch=self.epoch,
                                    step=self.step)
        self.epochs = tf.train.CheckpointManager(epochs, directory, max_to_keep=KEEP)
        self.steps = tf.train.CheckpointManager(steps, os.path.join(directory, MID_EPOCH),
                                                max_to_keep=1)

    def restore(self, path):
        """Model weights, optimizer slots and step counter as saved in `path`."""
        manager = self.steps if os.path.dirname(path) == self.steps.directory else self.epochs
        manager.checkpoint.restore(path).assert_existing_objects_matched()

    def save(self, epoch):
        """The state after `epoch` completed epochs, as ckpt-<epoch>."""
        self.epoch.assign(epoch)
        return self._save(self.epochs, epoch)

    def save_mid_epoch(self, epoch, step):
        """The state after `step` steps of epoch `epoch` (0-based)."""
        self.epoch.assign(epoch)
        self.step.assign(step)
        return self._save(self.steps, int(self.optimizer.iterations.numpy()))

    @staticmethod
    def _save(manager, number):
        try:
            return manager.save(checkpoint_number=number)
        except (OSError, tf.errors.OpError) as err:
            remove_partial_saves(manager.directory)
            raise write_error(manager.directory, err) from err

    @property
    def latest(self):
        return self.epochs.latest_checkpoint
