"""bireal_tf.evaluate: top-1/top-5 of a Keras model and of its LCE .tflite on real data."""
import json
import os
import subprocess
import sys
from pathlib import Path

import larq_compute_engine as lce
import numpy as np
import pytest
import tensorflow as tf

from bireal_tf.data import load_dataset
from bireal_tf.evaluate import EvaluationError, evaluate
from bireal_tf.export import ModelFileError
from bireal_tf.models import BiRealNet18

REPO = Path(__file__).resolve().parents[1]
DATASET = "fashion_mnist_embedded"  # 32x32, 10 classes
LIMIT = 256  # four batches of 64


@pytest.fixture(scope="module")
def r18(trained_run):
    """The shared trained run's R18 for 32x32 Fashion-MNIST (tests/conftest.py) and its
    .tflite, exported and verified by the training CLI's --export.

    pad_values=1.0 (the small-image settings): at 32x32 the last stages' maps are 2x2 and
    1x1, smaller than the 3x3 kernels, where LCE 0.16 computes zero padding wrongly (export
    refuses it; see tests/test_export.py::test_lce_zero_padding_bug_is_caught_and_explained).
    """
    from bireal_tf.export import load_keras_model

    return load_keras_model(trained_run / "model.keras"), trained_run / "model.tflite"


def test_keras_and_tflite_give_the_same_top1(r18):
    model, path = r18
    keras = evaluate(model, DATASET, limit=LIMIT)
    lite = evaluate(path, DATASET, limit=LIMIT)
    print(f"\nKeras top-1 {keras['top1']:.4f} ({keras['seconds']:.1f} s), "
          f".tflite top-1 {lite['top1']:.4f} ({lite['seconds']:.1f} s)")
    assert keras["num_examples"] == lite["num_examples"] == LIMIT
    assert (keras["model_kind"], lite["model_kind"]) == ("keras", "tflite")
    assert abs(keras["top1"] - lite["top1"]) <= 0.005  # within half a point
    assert abs(keras["top5"] - lite["top5"]) <= 0.005
    assert keras["top5_k"] == 5 and 0 <= keras["top1"] <= keras["top5"] <= 1
    assert keras["dataset"] == DATASET and keras["split"] == "test" and keras["image_size"] == 32


def test_evaluate_accepts_a_dataset_spec_and_the_tflite_bytes(r18):
    _, path = r18
    spec = load_dataset(DATASET, "test", batch_size=32, limit=64)
    by_spec = evaluate(path.read_bytes(), spec)
    by_name = evaluate(path, DATASET, batch_size=32, limit=64)
    assert by_spec["top1"] == by_name["top1"] and by_spec["num_examples"] == 64


def test_cli_evaluates_a_tflite_and_writes_json(r18, tmp_path):
    _, path = r18
    env = dict(os.environ, TF_USE_LEGACY_KERAS="1", TF_CPP_MIN_LOG_LEVEL="2")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    out = tmp_path / "eval.json"
    done = subprocess.run(
        [sys.executable, "-m", "bireal_tf.evaluate", str(path), "--dataset", DATASET,
         "--limit", "64", "--json", str(out), "--quiet"],
        env=env, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "top-1" in done.stdout
    result = json.loads(out.read_text())
    assert result["num_examples"] == 64 and result["model_kind"] == "tflite"



def test_cli_bad_input_is_one_error_line_and_exit_2(tmp_path, capsys):
    """The CLI's own main() in this process (the entry point itself runs in the test above)."""
    from bireal_tf.evaluate import main

    assert main([str(tmp_path / "gone.tflite")]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "gone.tflite' does not exist" in errors[0]


# --- errors --------------------------------------------------------------------------------


def test_input_size_mismatch_names_both_shapes_and_the_fix(r18):
    _, path = r18
    with pytest.raises(EvaluationError, match=r"expects inputs of shape 32x32x3 .* yields "
                                              r"64x64x3 images\. Pass --image-size 32"):
        evaluate(path, DATASET, image_size=64, limit=8)


def test_a_tflite_without_lce_ops_is_refused_unless_allowed(tmp_path):
    inputs = tf.keras.Input((32, 32, 3))
    x = tf.keras.layers.Conv2D(4, 3, padding="same")(inputs)
    x = tf.keras.layers.GlobalAveragePooling2D()(x)
    model = tf.keras.Model(inputs, tf.keras.layers.Dense(10)(x))
    path = tmp_path / "float.tflite"
    path.write_bytes(lce.convert_keras_model(model))
    with pytest.raises(EvaluationError, match="not an LCE binary model.*--allow-non-lce"):
        evaluate(path, DATASET, limit=8)
    result = evaluate(path, DATASET, limit=8, allow_non_lce=True)
    assert result["num_examples"] == 8


def test_missing_and_corrupt_files_are_named(tmp_path):
    with pytest.raises(ModelFileError, match=r"missing\.tflite' does not exist"):
        evaluate(tmp_path / "missing.tflite", DATASET, limit=8)
    with pytest.raises(ModelFileError, match=r"missing\.keras' does not exist"):
        evaluate(tmp_path / "missing.keras", DATASET, limit=8)
    garbage = tmp_path / "garbage.tflite"
    garbage.write_bytes(b"\x00\x01 definitely not a flatbuffer" * 4)
    with pytest.raises(ModelFileError, match=r"garbage\.tflite' is not a valid TFLite flatbuffer"):
        evaluate(garbage, DATASET, limit=8)
    broken = tmp_path / "broken.keras"
    broken.write_bytes(np.random.default_rng(0).bytes(256))
    with pytest.raises(ModelFileError, match=r"Could not load a Keras model from '.*broken\.keras'"):
        evaluate(broken, DATASET, limit=8)


def test_truncated_tflite_is_a_clear_error(r18, tmp_path):
    _, path = r18
    cut = tmp_path / "cut.tflite"
    cut.write_bytes(path.read_bytes()[: 4096])
    with pytest.raises(ModelFileError, match=r"cut\.tflite"):
        evaluate(cut, DATASET, limit=8)


def test_classes_mismatch_is_explained():
    model = BiRealNet18(input_shape=(32, 32, 3), num_classes=3)
    with pytest.raises(EvaluationError, match="3 outputs but dataset .* has 10 classes"):
        evaluate(model, DATASET, limit=8)
