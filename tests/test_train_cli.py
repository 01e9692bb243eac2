"""`python -m bireal_tf.recipes.train`: errors, kill and resume, distribution."""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf

from bireal_tf.recipes.train import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_ARGS = ["--dataset", "fashion_mnist_embedded", "--image-size", "32", "--batch-size", "16",
             "--limit-train", "128", "--limit-eval", "32", "--quiet"]


def env():
    e = dict(os.environ, TF_USE_LEGACY_KERAS="1", TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=ROOT)
    e.pop("TF_CONFIG", None)
    return e


def cli(*args):
    return [sys.executable, "-m", "bireal_tf.recipes.train", *args]


def weights_of(path):
    return [w.numpy() for w in tf.keras.models.load_model(path, compile=False).weights]


# --- errors ----------------------------------------------------------------------------


def test_list_prints_one_line_per_recipe(capsys):
    assert main(["--list"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split()[0] for line in lines] == [
        "r18_adam", "r34_adam", "r50_adam", "r18_paper", "r34_paper"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["r19_adam"], "valid recipes: r18_adam, r34_adam, r50_adam, r18_paper, r34_paper"),
        (["r18_adam", "--dataset", "mnist"], "fashion_mnist_embedded"),
        (["r18_paper", "--stage", "warmup"], "valid stages: relu, leaky_clip, clip, binary"),
        (["r18_adam", "--strategy", "horovod"], "valid strategies: default, one_device"),
        (["r18_adam", "--dataset", "folder", "--data-dir", "/nonexistent/imagenet"],
         "/nonexistent/imagenet"),
        (["r18_adam", "--dataset", "imagenet2012", "--data-dir", "{tmp}"], "manual"),
    ],
)
def test_bad_input_gets_a_clear_error(tmp_path, capsys, args, message):
    args = [a.replace("{tmp}", str(tmp_path / "tfds")) for a in args]
    code = main([*args, "--output-dir", str(tmp_path / "out"), "--quiet"])
    assert code == 2
    assert message in capsys.readouterr().err


def test_empty_folder_dataset_is_refused(tmp_path, capsys):
    (tmp_path / "data" / "train").mkdir(parents=True)
    code = main(["r18_adam", "--dataset", "folder", "--data-dir", str(tmp_path / "data"),
                 "--output-dir", str(tmp_path / "out"), "--quiet"])
    assert code == 2
    assert "class" in capsys.readouterr().err


# --- kill and resume -------------------------------------------------------------------


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_weights(tmp_path):
    args = [*TINY_ARGS, "--epochs", "4", "--steps-per-epoch", "6", "--seed", "3",
            "--deterministic", "--no-validate"]
    straight, killed = str(tmp_path / "straight"), str(tmp_path / "killed")

    proc = subprocess.Popen(cli("r18_adam", *args, "--output-dir", killed), env=env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    first = os.path.join(killed, "stages", "0_binary", "checkpoints", "ckpt-1.index")
    deadline = time.time() + 300
    while not os.path.exists(first) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)  # a real kill: no handler, no cleanup
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert os.path.exists(first)
    assert not os.path.exists(os.path.join(killed, "model.keras"))

    resumed = subprocess.run(cli("r18_adam", *args, "--output-dir", killed), env=env(),
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    done = subprocess.run(cli("r18_adam", *args, "--output-dir", straight), env=env(),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr

    a = weights_of(os.path.join(straight, "model.keras"))
    b = weights_of(os.path.join(killed, "model.keras"))
    assert len(a) == len(b)
    for x, y in zip(a, b):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
    with open(os.path.join(killed, "metrics.csv")) as f:
        assert [line.split(",")[1] for line in f.read().splitlines()[1:]] == ["1", "2", "3", "4"]


# --- distribution ----------------------------------------------------------------------

TWO_CPUS = """
import json, sys
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import bireal_tf
from bireal_tf.recipes import get_recipe, train
recipe = get_recipe("r18_adam").with_overrides(
    dataset="fashion_mnist_embedded", image_size=32, batch_size=32, epochs=2, steps_per_epoch=4,
    seed=5)
summary = train(recipe, sys.argv[2], strategy=sys.argv[1], limit_train=128, limit_eval=64,
                verbose=0, deterministic=False)
print("REPLICAS", summary["replicas"])
"""


@pytest.mark.slow
def test_mirrored_strategy_on_two_cpu_devices_matches_one_device(tmp_path):
    losses = {}
    for strategy in ("mirrored", "default"):
        out = str(tmp_path / strategy)
        run = subprocess.run([sys.executable, "-c", TWO_CPUS, strategy, out], env=env(),
                             capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, run.stderr[-3000:]
        assert f"REPLICAS {2 if strategy == 'mirrored' else 1}" in run.stdout
        with open(os.path.join(out, "metrics.csv")) as f:
            rows = f.read().splitlines()[1:]
        losses[strategy] = np.array([float(r.split(",")[2]) for r in rows])
    # Same data, same init; BatchNorm sees half batches per replica, so close, not equal.
    np.testing.assert_allclose(losses["mirrored"], losses["default"], rtol=0.1)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_multi_worker_run_over_loopback(tmp_path):
    cluster = {"worker": [f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"]}
    procs, outs = [], []
    for index in range(2):
        out = str(tmp_path / f"worker{index}")
        e = env()
        e["TF_CONFIG"] = json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})
        procs.append(subprocess.Popen(
            cli("r18_adam", *TINY_ARGS, "--epochs", "2", "--steps-per-epoch", "3",
                "--strategy", "multi_worker", "--no-validate", "--output-dir", out),
            env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        outs.append(out)
    for proc in procs:
        try:
            _, err = proc.communicate(timeout=600)
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise
        assert proc.returncode == 0, err[-3000:]
    chief = os.path.join(outs[0], "model.keras")
    other = os.path.join(outs[1], "worker-1", "model.keras")
    a, b = weights_of(chief), weights_of(other)
    for x, y in zip(a, b):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
    with open(os.path.join(outs[0], "summary.json")) as f:
        assert json.load(f)["replicas"] == 2
