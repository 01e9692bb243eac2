"""`python -m bireal_tf.recipes.train`: errors, the documented options, kill and resume.

Distributed runs are in test_distribute.py.
"""
import json
import os
import re
import signal
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
        "r18_adam", "r34_adam", "r50_adam", "r18_paper", "r34_paper", "r18_react", "r34_react"]
    assert lines[-1].endswith("stages twin(128) -> step1(128) -> step2(128); teacher twin")


@pytest.mark.parametrize(
    "args, message",
    [
        (["r19_adam"], "valid recipes: r18_adam, r34_adam, r50_adam, r18_paper, r34_paper, "
                       "r18_react, r34_react"),
        (["r18_adam", "--dataset", "mnist"], "fashion_mnist_embedded"),
        (["r18_paper", "--stage", "warmup"], "valid stages: relu, leaky_clip, clip, binary"),
        (["r18_adam", "--strategy", "horovod"], "valid strategies: default, one_device"),
        (["r18_adam", "--dataset", "folder", "--data-dir", "/nonexistent/imagenet"],
         "/nonexistent/imagenet"),
        (["r18_adam", "--dataset", "imagenet2012", "--data-dir", "{tmp}"], "manual"),
        (["r18_adam", "--int8-epochs", "-1"], "--int8-epochs must be >= 0"),
        (["r18_adam", "--int8-epochs", "1"], "add --pad-values 1"),
        (["r18_adam", "--teacher", "/nonexistent/t.keras"], "/nonexistent/t.keras does not exist"),
        (["r18_react", "--distill-weight", "1.5"], "distill_weight must be in [0, 1]"),
        (["r18_react", "--stage", "step2"], "distills from the twin, which is not trained"),
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


def checkpoint_counters(path):
    """(epoch, optimizer iterations) stored in a training checkpoint."""
    reader = tf.train.load_checkpoint(path)
    names = reader.get_variable_to_shape_map()
    iterations = [n for n in names
                  if re.fullmatch(r"optimizer/_?iter(ations)?/\.ATTRIBUTES/VARIABLE_VALUE", n)]
    assert len(iterations) == 1, sorted(n for n in names if n.startswith("optimizer/_i"))
    return (int(reader.get_tensor("epoch/.ATTRIBUTES/VARIABLE_VALUE")),
            int(reader.get_tensor(iterations[0])))


@pytest.mark.slow
def test_killed_run_resumes_after_its_last_checkpoint(tmp_path):
    """SIGKILL once a checkpoint is recorded; the rerun says it resumes, does not redo those
    epochs, restores the optimizer's step counter, and ends with the uninterrupted run's weights.
    """
    epochs, steps = 4, 6
    args = [*TINY_ARGS, "--epochs", str(epochs), "--steps-per-epoch", str(steps), "--seed", "3",
            "--deterministic", "--no-validate"]
    straight, killed = str(tmp_path / "straight"), str(tmp_path / "killed")
    ckpt_dir = os.path.join(killed, "stages", "0_binary", "checkpoints")

    # Output to a file, not a pipe nobody reads: a chatty log cannot block the child.
    with open(tmp_path / "killed.log", "w") as log:
        proc = subprocess.Popen(cli("r18_adam", *args, "--output-dir", killed), env=env(),
                                stdout=log, stderr=subprocess.STDOUT)
        # The `checkpoint` index names a checkpoint only after its files are complete.
        deadline = time.time() + 600
        while proc.poll() is None and time.time() < deadline:
            if os.path.exists(ckpt_dir) and tf.train.latest_checkpoint(ckpt_dir):
                break
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)  # a real kill: no handler, no cleanup
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, (tmp_path / "killed.log").read_text()[-3000:]
    last = tf.train.latest_checkpoint(ckpt_dir)
    assert last is not None
    done = int(last.rsplit("-", 1)[1])
    assert 1 <= done < epochs
    assert not os.path.exists(os.path.join(killed, "model.keras"))
    assert checkpoint_counters(last) == (done, done * steps)
    with open(os.path.join(killed, "metrics.csv")) as f:
        rows_at_kill = f.read().splitlines()[1:]

    # Not --quiet: the rerun says what it resumes from.
    loud = [a for a in args if a != "--quiet"]
    with open(tmp_path / "resumed.log", "w") as log:
        resumed = subprocess.run(cli("r18_adam", *loud, "--output-dir", killed), env=env(),
                                 stdout=log, stderr=subprocess.STDOUT, timeout=600)
    said = (tmp_path / "resumed.log").read_text()
    assert resumed.returncode == 0, said[-3000:]
    assert f"Stage binary: resuming after epoch {done} from {last}" in said
    final = tf.train.latest_checkpoint(ckpt_dir)
    assert checkpoint_counters(final) == (epochs, epochs * steps)
    with open(os.path.join(killed, "metrics.csv")) as f:
        rows = f.read().splitlines()[1:]
    assert [line.split(",")[1] for line in rows] == [str(e) for e in range(1, epochs + 1)]
    # The epochs before the kill were not run again: their rows, timings included, are as
    # the killed process wrote them.
    assert rows[:done] == rows_at_kill[:done]

    with open(tmp_path / "straight.log", "w") as log:
        run = subprocess.run(cli("r18_adam", *args, "--output-dir", straight), env=env(),
                             stdout=log, stderr=subprocess.STDOUT, timeout=600)
    assert run.returncode == 0, (tmp_path / "straight.log").read_text()[-3000:]
    a = weights_of(os.path.join(straight, "model.keras"))
    b = weights_of(os.path.join(killed, "model.keras"))
    assert len(a) == len(b)
    for x, y in zip(a, b):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)


# --- the documented options (docs/training.md) ------------------------------------------


@pytest.mark.slow  # two CLI runs: ~30 s
def test_overwrite_is_needed_to_replace_another_run_or_use_a_foreign_dir(tmp_path, capsys):
    other = tmp_path / "other"
    other.mkdir()
    (other / "run.json").write_text(json.dumps({"recipe": "r18_paper"}))
    (other / "precious.txt").write_text("keep me")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    args = ["r18_adam", *TINY_ARGS, "--epochs", "1", "--steps-per-epoch", "2", "--no-validate"]

    assert main([*args, "--output-dir", str(other)]) == 2
    err = capsys.readouterr().err
    assert "'r18_paper'" in err and "--overwrite" in err
    assert (other / "precious.txt").read_text() == "keep me"
    assert main([*args, "--output-dir", str(foreign)]) == 2
    assert "holds no bireal_tf run" in capsys.readouterr().err
    assert (foreign / "notes.txt").read_text() == "mine"
    assert not (foreign / "run.json").exists()

    # With --overwrite the other recipe's run is deleted and this one takes its place.
    assert main([*args, "--output-dir", str(other), "--overwrite"]) == 0
    assert not (other / "precious.txt").exists()
    assert json.loads((other / "run.json").read_text())["recipe"] == "r18_adam"
    summary = json.loads((other / "summary.json").read_text())
    assert summary["recipe"] == "r18_adam"
    assert (other / "model.keras").exists()


def latent_trainable(model):
    """Trainable weights by layer (binary kernels latent, not quantized)."""
    return {f"{layer.name}/{i}": w.numpy()
            for layer in model.layers for i, w in enumerate(layer.trainable_weights)}


@pytest.mark.slow  # two paper-pipeline stages through the CLI: ~2 min
def test_stage_with_init_weights_skips_earlier_stages_and_starts_from_the_file(tmp_path):
    """`--stage binary --init-weights clip.keras`: the paper's hand-over from the clip network.

    At --lr 0 the binary stage keeps the weights it starts from, so they must be the file's.
    """
    from bireal_tf.models import bireal_net

    tf.keras.utils.set_random_seed(123)  # not the recipe's seed: another init than the trainer's
    init = bireal_net(18, input_shape=(32, 32, 3), num_classes=10, activation="clip")
    init_path = str(tmp_path / "clip.keras")
    init.save(init_path)
    start = latent_trainable(init)
    out = tmp_path / "run"
    assert main(["r18_paper", *TINY_ARGS, "--epochs", "1", "--steps-per-epoch", "2",
                 "--no-validate", "--stage", "binary", "--init-weights", init_path, "--lr", "0",
                 "--output-dir", str(out)]) == 0

    assert sorted(os.listdir(out / "stages")) == ["3_binary", "4_bn_retrain"]
    with open(out / "metrics.csv") as f:
        assert [line.split(",")[0] for line in f.read().splitlines()[1:]] == [
            "binary", "bn_retrain"]
    binary = latent_trainable(tf.keras.models.load_model(out / "stages" / "3_binary" /
                                                         "model.keras", compile=False))
    assert sorted(binary) == sorted(start)
    for name, w in binary.items():
        np.testing.assert_array_equal(w, start[name], err_msg=name)


@pytest.mark.slow  # a CLI run at 40 px with saves: ~1 min
def test_cli_overrides_reach_the_recipe(tmp_path):
    out = tmp_path / "run"
    assert main(["r18_adam", "--dataset", "fashion_mnist_embedded", "--limit-train", "64",
                 "--limit-eval", "32", "--quiet", "--no-validate", "--output-dir", str(out),
                 "--image-size", "40", "--batch-size", "16", "--epochs", "2",
                 "--steps-per-epoch", "2", "--lr", "0.004", "--optimizer", "sgd",
                 "--schedule", "constant", "--weight-decay", "0.0005",
                 "--label-smoothing", "0.05", "--augmentation", "none", "--seed", "7",
                 "--padding", "symmetric", "--pad-values", "1", "--reestimate-batchnorm"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    config = summary["config"]
    assert (config["image_size"], config["batch_size"], config["steps_per_epoch"],
            config["seed"], config["padding"], config["pad_values"]) == (
        40, 16, 2, 7, "symmetric", 1.0)
    (stage,) = config["stages"]
    assert (stage["epochs"], stage["optimizer"], stage["schedule"], stage["weight_decay"],
            stage["label_smoothing"], stage["augmentation"], stage["reestimate_batchnorm"]) == (
        2, "sgd", "constant", 0.0005, 0.05, "none", True)
    # --lr is the rate at the batch given: no further scaling.
    assert summary["learning_rates"] == {"binary": pytest.approx(0.004)}
    assert summary["dataset"]["image_size"] == 40
    with open(out / "metrics.csv") as f:
        rows = f.read().splitlines()[1:]
    assert [float(r.split(",")[8]) for r in rows] == [pytest.approx(0.004)] * 2
    # What was trained: the stage's saved model carries its optimizer and input size.
    model = tf.keras.models.load_model(out / "stages" / "0_binary" / "model.keras")
    assert model.input_shape == (None, 40, 40, 3)
    assert isinstance(model.optimizer, tf.keras.optimizers.SGD)
    assert model.optimizer.weight_decay == pytest.approx(0.0005)
    assert float(model.optimizer.learning_rate) == pytest.approx(0.004)


def test_export_without_demo_writes_a_verified_tflite(trained_run):
    """`--export` on a training command (tests/conftest.py's shared run is one)."""
    from tests.conftest import TRAINED_RUN_ARGS

    assert "--export" in TRAINED_RUN_ARGS and "--demo" not in TRAINED_RUN_ARGS
    out = trained_run
    printed = (out.parent / "trained_run.log").read_text()  # what the command printed
    assert "Everything is in" in printed and "  model.tflite" in printed
    report = json.loads((out / "export_report.json").read_text())
    assert report["binary_convs"]["ok"] and report["parity"]["ok"]
    assert report["op_histogram"]["LceBconv2d"] == 16
    assert report["tflite_path"] == str(out / "model.tflite")
    summary = json.loads((out / "summary.json").read_text())
    lite = summary["tflite"]
    assert lite["path"] == str(out / "model.tflite")
    assert lite["size_bytes"] == os.path.getsize(out / "model.tflite") > 0
    assert lite["num_examples"] == 64
    assert 0.0 <= lite["top1"] <= 1.0
    assert lite["top1_minus_keras_top1"] == pytest.approx(lite["top1"] - summary["top1"])


@pytest.mark.slow  # three CLI runs: ~1.5 min
def test_precision_auto_is_announced_first_and_recorded(tmp_path, capsys):
    # What auto must pick here, read independently of the package from /proc/cpuinfo:
    # bfloat16 above 64 px on a CPU with bfloat16 instructions, float32 at 32 px.
    with open("/proc/cpuinfo") as f:
        flags = {w for line in f if line.startswith("flags") for w in line.split(":")[1].split()}
    gpu = bool(tf.config.list_physical_devices("GPU"))
    bf16 = "mixed_bfloat16" if flags & {"avx512_bf16", "amx_bf16"} and not gpu else "float32"
    cases = [(["--image-size", "72"], bf16), (["--image-size", "32"], "float32"),
             (["--image-size", "72", "--mixed-precision", "float32"], "float32")]
    for i, (args, want) in enumerate(cases):
        out = tmp_path / str(i)
        assert main(["r18_adam", *TINY_ARGS, "--epochs", "1", "--steps-per-epoch", "1",
                     "--no-validate", "--output-dir", str(out), *args]) == 0
        first = capsys.readouterr().out.splitlines()[0]
        assert first.startswith(f"precision: {want} ("), first
        assert ("auto:" in first) == ("--mixed-precision" not in args)
        summary = json.loads((out / "summary.json").read_text())
        assert summary["precision"] == want and summary["precision_reason"] in first
        model = tf.keras.models.load_model(summary["model"], compile=False)
        dtype = model.get_layer("layer1_0_binary_conv").compute_dtype
        assert dtype == ("bfloat16" if want == "mixed_bfloat16" else "float32")
    assert tf.keras.mixed_precision.global_policy().name == "float32"


@pytest.mark.slow  # a run and an int8 finetune: about a minute
def test_int8_epochs_finetunes_the_trained_model_with_fake_quant(tmp_path, capsys):
    from bireal_tf.export.files import load_keras_model
    from bireal_tf.models import fake_quant_layers

    out = tmp_path / "run"
    assert main(["r18_adam", *TINY_ARGS, "--epochs", "1", "--no-validate", "--output-dir", str(out),
                 "--image-size", "72", "--int8-epochs", "1"]) == 0
    printed = capsys.readouterr().out
    assert "int8: fake-quant Keras top-1" in printed and "model_int8.keras" in printed
    int8 = json.loads((out / "int8_summary.json").read_text())
    qmodel = load_keras_model(out / "model_int8.keras")
    assert len(fake_quant_layers(qmodel)) == 1 + 16 + 20 + 2
    # trained under auto precision (bfloat16 at 72 px on such CPUs), fake-quantized in float32
    assert {layer.compute_dtype for layer in qmodel.layers} == {"float32"}
    # the finetune moved the ranges off their start and reports an accuracy on the test split
    assert all((float(f.range_min), float(f.range_max)) != (-6.0, 6.0) for f in fake_quant_layers(qmodel))
    assert 0.0 <= int8["val_top1"] <= 1.0 and int8["model"] == str(out / "model_int8.keras")
    float_model = load_keras_model(out / "model.keras")
    assert not fake_quant_layers(float_model)  # model.keras stays the float model
    # the finetune trained the weights it started from
    assert not np.array_equal(float_model.get_layer("fc").get_weights()[0],
                              qmodel.get_layer("fc").get_weights()[0])
