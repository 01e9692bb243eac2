"""The training loop's data: built once per stage, resumable past a damaged checkpoint,
and fitted to small images."""
import csv
import json
import os
from dataclasses import replace

import numpy as np
import pytest
import tensorflow as tf

from bireal_tf.data import folder
from bireal_tf.recipes import get_recipe
from bireal_tf.recipes import train_recipe
from bireal_tf.recipes.train import build_recipe, parse_args

TINY = dict(dataset="fashion_mnist_embedded", batch_size=16, image_size=32, steps_per_epoch=2)


def _jpeg_tree(root, classes=3, per_class=6):
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in range(classes):
            d = root / split / f"class{c}"
            d.mkdir(parents=True)
            for i in range(per_class):
                image = rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)
                (d / f"img{i}.JPEG").write_bytes(tf.io.encode_jpeg(image).numpy())


def test_an_epochs_data_are_not_rebuilt(tmp_path, monkeypatch):
    """Folder listing and header reads happen once per split and stage, not once per epoch."""
    _jpeg_tree(tmp_path / "tree")
    calls = {"list_split": [], "find_corrupt": 0}
    list_split, find_corrupt = folder.list_split, folder.find_corrupt

    def counting_list_split(data_dir, split):
        calls["list_split"].append(split)
        return list_split(data_dir, split)

    def counting_find_corrupt(paths):
        calls["find_corrupt"] += 1
        return find_corrupt(paths)

    monkeypatch.setattr(folder, "list_split", counting_list_split)
    monkeypatch.setattr(folder, "find_corrupt", counting_find_corrupt)
    recipe = get_recipe("r18_adam").with_overrides(
        dataset="folder", epochs=3, batch_size=4, image_size=32, steps_per_epoch=2, pad_values=1.0)
    summary = train_recipe(recipe, str(tmp_path / "run"), data_dir=str(tmp_path / "tree"), verbose=0)
    with open(tmp_path / "run" / "metrics.csv") as f:
        assert [int(r["epoch"]) for r in csv.DictReader(f)] == [1, 2, 3]  # three epochs ran
    assert sorted(calls["list_split"]) == ["test", "train"]  # once each, for the stage
    assert calls["find_corrupt"] == 2
    assert np.isfinite(summary["test_loss"])


def test_resume_falls_back_past_a_damaged_checkpoint(tmp_path, capfd):
    out = tmp_path / "run"
    recipe = get_recipe("r18_adam").with_overrides(epochs=3, **TINY)
    kwargs = dict(limit_train=32, limit_eval=16, verbose=1, validate=False)
    train_recipe(recipe.with_overrides(epochs=3), str(out), **kwargs)
    stage = out / "stages" / "0_binary"
    with open(out / "metrics.csv") as f:
        first_rows = list(csv.DictReader(f))
    # As if the run had been killed while writing its last checkpoint: the newest
    # checkpoint's data file is truncated and the stage has no final model yet.
    os.remove(stage / "model.keras")
    data = stage / "checkpoints" / "ckpt-3.data-00000-of-00001"
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    capfd.readouterr()
    train_recipe(recipe, str(out), **kwargs)
    out_text, err_text = capfd.readouterr()
    assert "ckpt-3" in err_text and "cannot be read" in err_text, err_text
    assert "resuming after epoch 2 from" in out_text and "ckpt-2" in out_text, out_text
    with open(out / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["epoch"] for r in rows] == ["1", "2", "3"]
    # Epoch 3 ran again from ckpt-2 on the same batches: the same loss as the first time.
    assert float(rows[2]["loss"]) == pytest.approx(float(first_rows[2]["loss"]), rel=1e-4)
    assert tf.train.latest_checkpoint(str(stage / "checkpoints")).endswith("ckpt-3")
    tf.train.load_checkpoint(str(stage / "checkpoints" / "ckpt-3"))  # readable again


@pytest.mark.parametrize("argv, small", [
    (["r18_adam", "--dataset", "fashion_mnist"], True),
    (["r18_adam", "--dataset", "folder", "--image-size", "48"], True),
    (["r18_adam", "--dataset", "folder"], False),
    (["r18_adam"], False),
])
def test_small_images_get_the_settings_measured_for_them(argv, small):
    recipe, fitted = build_recipe(parse_args(argv))
    stage = recipe.stages[0]
    if not small:  # the authors' ImageNet numbers, untouched
        assert fitted == {} and recipe == get_recipe("r18_adam").with_overrides(
            dataset=recipe.dataset, image_size=recipe.image_size)
        assert stage.augmentation == "adam" and recipe.pad_values == 0.0
        return
    assert stage.augmentation == "none" and recipe.pad_values == 1.0
    assert recipe.scaled_lr(stage) == pytest.approx(0.004 * recipe.batch_size / 128)
    assert set(fitted) == {"pad_values", "augmentation", "lr"}


def test_options_on_the_command_line_win_over_the_small_image_settings():
    recipe, fitted = build_recipe(parse_args(
        ["r18_adam", "--dataset", "fashion_mnist", "--augmentation", "adam", "--lr", "0.01",
         "--batch-size", "64", "--pad-values", "0"]))
    stage = recipe.stages[0]
    assert stage.augmentation == "adam" and recipe.pad_values == 0.0
    assert recipe.scaled_lr(stage) == pytest.approx(0.01)
    # The paper recipe's real-valued stages and BatchNorm retrain keep SGD and their learning
    # rates; its binary stage trains with Adam; every stage drops augmentation.
    paper, fitted = build_recipe(parse_args(["r18_paper", "--dataset", "fashion_mnist_embedded"]))
    original = get_recipe("r18_paper")
    for name in ("relu", "leaky_clip", "clip", "bn_retrain"):
        assert paper.stage(name) == replace(original.stage(name), augmentation="none")
    binary = paper.stage("binary")
    assert (binary.optimizer, binary.schedule, binary.milestones, binary.epochs) == (
        "adam", "linear", (), original.stage("binary").epochs)
    assert paper.scaled_lr(binary) == pytest.approx(0.004 * paper.batch_size / 128)
    assert fitted["binary stage"] == "Adam with linear decay in place of SGD"
    assert {s.augmentation for s in paper.stages} == {"none"}


def test_the_summary_records_the_data_settings(tmp_path):
    from bireal_tf.recipes.train import main

    out = tmp_path / "run"
    code = main(["r18_adam", "--dataset", "fashion_mnist_embedded", "--epochs", "1",
                 "--steps-per-epoch", "2", "--batch-size", "16", "--limit-train", "32",
                 "--limit-eval", "16", "--no-validate", "--quiet", "--output-dir", str(out)])
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["data_settings"]["pad_values"] == 1.0
    assert summary["data_settings"]["augmentation"] == "none"
    assert summary["config"]["pad_values"] == 1.0
