"""Shared test set-up: Keras 2 before anything imports TensorFlow, quiet logs, helpers."""
import os

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import bireal_tf  # noqa: E402,F401  (binds tf.keras to Keras 2)


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "slow: a slow test (LCE conversion of the large nets, end-to-end runs); CI runs it"
    )


# --- one tiny trained run, shared by the whole test run ----------------------------------------

import contextlib  # noqa: E402
import fcntl  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# The command of the shared run: the CLI as a user runs it, on the embedded Fashion-MNIST at
# 32 px (so the small-image settings apply: pad_values 1, no augmentation), two epochs of four
# steps, exported and evaluated. Tests that need *a* trained model, its .tflite, its checkpoints
# or its files use this run (copied when they change it) instead of training their own.
TRAINED_RUN_ARGS = ["r18_adam", "--dataset", "fashion_mnist_embedded", "--image-size", "32",
                    "--batch-size", "16", "--limit-train", "128", "--limit-eval", "64",
                    "--epochs", "2", "--steps-per-epoch", "4", "--seed", "0", "--export", "--quiet"]


def cli_env():
    env = dict(os.environ, TF_USE_LEGACY_KERAS="1", TF_CPP_MIN_LOG_LEVEL="2")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    env.pop("TF_CONFIG", None)
    return env


@contextlib.contextmanager
def _exclusive(lock_path):
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # other pytest-xdist workers wait here
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
    """The directory of TRAINED_RUN_ARGS' run: model.keras, model.tflite, summary.json,
    metrics.csv, export_report.json, stages/0_binary/checkpoints (ckpt-1, ckpt-2).

    Made once per test run: xdist workers share their base temp's parent, and the first
    worker to get the lock trains while the others wait. Treat it as read-only; copy it
    (shutil.copytree) to change it.
    """
    base = tmp_path_factory.getbasetemp()
    shared = base.parent if base.name.startswith("popen-gw") else base
    run = shared / "trained_run"
    with _exclusive(shared / "trained_run.lock"):
        if not (run / "summary.json").exists():
            log = shared / "trained_run.log"
            with open(log, "w") as out:
                done = subprocess.run([sys.executable, "-m", "bireal_tf.recipes.train",
                                       *TRAINED_RUN_ARGS, "--output-dir", str(run), "--overwrite"],
                                      env=cli_env(), stdout=out, stderr=subprocess.STDOUT,
                                      timeout=1800, cwd=str(ROOT))
            if done.returncode != 0:
                pytest.fail(f"the shared trained run failed:\n{log.read_text()[-3000:]}")
    summary = json.loads((run / "summary.json").read_text())
    assert "tflite" in summary, "the shared run was not exported"
    return run
