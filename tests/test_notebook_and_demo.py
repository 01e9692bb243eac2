"""The quickstart notebook runs to the end; `make demo`'s run meets its accuracy targets."""
import json
import os
import subprocess
import sys

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_quickstart_notebook_runs_to_the_end(tmp_path):
    nb = nbformat.read(os.path.join(ROOT, "examples", "quickstart.ipynb"), as_version=4)
    os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
    client = NotebookClient(nb, timeout=900, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    outputs = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                      for o in c.get("outputs", []))
    assert "16 binary convs" in outputs
    assert "LceBconv2d" in outputs
    assert "tflite top-1" in outputs
    assert os.path.getsize(tmp_path / "quickstart.tflite") > 0


@pytest.mark.slow
def test_demo_reaches_80_percent_and_its_tflite_matches_keras(tmp_path):
    """The exact `make demo` command (but for the output dir); then its portable file
    (stock LiteRT): no custom op, top-1 = the LCE file's on >= 99.9% of the 2,000 test images
    through ai-edge-litert, and its accuracy from `evaluate`."""
    out = tmp_path / "demo"
    env = dict(os.environ, TF_USE_LEGACY_KERAS="1", TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=ROOT)
    run = subprocess.run(
        [sys.executable, "-m", "bireal_tf.recipes.train", "r18_adam", "--demo", "--quiet",
         "--output-dir", str(out)],
        env=env, capture_output=True, text=True, timeout=3000,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    print("demo:", json.dumps({k: summary[k] for k in ("top1", "top5", "wall_time_seconds",
                                                        "train_images_per_second")}))
    print("tflite:", json.dumps(summary["tflite"]))
    assert summary["config"]["stages"][0]["epochs"] == 6
    assert summary["dataset"]["test_examples"] == 2000
    assert summary["top1"] >= 0.80
    assert abs(summary["tflite"]["top1"] - summary["top1"]) <= 0.005
    assert summary["tflite"]["num_examples"] == 2000
    report = json.loads((out / "export_report.json").read_text())
    assert report["binary_convs"]["lce_bconv2d"] == 16
    for name in ("model.keras", "model.tflite", "metrics.csv", "curves.png"):
        assert (out / name).exists(), name
    assert "Everything is in" in run.stdout

    portable, lce_file = out / "model_portable.tflite", out / "model_lce.tflite"
    run = subprocess.run(
        [sys.executable, "-m", "bireal_tf.export", str(out / "model.keras"), "--portable",
         "-o", str(portable), "--lce-output", str(lce_file), "--report", str(out / "portable.json")],
        env=env, capture_output=True, text=True, timeout=1800)
    assert run.returncode == 0, run.stderr[-4000:]
    _check_demo_portable(portable, lce_file, keras_top1=summary["top1"])


def _check_demo_portable(portable, lce_file, keras_top1):
    import numpy as np

    from bireal_tf.data import load_dataset
    from bireal_tf.evaluate import evaluate
    from bireal_tf.export import LiteRTRunner, TFLiteRunner
    from bireal_tf.export.flatbuffer import TFLiteGraph

    assert not [op for op in TFLiteGraph(portable.read_bytes()).histogram if op.startswith("Lce")]
    test = load_dataset("fashion_mnist_embedded", "test", batch_size=500)
    x = np.concatenate([np.asarray(images) for images, _ in test.dataset])
    assert len(x) == 2000
    on_litert = LiteRTRunner(portable.read_bytes()).predict(x).argmax(1)
    on_lce = TFLiteRunner(lce_file.read_bytes()).predict(x).argmax(1)
    agreement = float(np.mean(on_litert == on_lce))
    accuracy = evaluate(str(portable), "fashion_mnist_embedded")
    print("portable:", json.dumps({"agreement_with_lce": agreement, "top1": accuracy["top1"],
                                   "keras_top1": keras_top1}))
    assert agreement >= 0.999
    assert accuracy["num_examples"] == 2000 and abs(accuracy["top1"] - keras_top1) <= 0.005
