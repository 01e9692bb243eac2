"""A stage's checkpoints: model, optimizer and the epoch counter, with a fallback past
a damaged checkpoint.

Keras' `BackupAndRestore` keeps one checkpoint and deletes it when training ends, and it
saves the whole model it is given (a `Distiller` would carry its teacher along), so it has
nothing to fall back to when that one file is damaged. The stage keeps its last two,
of the student and its optimizer only, and reads every value of the newest before
trusting it.
"""
import sys

import tensorflow as tf

# Two: when the newest is damaged (a truncated copy, a full disk), the one before it is whole.
KEEP = 2


def latest_readable(directory, stage_name):
    """(path, epoch) of the newest checkpoint in `directory` whose every value reads;
    (None, 0) if there is none.

    A checkpoint that cannot be read (truncated or corrupt files) is skipped with a
    warning naming it, and the one before it is used.
    """
    state = tf.train.get_checkpoint_state(directory)
    paths = list(state.all_model_checkpoint_paths) if state else []
    for path in reversed(paths):
        try:
            reader = tf.train.load_checkpoint(path)
            for name in reader.get_variable_to_shape_map():
                reader.get_tensor(name)  # reads every value: a damaged file fails here
            return path, int(reader.get_tensor("epoch/.ATTRIBUTES/VARIABLE_VALUE"))
        except (tf.errors.OpError, ValueError, IndexError, RuntimeError) as err:
            line = (str(err).strip().splitlines() or [""])[0][:200]
            print(f"Warning: checkpoint {path} of stage {stage_name} cannot be read "
                  f"({type(err).__name__}: {line}); using the one before it.",
                  file=sys.stderr, flush=True)
    if paths:
        print(f"Warning: no checkpoint of stage {stage_name} could be read; the stage "
              "starts over.", file=sys.stderr, flush=True)
    return None, 0


class StageCheckpoints:
    """Checkpoints of one stage in `directory`, numbered by the epochs they complete."""

    def __init__(self, model, optimizer, directory):
        # The epoch counter lives outside any strategy scope: a plain variable on the host.
        self.checkpoint = tf.train.Checkpoint(
            model=model, optimizer=optimizer, epoch=tf.Variable(0, dtype=tf.int64, trainable=False))
        self.manager = tf.train.CheckpointManager(self.checkpoint, directory, max_to_keep=KEEP)

    def restore(self, path):
        """Model weights, optimizer slots and step counter as saved in `path`."""
        self.checkpoint.restore(path).assert_existing_objects_matched()

    def save(self, epoch):
        """Save the state after `epoch` completed epochs as ckpt-<epoch>."""
        self.checkpoint.epoch.assign(epoch)
        return self.manager.save(checkpoint_number=epoch)

    @property
    def latest(self):
        return self.manager.latest_checkpoint
