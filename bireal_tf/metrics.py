"""Top-k accuracy with one rule for tied scores, for training and evaluation alike.

The training loop compiles its models with `accuracy_metrics()` (logged as `top1`
and `top5`), and `bireal_tf.evaluate` counts its hits with `top_k_hits`, so the two
give the same figures on the same scores, ties included.
"""

import tensorflow as tf

__all__ = ["TopKAccuracy", "accuracy_metrics", "top_k_hits"]


def top_k_hits(labels, scores, k):
    """Whether each example's label is among its `k` best-scored classes.

    The classes of an example are ranked by score, highest first; classes with equal
    scores rank by class index, lowest first (the order of `argmax` and of a stable
    sort); NaN scores rank last. The top k are the first k of that ranking: always
    exactly k classes (all of them when there are k or fewer), so `k = 1` is
    `argmax(scores) == label`.

    Ties: a label tied with the class at the k-th place is a hit only if it ranks
    before the classes it is tied with; when several classes share the k-th place,
    the top k take those of the lowest indices. Keras' `TopKCategoricalAccuracy`
    (`tf.math.in_top_k`) instead counts every class tied at the k-th place as a hit,
    which credits a model that gives every class the same score with a top-5 of 1.
    Under this rule such a model scores what a fixed guess of the first k classes would.

    Args:
        labels: class indices, shape [batch] (or [batch, 1]).
        scores: logits or probabilities (or integer scores), shape [batch, classes].
        k: how many classes count as the top.

    Returns:
        A bool tensor of shape [batch].
    """
    scores = tf.convert_to_tensor(scores)
    if not scores.dtype.is_floating:
        scores = tf.cast(scores, tf.float64)  # exact for integer scores; NaN tests need floats
    labels = tf.cast(tf.reshape(labels, [-1]), tf.int32)
    label_scores = tf.gather(scores, labels, axis=1, batch_dims=1)[:, None]
    classes = tf.range(tf.shape(scores)[-1])[None, :]
    lower_index = classes < labels[:, None]

    nan, label_nan = tf.math.is_nan(scores), tf.math.is_nan(label_scores)
    # Class j ranks before the label: a higher score, or an equal one (NaN equal to
    # NaN) at a lower index; any number ranks before a NaN.
    higher = (scores > label_scores) | (label_nan & ~nan)
    equal = (scores == label_scores) | (label_nan & nan)
    ahead = higher | (equal & lower_index)
    rank = tf.reduce_sum(tf.cast(ahead, tf.int32), axis=-1)
    return rank < k


def _one_hot_top_k(y_true, y_pred, k):
    """`top_k_hits` for one-hot (or mixed) labels: the label is y_true's argmax."""
    return tf.cast(top_k_hits(tf.argmax(y_true, axis=-1), y_pred, k), tf.float32)


@tf.keras.utils.register_keras_serializable(package="bireal_tf")
class TopKAccuracy(tf.keras.metrics.MeanMetricWrapper):
    """The fraction of examples whose label is among the k best-scored classes.

    Labels one-hot, as the training loop's loss takes them; ties as `top_k_hits`.
    """

    def __init__(self, k=5, name=None, dtype=None):
        super().__init__(_one_hot_top_k, name=name or f"top{k}", dtype=dtype, k=k)


def accuracy_metrics():
    """The accuracy metrics the training loop compiles with: `top1` and `top5`."""
    return [TopKAccuracy(1, name="top1"), TopKAccuracy(5, name="top5")]
