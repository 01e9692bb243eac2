"""Stopping for a signal and for a full disk, and resuming after either.

A run that gets SIGTERM in the middle of an epoch saves a mid-epoch checkpoint at the
next step, says where it is, exits with 143; the same command then ends with the weights
of an uninterrupted run (deterministic ops, the same batches). The runs are real
processes that get real signals; the one-device runs take ~1 min, the two-worker ones ~3.
"""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.test_distribute import env, free_port, trainable_of

# One run through the Python API, as the CLI runs it (the same exit status on a signal).
# argv: output dir, strategy, "marked" or "plain", checkpoint_every (0: none). A marked run writes OUT.marker after
# step 2 of its first epoch and then takes its steps slowly, so the test's signal lands
# in the middle of that epoch.
RUN = """
import os, sys, time
import tensorflow as tf
from bireal_tf.recipes import get_recipe, train_recipe
from bireal_tf.recipes.preemption import Preempted
out, strategy, mode, every = sys.argv[1:5]
recipe = get_recipe("r18_adam").with_overrides(
    dataset="fashion_mnist_embedded", image_size=32, batch_size=32, epochs=2,
    steps_per_epoch=6, seed=5, augmentation="none", pad_values=1.0)

class Marker(tf.keras.callbacks.Callback):
    def on_train_batch_end(self, batch, logs=None):
        if mode == "marked" and not os.path.exists(out + ".signalled"):
            if batch >= 1:
                open(out + ".marker", "w").close()
            time.sleep(1.0)

try:
    summary = train_recipe(recipe, out, strategy=strategy, limit_train=192, limit_eval=32,
                           verbose=0, deterministic=True, steps_per_execution=1,
                           checkpoint_every=int(every) or None, callbacks=[Marker()])
except Preempted as stop:
    print(stop, file=sys.stderr, flush=True)
    sys.exit(stop.status)
print("TOP1", summary["top1"])
"""


def start(out, strategy, mode, log, every=0, **extra):
    return subprocess.Popen([sys.executable, "-c", RUN, str(out), strategy, mode, str(every)],
                            env=env(**extra), stdout=log, stderr=subprocess.STDOUT)


def signal_when_marked(proc, out, signum=signal.SIGTERM, timeout=600):
    """Send `signum` once the run is inside its first epoch; seconds until it exits."""
    deadline = time.time() + timeout
    while not os.path.exists(f"{out}.marker"):
        assert proc.poll() is None and time.time() < deadline, "the run ended before its marker"
        time.sleep(0.2)
    open(f"{out}.signalled", "w").close()  # the marked run stops sleeping
    sent = time.time()
    proc.send_signal(signum)
    return sent


def finish(procs, logs, timeout=900):
    deadline = time.time() + timeout
    for proc in procs:
        proc.wait(max(1, deadline - time.time()))
    for log in logs:
        log.close()
    return [open(log.name).read() for log in logs]


def rows(out):
    if not (out / "metrics.csv").exists():
        return []
    with open(out / "metrics.csv") as f:
        return [line.split(",")[:2] for line in f.read().splitlines()[1:]]


def check_stopped(out, status, text, seconds):
    """The run exited with the status of a signal within a few seconds, wrote a
    mid-epoch checkpoint, and said where it is in one line."""
    assert status == 143, text[-3000:]
    mid = out / "stages" / "0_binary" / "checkpoints" / "mid_epoch"
    assert list(mid.glob("ckpt-*.index")), text[-3000:]
    line = [l for l in text.splitlines() if l.startswith("Stopped by SIGTERM")]
    assert len(line) == 1 and str(mid) in line[0] and "same command" in line[0]
    assert seconds < 30, f"{seconds:.1f} s from the signal to the exit"
    assert not list(out.rglob("*_temp*"))


@pytest.mark.slow
def test_sigterm_mid_epoch_saves_the_step_and_the_rerun_ends_as_an_uninterrupted_run(tmp_path):
    logs = [open(tmp_path / "straight.log", "w")]
    finish([start(tmp_path / "straight", "default", "plain", logs[0])], logs)

    out = tmp_path / "stopped"
    log = open(tmp_path / "stopped.log", "w")
    proc = start(out, "default", "marked", log)
    sent = signal_when_marked(proc, out)
    (text,) = finish([proc], [log])
    check_stopped(out, proc.returncode, text, time.time() - sent)
    assert rows(out) == []  # it stopped inside its first epoch

    log = open(tmp_path / "resumed.log", "w")
    proc = start(out, "default", "plain", log)
    (text,) = finish([proc], [log])
    assert proc.returncode == 0, text[-3000:]
    assert "resuming after step" in text
    assert rows(out) == [["binary", "1"], ["binary", "2"]]  # one row per epoch
    np.testing.assert_array_equal(trainable_of(str(out / "model.keras")),
                                  trainable_of(str(tmp_path / "straight" / "model.keras")))


def two_workers(out, mode, logs_dir):
    cluster = {"worker": [f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"]}
    procs, logs = [], []
    for index in (0, 1):
        config = json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})
        logs.append(open(logs_dir / f"{out.name}-{mode}-{index}.log", "w"))
        procs.append(start(out, "multi_worker", mode, logs[-1], TF_CONFIG=config))
    return procs, logs


@pytest.fixture(scope="module")
def two_worker_run(tmp_path_factory):
    """An uninterrupted two-worker run: its output directory."""
    tmp = tmp_path_factory.mktemp("two_workers")
    procs, logs = two_workers(tmp / "straight", "plain", tmp)
    texts = finish(procs, logs)
    assert [p.returncode for p in procs] == [0, 0], texts[0][-2000:] + texts[1][-2000:]
    return tmp / "straight"


@pytest.mark.slow
@pytest.mark.parametrize("signalled", [0, 1], ids=["chief", "worker1"])
def test_sigterm_to_either_worker_stops_both_at_one_step_and_the_rerun_resumes(
        tmp_path, two_worker_run, signalled):
    """Two workers on loopback: the worker that gets SIGTERM has both agree on a step; both
    save it and exit 143. The same commands resume both there and end with the trainable
    weights of an uninterrupted two-worker run. (Not BatchNorm's moving statistics: in a
    multi-worker run each worker keeps its own, and a checkpoint saves their mean, so any
    resumed multi-worker run, after an epoch or a step, continues from the mean.)"""
    straight = two_worker_run
    out = tmp_path / "stopped"
    procs, logs = two_workers(out, "marked", tmp_path)
    sent = signal_when_marked(procs[signalled], out)
    texts = finish(procs, logs)
    seconds = time.time() - sent
    for proc, text, worker_dir in zip(procs, texts, (out, out / "worker-1")):
        check_stopped(worker_dir, proc.returncode, text, seconds)

    procs, logs = two_workers(out, "plain", tmp_path)
    texts = finish(procs, logs)
    assert [p.returncode for p in procs] == [0, 0], texts[0][-2000:] + texts[1][-2000:]
    assert all("resuming after step" in text for text in texts)
    assert rows(out) == [["binary", "1"], ["binary", "2"]]
    np.testing.assert_allclose(trainable_of(str(out / "model.keras")),
                               trainable_of(str(straight / "model.keras")), rtol=1e-6, atol=1e-7)


def train_command(out):
    return [sys.executable, "-m", "bireal_tf.recipes.train", "r18_adam",
            "--dataset", "fashion_mnist_embedded", "--epochs", "2", "--steps-per-epoch", "2",
            "--batch-size", "16", "--limit-train", "64", "--limit-eval", "16", "--quiet",
            "--no-validate", "--output-dir", str(out)]


@pytest.fixture
def small_disk(tmp_path):
    """A 200 MB filesystem (tmpfs): room for the run and one checkpoint (~135 MB: an R18's
    weights and Adam's two slots), not for a second."""
    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=200m", "tmpfs", str(mount)]).returncode:
        pytest.skip("mounting a small tmpfs needs root (CI runs as root)")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


@pytest.mark.slow
def test_a_full_disk_gets_one_line_keeps_the_last_checkpoint_and_leaves_no_partial_files(small_disk):
    out = small_disk / "run"
    run = subprocess.run(train_command(out), env=env(), capture_output=True, text=True)
    errors = [l for l in run.stderr.splitlines() if l.startswith("error:")]
    assert run.returncode == 74, run.stderr[-3000:]
    assert len(errors) == 1 and "no space left on device" in errors[0], run.stderr[-3000:]
    assert str(out) in errors[0] and "Traceback" not in run.stderr
    checkpoints = out / "stages" / "0_binary" / "checkpoints"
    import tensorflow as tf

    kept = tf.train.latest_checkpoint(str(checkpoints))
    assert kept.endswith("ckpt-1")
    tf.train.load_checkpoint(kept).get_tensor("epoch/.ATTRIBUTES/VARIABLE_VALUE")  # whole
    assert not list(out.rglob("*_temp*")) and not list(out.rglob(".*.tmp*"))

    # What a kill during a save would leave; the rerun on a larger disk clears it.
    (checkpoints / "ckpt-2_temp").mkdir()
    (checkpoints / "ckpt-2_temp" / "part-00000-of-00001.data-00000-of-00001").write_bytes(b"x")
    subprocess.run(["mount", "-o", "remount,size=800m", str(small_disk)], check=True)
    run = subprocess.run(train_command(out), env=env(), capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "resuming after epoch 1" in run.stdout
    assert (out / "model.keras").exists()
    assert not list(out.rglob("*_temp*")) and not list(out.rglob(".*.tmp*"))


@pytest.mark.slow
def test_with_checkpoint_every_a_kill_9_loses_at_most_those_steps(tmp_path):
    """--checkpoint-every 2: SIGKILL (no chance to save) inside the first epoch; the rerun
    resumes from the last periodic checkpoint and ends with an uninterrupted run's weights."""
    logs = [open(tmp_path / "straight.log", "w")]
    finish([start(tmp_path / "straight", "default", "plain", logs[0])], logs)

    out = tmp_path / "killed"
    log = open(tmp_path / "killed.log", "w")
    proc = start(out, "default", "marked", log, every=2)
    signal_when_marked(proc, out, signal.SIGKILL)
    finish([proc], [log])
    assert proc.returncode == -signal.SIGKILL
    mid = out / "stages" / "0_binary" / "checkpoints" / "mid_epoch"
    assert [p.name for p in mid.glob("ckpt-*.index")] == ["ckpt-2.index"]  # after step 2

    log = open(tmp_path / "resumed.log", "w")
    proc = start(out, "default", "plain", log, every=2)
    (text,) = finish([proc], [log])
    assert proc.returncode == 0, text[-3000:]
    assert "resuming after step 2 of epoch 1" in text
    assert rows(out) == [["binary", "1"], ["binary", "2"]]
    np.testing.assert_array_equal(trainable_of(str(out / "model.keras")),
                                  trainable_of(str(tmp_path / "straight" / "model.keras")))



def test_the_watch_puts_the_signal_handlers_back_and_runs_unwatched_off_the_main_thread(tmp_path):
    import threading

    from bireal_tf.recipes.preemption import PreemptionWatch

    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    with PreemptionWatch(str(tmp_path / "main")) as watch:
        assert watch.handler is not None
        assert signal.getsignal(signal.SIGINT) == watch._on_sigint
    assert {s: signal.getsignal(s) for s in before} == before

    seen = []

    def in_a_thread():
        with PreemptionWatch(str(tmp_path / "thread")) as watch:
            saved = []
            step_end = watch.watch(lambda epoch, step: saved.append((epoch, step)) or "path",
                                   steps_per_epoch=10, checkpoint_every=3)
            step_end.on_epoch_begin(0)
            for batch in range(9):
                step_end.on_train_batch_end(batch)
            seen.append((watch.handler, saved))

    thread = threading.Thread(target=in_a_thread)
    thread.start()
    thread.join()
    handler, saved = seen[0]
    assert handler is None and saved == [(0, 3), (0, 6), (0, 9)]  # --checkpoint-every 3
    assert {s: signal.getsignal(s) for s in before} == before
