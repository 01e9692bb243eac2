"""Learning-rate schedules of the recipes, registered with Keras.

Registered so that a model saved with its optimizer (as the training loop saves
them) loads with `tf.keras.models.load_model` after `import bireal_tf`.
"""
import tensorflow as tf


@tf.keras.utils.register_keras_serializable(package="bireal_tf")
class StageSchedule(tf.keras.optimizers.schedules.LearningRateSchedule):
    """The learning rate of one stage as a function of its step.

    linear:   lr * (1 - step / total_steps)           (the Adam recipe; reaches 0 at the end)
    step:     lr * 0.1 ** (number of milestones <= epoch)
    constant: lr
    """

    def __init__(self, lr, schedule, total_steps, steps_per_epoch, milestones=()):
        self.lr = float(lr)
        self.schedule = schedule
        self.total_steps = int(total_steps)
        self.steps_per_epoch = int(steps_per_epoch)
        self.milestones = tuple(int(m) for m in milestones)

    def __call__(self, step):
        step = tf.cast(step, tf.float32)
        if self.schedule == "linear":
            return self.lr * tf.maximum(0.0, 1.0 - step / float(self.total_steps))
        if self.schedule == "step":
            epoch = tf.floor(step / float(self.steps_per_epoch))
            passed = tf.add_n([tf.cast(epoch >= m, tf.float32) for m in self.milestones] or [0.0])
            return self.lr * tf.pow(0.1, passed)
        return tf.constant(self.lr)

    def get_config(self):
        return {
            "lr": self.lr,
            "schedule": self.schedule,
            "total_steps": self.total_steps,
            "steps_per_epoch": self.steps_per_epoch,
            "milestones": list(self.milestones),
        }
