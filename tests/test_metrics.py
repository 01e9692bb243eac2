"""One top-k rule: the training loop's top1/top5 and bireal_tf.evaluate's agree, ties included."""
from types import SimpleNamespace

import numpy as np
import pytest
import tensorflow as tf

from bireal_tf.evaluate import evaluate
from bireal_tf.metrics import TopKAccuracy, top_k_hits
from bireal_tf.recipes.loop import compile_for_stage

# Scores of 10 classes with ties, and the label of each row.
TIED = np.array([
    [1, 1, 1, 1, 1, 1, 1, 1, 1, 1],  # all tied, label 7: out of the top 5 (classes 0-4)
    [1, 1, 1, 1, 1, 1, 1, 1, 1, 1],  # all tied, label 2: in the top 5, not the top 1
    [9, 8, 7, 6, 5, 5, 5, 1, 0, 0],  # three share the 5th place, label 6: ranks 7th
    [9, 8, 7, 6, 5, 5, 5, 1, 0, 0],  # the same, label 4: ranks 5th
    [3, 3, 0, 0, 0, 0, 0, 0, 0, 0],  # tied for the first place, label 1: top 5 only
    [0, 0, 0, 0, 0, 0, 0, 0, 2, 0],  # no tie at the top, label 8: top 1
], np.float32)
LABELS = np.array([7, 2, 6, 4, 1, 8])
TOP1, TOP5 = 1 / 6, 4 / 6


def test_training_and_evaluate_count_tied_scores_alike():
    """A model that outputs the scores above: the loop's compiled metrics and `evaluate`
    give the same top-1 and top-5, and both are the rule's."""
    images = TIED.reshape(-1, 1, 1, 10)
    model = tf.keras.Sequential([tf.keras.Input((1, 1, 10)), tf.keras.layers.Flatten()])
    compile_for_stage(model, steps_per_execution=1)
    trained = model.evaluate(images, np.eye(10, dtype=np.float32)[LABELS], batch_size=4,
                             return_dict=True, verbose=0)

    spec = SimpleNamespace(
        dataset=tf.data.Dataset.from_tensor_slices((images, LABELS)).batch(4),
        num_classes=10, image_size=1, channels=10, name="tied", split="test")
    evaluated = evaluate(model, spec)

    assert evaluated["correct_top1"] == 1 and evaluated["correct_top5"] == 4
    assert trained["top1"] == pytest.approx(evaluated["top1"]) == pytest.approx(TOP1)
    assert trained["top5"] == pytest.approx(evaluated["top5"]) == pytest.approx(TOP5)

    # Keras' own top-5 counts every class tied at the 5th place as a hit: all six rows.
    keras = tf.keras.metrics.TopKCategoricalAccuracy(5)
    keras.update_state(np.eye(10)[LABELS], TIED)
    assert float(keras.result()) == 1.0


def test_top_k_hits_is_the_position_in_a_stable_sort():
    """On scores full of ties and NaNs: the label's position in a stable descending sort
    (NaN last) is below k."""
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 4, size=(500, 10)).astype(np.float32)
    scores[rng.random(scores.shape) < 0.05] = np.nan
    labels = rng.integers(0, 10, size=500)
    order = np.argsort(-scores, axis=1, kind="stable")
    position = np.argmax(order == labels[:, None], axis=1)
    for k in (1, 5, 10):
        np.testing.assert_array_equal(top_k_hits(labels, scores, k).numpy(), position < k)

    integers = rng.integers(-128, 128, size=(500, 10)).astype(np.int8)  # quantized outputs
    order = np.argsort(-integers.astype(np.int32), axis=1, kind="stable")
    position = np.argmax(order == labels[:, None], axis=1)
    np.testing.assert_array_equal(top_k_hits(labels, integers, 5).numpy(), position < 5)


def test_the_metric_serializes_with_its_k():
    metric = TopKAccuracy(3)
    clone = tf.keras.metrics.deserialize(tf.keras.metrics.serialize(metric))
    assert type(clone) is TopKAccuracy and clone.name == "top3"
    clone.update_state(np.eye(10)[LABELS], TIED)
    expected = np.mean(top_k_hits(LABELS, TIED, 3).numpy())
    assert float(clone.result()) == pytest.approx(expected)
