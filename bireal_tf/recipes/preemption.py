"""Stopping for a signal: SIGTERM (schedulers, spot machines, `kill`) or SIGINT (Ctrl-C).

A run watches for both while it trains. On a signal it finishes the step (the train
function's call of `steps_per_execution` steps) that is running, saves a mid-epoch
checkpoint of the stage, says in one line where it is and how to go on, and stops with
`Preempted`; the CLI exits with status 143 (SIGTERM) or 130 (SIGINT). The same command
then resumes from that step.

The watching is TensorFlow's `PreemptionCheckpointHandler`. On one machine (default,
one-device and mirrored strategies) it saves at the next step; in a multi-worker run
the worker that got the signal has every worker agree on the step first (through the
coordination service), so all of them save the same step and stop together, whichever
worker the signal reached. The handler saves through `save_fn`: the current stage's
mid-epoch checkpoint (`MidEpochCheckpoints`), since one handler serves all stages.
"""
import os
import signal
import threading

import tensorflow as tf

from bireal_tf.recipes.errors import TrainingError

EXIT_STATUS = {"SIGTERM": 143, "SIGINT": 130}  # 128 + the signal's number, as shells report


class Preempted(TrainingError):
    """The run stopped for a signal after saving a checkpoint; `status` is the exit status."""

    def __init__(self, message, status):
        super().__init__(message)
        self.status = status


class PreemptionWatch:
    """For the length of a run (`with`): the signal watch, and the stage it saves.

    `watch(saver, ...)` gives each stage's `fit` a callback that checks for a signal after
    every step; `saver()` writes the stage's mid-epoch checkpoint and returns its path.
    """

    def __init__(self, directory, cluster_resolver=None):
        self.directory = directory
        self.cluster_resolver = cluster_resolver
        self._saver = None
        self._saved = None
        self._signal = "SIGTERM"

    def __enter__(self):
        self.handler = None
        if threading.current_thread() is not threading.main_thread():
            # Python delivers signals to the main thread only: a run started from another
            # thread is not watched (--checkpoint-every still saves).
            return self
        self._previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
        # The handler needs a checkpoint to restore at start; the saving goes through
        # save_fn to the current stage's own checkpoints, so this one stays empty.
        manager = tf.train.CheckpointManager(tf.train.Checkpoint(), self.directory, max_to_keep=1)
        config = tf.distribute.experimental.TerminationConfig(
            exit_fn=self._stop, save_fn=self._save, grace_period=0)
        self.handler = tf.distribute.experimental.PreemptionCheckpointHandler(
            self.cluster_resolver, manager, termination_config=config)
        signal.signal(signal.SIGINT, self._on_sigint)  # Ctrl-C: the same as SIGTERM
        return self

    def __exit__(self, *exc):
        if self.handler is None:
            return False
        self.handler.__del__()  # stops its watcher threads (multi-worker)
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        return False

    def _on_sigint(self, signum, frame):
        if self._signal == "SIGINT":  # a second Ctrl-C: stop now, as Python would
            raise KeyboardInterrupt
        self._signal = "SIGINT"
        os.kill(os.getpid(), signal.SIGTERM)  # to the handler's own SIGTERM watch

    def _save(self):
        self._saved = self._saver(*self.position)

    def _stop(self):
        status = EXIT_STATUS[self._signal]
        raise Preempted(
            f"Stopped by {self._signal} (or a worker's): checkpoint {self._saved} written. "
            "Run the same command again to continue from it.", status)

    def watch(self, saver, steps_per_epoch, first_step=0, checkpoint_every=None):
        """A Keras callback for a stage's `fit` over epochs of `steps_per_epoch` steps, the
        first of which starts at its step `first_step`. After each step it saves and stops
        the run if a signal came, and saves every `checkpoint_every` steps if asked;
        `saver(epoch, step)` writes the stage's checkpoint and returns its path."""
        self._saver = saver  # what a signal saves, through the handler's save_fn
        return _StepEnd(self, saver, steps_per_epoch, first_step, checkpoint_every)


class _StepEnd(tf.keras.callbacks.Callback):
    def __init__(self, watch, saver, steps_per_epoch, first_step, checkpoint_every):
        super().__init__()
        self.watch = watch
        self.saver = saver
        self.steps_per_epoch = steps_per_epoch
        self.first_step = first_step  # steps of the first epoch taken before this fit
        self.checkpoint_every = checkpoint_every

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch
        self.last = epoch * self.steps_per_epoch + self.first_step

    def on_epoch_end(self, epoch, logs=None):
        self.first_step = 0

    def on_train_batch_end(self, batch, logs=None):
        done = self.first_step + batch + 1  # steps of this epoch taken
        if done >= self.steps_per_epoch:
            # The epoch's end (re-estimation, validation, its checkpoint) comes next and
            # saves the state; a signal now is taken at the next epoch's first step.
            return
        self.watch.position = (self.epoch, done)
        if self.watch.handler is not None:
            self.watch.handler.save_checkpoint_if_preempted()
        now, every = self.epoch * self.steps_per_epoch + done, self.checkpoint_every
        if every and self.last // every != now // every:
            self.saver(self.epoch, done)
        self.last = now
