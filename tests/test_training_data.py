"""The training loop's data: built once per stage, resumable past a damaged checkpoint,
and fitted to small images."""
import csv
import json
import os
import shutil
from dataclasses import replace

import numpy as np
import pytest
import tensorflow as tf

from bireal_tf.data import folder
from bireal_tf.recipes import get_recipe
from bireal_tf.recipes import train_recipe
from bireal_tf.recipes.recipe import RECIPES
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


@pytest.mark.slow  # a two-epoch run: ~40 s
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


@pytest.mark.slow  # a resumed run on top of the shared one: ~35 s
def test_resume_falls_back_past_a_damaged_checkpoint(trained_run, tmp_path, capfd):
    """The shared trained run (tests/conftest.py), as if killed while writing its last
    checkpoint: the rerun of its command warns, resumes from the checkpoint before and
    trains the last epoch again on the same batches."""
    from bireal_tf.recipes.train import main
    from tests.conftest import TRAINED_RUN_ARGS

    out = tmp_path / "run"
    shutil.copytree(trained_run, out)
    stage = out / "stages" / "0_binary"
    with open(out / "metrics.csv") as f:
        first_rows = list(csv.DictReader(f))
    # The newest checkpoint's data file is truncated and the stage has no final model yet.
    os.remove(stage / "model.keras")
    data = stage / "checkpoints" / "ckpt-2.data-00000-of-00001"
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    capfd.readouterr()
    args = [a for a in TRAINED_RUN_ARGS if a not in ("--export", "--quiet")]
    assert main([*args, "--no-validate", "--output-dir", str(out)]) == 0
    out_text, err_text = capfd.readouterr()
    assert "ckpt-2" in err_text and "cannot be read" in err_text, err_text
    assert "resuming after epoch 1 from" in out_text and "ckpt-1" in out_text, out_text
    with open(out / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["epoch"] for r in rows] == ["1", "2"]
    # Epoch 2 ran again from ckpt-1 on the same batches: the same loss as the first time.
    assert float(rows[1]["loss"]) == pytest.approx(float(first_rows[1]["loss"]), rel=1e-4)
    assert tf.train.latest_checkpoint(str(stage / "checkpoints")).endswith("ckpt-2")
    tf.train.load_checkpoint(str(stage / "checkpoints" / "ckpt-2"))  # readable again


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
    assert set(fitted) == {"batch_size", "pad_values", "augmentation", "lr"}


@pytest.mark.parametrize("name", sorted(RECIPES))
@pytest.mark.parametrize("dataset, batch", [("fashion_mnist", 128), ("fashion_mnist_embedded", 64)])
def test_every_recipe_trains_small_images_at_the_measured_batch_unless_told(name, dataset, batch):
    """Every stage (twin and teacher ones included) of every recipe trains at the batch the
    small-image figures were measured at, each Adam stage at 0.004 x batch / 128; the user's
    --batch-size wins and scales the learning rates with it; the summary records the batch."""
    recipe, fitted = build_recipe(parse_args([name, "--dataset", dataset]))
    assert recipe.batch_size == batch and fitted["batch_size"] == batch
    original = get_recipe(name)
    for stage in recipe.stages:
        if stage.optimizer == "adam":
            assert recipe.scaled_lr(stage) == pytest.approx(0.004 * batch / 128), stage.name
        else:  # SGD keeps its learning rate per image: scaled from the recipe's batch
            base = original.stage(stage.name)
            assert recipe.scaled_lr(stage) == pytest.approx(
                original.scaled_lr(base) * batch / original.batch_size), stage.name
    with_twin, _ = build_recipe(parse_args([name, "--dataset", dataset, "--teacher", "twin"]))
    assert with_twin.batch_size == batch and with_twin.stages[0].teaches
    for stage in with_twin.stages:  # the twin copies its first stage's fitted settings
        if stage.optimizer == "adam":
            assert with_twin.scaled_lr(stage) == pytest.approx(0.004 * batch / 128), stage.name
    mine, fitted = build_recipe(parse_args([name, "--dataset", dataset, "--batch-size", "32"]))
    assert mine.batch_size == 32 and "batch_size" not in fitted
    for stage in mine.stages:
        assert mine.scaled_lr(stage) == pytest.approx(recipe.scaled_lr(stage) * 32 / batch)


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_demo_works_with_every_recipe(name):
    """--demo: the embedded set at its measured batch, about six epochs shared by the stages
    that train, an export, and an output directory of the recipe's own."""
    args = parse_args([name, "--demo"])
    recipe, _ = build_recipe(args)
    training = [s for s in recipe.stages if not s.train_only_batchnorm]
    assert recipe.dataset == "fashion_mnist_embedded" and recipe.batch_size == 64
    assert args.export and {s.epochs for s in training} == {max(1, 6 // len(training))}
    assert args.output_dir == ("runs/demo" if name == "r18_adam" else f"runs/demo_{name}")
    mine = parse_args([name, "--demo", "--epochs", "1", "--batch-size", "16"])
    recipe, _ = build_recipe(mine)
    assert recipe.batch_size == 16 and {s.epochs for s in recipe.stages} == {1}


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


def test_the_summary_records_the_data_settings(trained_run):
    summary = json.loads((trained_run / "summary.json").read_text())  # tests/conftest.py's run
    assert summary["data_settings"]["pad_values"] == 1.0
    assert summary["data_settings"]["augmentation"] == "none"
    assert summary["config"]["pad_values"] == 1.0
    assert summary["config"]["stages"][0]["augmentation"] == "none"


@pytest.mark.parametrize("command, dropped", [
    ("r18_adam --dataset fashion_mnist --epochs 8", "--batch-size 128 --image-size 32"),
    ("r18_adam --activation relu --dataset fashion_mnist --epochs 8",
     "--batch-size 128 --image-size 32"),
    ("r18_adam --teacher t.keras --dataset fashion_mnist --epochs 8",
     "--batch-size 128 --image-size 32"),
    ("r18_react --teacher t.keras --epochs 4 --dataset fashion_mnist",
     "--batch-size 128 --image-size 32"),
    ("r18_paper --dataset fashion_mnist --epochs 2",
     "--batch-size 128 --image-size 32 --augmentation none"),
])
def test_the_documented_small_image_commands_need_no_flags_the_defaults_supply(command, dropped):
    """docs/results.md and docs/training.md give these commands without the flags their
    figures were measured with; the defaults train exactly the recipe those flags made."""
    from bireal_tf.recipes.run_data import input_size

    def recipe(argv):
        r, _ = build_recipe(parse_args(argv.split()))
        return replace(r, image_size=input_size(r))

    assert recipe(command) == recipe(f"{command} {dropped}")
