"""bireal_tf.interop: larq-zoo's weights, the authors' PyTorch checkpoints, the restricted reader, the CLI.

Everything here runs without network and, except `test_pytorch_outputs`, without torch.
"""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

import larq_zoo
from bireal_tf.interop import CheckpointError, from_pytorch, load_checkpoint, read_torch_zip
from bireal_tf.models import BiRealNet18, WeightsUnavailableError, from_larq_zoo
from tests.torch_files import write_torch_zip
from tests.torch_parity import assert_logits_match, assert_same_state, logits_and_clear_inputs

FIXTURES = Path(__file__).parent / "fixtures"
MARKER = "BIREAL_TF_PICKLE_RAN_CODE"
# Every sign input at least this x its layer's max away from zero; Bi-Real-50 has ~10x
# more sign inputs per image, so fewer random images clear a given margin.
MARGIN = {18: 1e-5, 34: 1e-5, 50: 2e-6}
CANDIDATES = 128  # random 32x32 inputs, of which the clear ones are compared
try:
    import torch
except ImportError:
    torch = None


# --- the authors' names and shapes, from their birealnet.py (18/34 and 50) ---------------------

def authors_shapes(depth, num_classes=10):
    """{key: shape} of the authors' state dict (without `module.`), written from their code."""
    shapes = {"conv1.weight": (64, 3, 7, 7)}
    bn = lambda p, c: {f"{p}.{n}": (c,) for n in ("weight", "bias", "running_mean", "running_var")}  # noqa: E731
    shapes.update(bn("bn1", 64))
    if depth in (18, 34):
        blocks = {18: (4, 4, 4, 4), 34: (6, 8, 12, 6)}[depth]
        inplanes = 64
        for s, (n, planes) in enumerate(zip(blocks, (64, 128, 256, 512)), start=1):
            for b in range(n):
                p = f"layer{s}.{b}"
                shapes[f"{p}.binary_conv.weights"] = (planes * inplanes * 9, 1)
                shapes.update(bn(f"{p}.bn1", planes))
                if b == 0 and (s > 1 or inplanes != planes):
                    shapes[f"{p}.downsample.1.weight"] = (planes, inplanes, 1, 1)
                    shapes.update(bn(f"{p}.downsample.2", planes))
                inplanes = planes
        shapes["fc.weight"], shapes["fc.bias"] = (num_classes, 512), (num_classes,)
        return shapes
    i, inplanes = 0, 64
    for n, planes in zip((3, 4, 6, 3), (256, 512, 1024, 2048)):
        for b in range(n):
            p, mid = f"layers.{i}", planes // 4
            inp = inplanes
            shapes[f"{p}.conv1.weight"] = (mid, inp, 1, 1)
            shapes.update(bn(f"{p}.bn1", mid))
            shapes[f"{p}.conv2.weight"] = (mid, mid, 3, 3)
            shapes.update(bn(f"{p}.bn2", mid))
            shapes[f"{p}.conv3.weight"] = (planes, mid, 1, 1)
            shapes.update(bn(f"{p}.bn3", planes))
            if b == 0:
                shapes[f"{p}.down_conv1x1.weight"] = (planes // 4, inp // 4, 1, 1)
                shapes[f"{p}.downsample.1.weight"] = (planes, inp, 1, 1)
                shapes.update(bn(f"{p}.downsample.2", planes))
            inplanes = planes
            i += 1
    shapes["fc.weight"], shapes["fc.bias"] = (num_classes, 2048), (num_classes,)
    return shapes


def random_state(depth, num_classes=10, seed=0):
    rng = np.random.default_rng(seed)
    state = {}
    for key, shape in authors_shapes(depth, num_classes).items():
        if key.endswith("running_var"):
            state[key] = rng.uniform(0.5, 2.0, shape).astype(np.float32)
        else:
            state[key] = rng.normal(0, 0.5, shape).astype(np.float32)
    for key in list(state):
        if key.endswith("running_var"):
            state[key[: -len("running_var")] + "num_batches_tracked"] = np.array(1000, np.int64)
    return state


def authors_wrapper(state):
    """What the authors' train.py saves: nn.DataParallel names inside its dict."""
    return {"epoch": 10, "state_dict": {f"module.{k}": v for k, v in state.items()},
            "best_top1_acc": np.array(1.0, np.float32), "optimizer": {"state": {}}}


# --- the restricted reader, on files torch made ------------------------------------------------

def test_reader_reads_tensors_dicts_lists_and_scalars_as_written():
    expected = np.load(FIXTURES / "torch_expected.npz")
    got = read_torch_zip(FIXTURES / "torch_tensors.pt")
    np.testing.assert_array_equal(got["a"], expected["a"])
    assert got["a"].dtype == np.float32
    np.testing.assert_array_equal(got["nested"]["b"], expected["nested/b"])
    np.testing.assert_array_equal(got["nested"]["bt"], expected["nested/bt"])  # non-contiguous
    np.testing.assert_array_equal(got["nested"]["list"][0], expected["nested/list/0"])
    assert got["nested"]["list"][1:] == [7, 2.5, "text"]
    assert got["count"].dtype == np.int64 and got["count"].shape == ()
    assert int(got["count"]) == int(expected["count"]) == 123456789012


def test_reader_reads_the_authors_wrapper_and_strips_module():
    expected = np.load(FIXTURES / "torch_expected.npz")
    raw = read_torch_zip(FIXTURES / "torch_wrapper.pth.tar")
    assert set(raw) == {"epoch", "state_dict", "best_top1_acc", "optimizer"}
    assert raw["epoch"] == 3 and float(raw["best_top1_acc"]) == pytest.approx(56.4)
    assert all(k.startswith("module.") for k in raw["state_dict"])
    assert raw["optimizer"]["param_groups"][0]["lr"] == 0.001
    state = load_checkpoint(FIXTURES / "torch_wrapper.pth.tar", reader="restricted")
    assert set(state) == {"conv1.weight", "layer1.0.binary_conv.weights", "layer1.0.bn1.weight",
                          "layer1.0.bn1.num_batches_tracked"}
    for key in ("conv1.weight", "layer1.0.binary_conv.weights", "layer1.0.bn1.weight"):
        np.testing.assert_array_equal(state[key], expected[key])


def test_reader_refuses_the_code_running_pickle(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError, match=r"refused.*'posix\.system'"):
        read_torch_zip(FIXTURES / "torch_runs_code.pt")
    with pytest.raises(CheckpointError, match="refused"):
        from_pytorch(FIXTURES / "torch_runs_code.pt", 18)  # torch's weights_only path where installed
    assert not (tmp_path / MARKER).exists()


def test_reader_reads_the_old_format():  # more in test_checkpoint_reader.py
    expected = np.load(FIXTURES / "torch_expected.npz")
    got = read_torch_zip(FIXTURES / "torch_legacy.pt")
    assert set(got) == {"conv1.weight"}
    np.testing.assert_array_equal(got["conv1.weight"], expected["conv1.weight"])


def test_truncated_checkpoint_is_named(tmp_path):
    data = (FIXTURES / "torch_wrapper.pth.tar").read_bytes()
    cut = tmp_path / "cut.pth.tar"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"cut\.pth\.tar.*truncated or corrupt"):
        read_torch_zip(cut)
    with pytest.raises(CheckpointError, match=r"truncated or corrupt"):
        load_checkpoint(cut)  # torch's reader where installed


# --- the mapping, from NumPy state dicts with the authors' names -------------------------------

@pytest.mark.parametrize("depth", [18, 34, pytest.param(50, marks=pytest.mark.slow)])  # 50: ~10 s
def test_each_tensor_lands_in_its_layer_in_its_layout(depth):
    state = random_state(depth, num_classes=7, seed=depth)
    model = from_pytorch(authors_wrapper(state), depth, input_shape=(64, 64, 3))
    assert model.get_layer("fc").units == 7
    rng = np.random.default_rng(1)
    checked = 0
    for key, value in state.items():
        if key.endswith("num_batches_tracked") or key == "layers.0.down_conv1x1.weight":
            continue
        module, param = key.rsplit(".", 1)
        layer = model.get_layer(module.replace(".", "_"))
        w = {v.name.split("/")[-1].split(":")[0]: v.numpy() for v in layer.weights}
        if param in ("weight", "bias") and "gamma" in w:  # BatchNorm
            np.testing.assert_array_equal(w["gamma" if param == "weight" else "beta"], value)
        elif param in ("running_mean", "running_var"):
            np.testing.assert_array_equal(
                w["moving_mean" if param == "running_mean" else "moving_variance"], value)
        elif module == "fc":
            if param == "bias":
                np.testing.assert_array_equal(w["bias"], value)
            else:
                c, f = rng.integers(value.shape[0]), rng.integers(value.shape[1])
                assert w["kernel"][f, c] == value[c, f]
        else:
            kernel = w["kernel"]
            kh, kw, cin, cout = kernel.shape
            for _ in range(5):  # element [o, i, h, x] of OIHW sits at [h, x, i, o]
                o, i, h, x = (rng.integers(n) for n in (cout, cin, kh, kw))
                if param == "weights":  # the flat (O*I*k*k, 1) parameter of the 18/34 code
                    assert kernel[h, x, i, o] == value[((o * cin + i) * kh + h) * kw + x, 0]
                else:
                    assert kernel[h, x, i, o] == value[o, i, h, x]
        checked += 1
    assert checked == sum(len(l.weights) for l in model.layers)


def test_18_layer_checkpoint_as_34_says_which_depth():
    with pytest.raises(CheckpointError, match=r"looks like Bi-Real Net 18.*depth=18"):
        from_pytorch(random_state(18), 34)


def test_missing_unexpected_and_mismatched_keys_are_reported_together():
    state = random_state(18)
    del state["layer2.0.bn1.running_var"]
    state["layer1.0.extra.weight"] = np.zeros(3, np.float32)
    state["layer3.1.binary_conv.weights"] = np.zeros((10, 1), np.float32)
    with pytest.raises(CheckpointError) as err:
        from_pytorch(state, 18, input_shape=(64, 64, 3))
    text = str(err.value)
    assert "1 missing keys: layer2.0.bn1.running_var" in text
    assert "1 unexpected keys: layer1.0.extra.weight" in text
    assert re.search(r"layer3\.1\.binary_conv\.weights: checkpoint \(10, 1\).*expected "
                     r"\(589824, 1\).*'layer3_1_binary_conv'", text)


def test_contradicting_arguments_are_refused():
    with pytest.raises(ValueError, match="padding='same' contradicts"):
        from_pytorch(random_state(18), 18, padding="same")
    with pytest.raises(ValueError, match="num_classes=5 contradicts"):
        from_pytorch(random_state(18), 18, num_classes=5)


# --- larq-zoo ----------------------------------------------------------------------------------

def _randomize(model, seed):
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if layer.weights:
            layer.set_weights([rng.uniform(0.5, 1.5, w.shape).astype(np.float32)
                               if "variance" in w.name or "gamma" in w.name
                               else rng.normal(0, 0.5, w.shape).astype(np.float32)
                               for w in layer.weights])


@pytest.mark.parametrize("include_top", [True, False])
def test_larq_zoo_weights_give_larq_zoos_outputs(tmp_path, include_top):
    zoo = larq_zoo.literature.BiRealNet(weights=None, input_shape=(64, 64, 3),
                                        include_top=include_top)
    _randomize(zoo, seed=3)
    zoo.save_weights(str(tmp_path / "zoo.h5"))
    ours = from_larq_zoo(tmp_path / "zoo.h5", include_top=include_top, input_shape=(64, 64, 3))
    x = np.random.default_rng(0).normal(size=(4, 64, 64, 3)).astype(np.float32)
    if include_top:  # compare the logits, before the softmax
        zoo = tf.keras.Model(zoo.input, zoo.layers[-2].output)
        ours = tf.keras.Model(ours.input, ours.get_layer("fc").output)
    theirs, mine = zoo(x, training=False).numpy(), ours(x, training=False).numpy()
    assert np.abs(theirs).max() > 1.0
    np.testing.assert_allclose(mine, theirs, rtol=1e-5, atol=1e-5 * np.abs(theirs).max())


def test_larq_zoo_contradicting_arguments_are_refused():
    for kwargs, pattern in ((dict(padding="symmetric"), "padding='symmetric'"),
                            (dict(activation="relu"), "activation='relu'"),
                            (dict(num_classes=10), "num_classes=10")):
        with pytest.raises(ValueError, match=pattern):
            from_larq_zoo("unused.h5", **kwargs)


def test_larq_zoo_offline_error_names_file_address_and_cache_path(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / ".keras").mkdir()
    for var in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")  # nothing listens: offline, at once
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    with pytest.raises(WeightsUnavailableError) as err:
        BiRealNet18(weights="larq_zoo", input_shape=(64, 64, 3))
    text = str(err.value)
    cache = tmp_path / ".keras" / "larq" / "models" / "birealnet" / "birealnet_weights.h5"
    assert "'birealnet_weights.h5'" in text
    assert re.search(r"from https://\S+/birealnet_weights\.h5", text)
    assert f"put it at {cache}" in text
    assert cache.parent.is_dir()  # the folder larq-zoo's helper made: the one it reads


# --- the CLI, end to end -----------------------------------------------------------------------

@pytest.mark.slow
def test_cli_checkpoint_to_keras_to_verified_tflite(tmp_path):
    from bireal_tf.export import op_histogram

    ckpt = tmp_path / "checkpoint.pth.tar"
    state = random_state(18, num_classes=5)
    state["fc.weight"] *= 1e-3  # logits of a few units: a saturated softmax hides a wrong .tflite
    write_torch_zip(authors_wrapper(state), ckpt)
    out = subprocess.run(
        [sys.executable, "-m", "bireal_tf.interop", str(ckpt), "--depth", "18",
         "-o", str(tmp_path / "model.keras"), "--export", str(tmp_path / "model.tflite"),
         "--report", str(tmp_path / "report.json"), "--input-size", "96"],
        capture_output=True, text=True, timeout=600,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "5 classes" in out.stdout
    model = tf.keras.models.load_model(tmp_path / "model.keras", compile=False)
    assert model.input_shape == (None, 96, 96, 3) and model.output_shape == (None, 5)
    hist = op_histogram((tmp_path / "model.tflite").read_bytes())
    assert hist["LceBconv2d"] == 16
    assert hist.get("CONV_2D", 0) == 4  # conv1 and the three 1x1 shortcuts stay float
    parity = json.loads((tmp_path / "report.json").read_text())["parity"]
    # "sign_flips": at most a flip near the threshold; a wrong .tflite moves (nearly) every input
    assert parity["verdict"] in ("exact", "sign_flips") and parity["max_abs_keras_output"] < 0.99


def test_cli_refuses_a_bad_checkpoint(tmp_path, capsys, monkeypatch):
    """The CLI's main() in this process (the slow suite runs `python -m bireal_tf.interop`)."""
    from bireal_tf.interop.__main__ import main

    monkeypatch.chdir(tmp_path)
    code = main([str(FIXTURES / "torch_runs_code.pt"), "--depth", "18", "-o", str(tmp_path / "m.keras")])
    assert code == 2 and "refused" in capsys.readouterr().err
    assert not (tmp_path / "m.keras").exists() and not (tmp_path / MARKER).exists()


# --- PyTorch's own outputs (torch installed only) ----------------------------------------------

def _torch_nets():
    """Bi-Real 18/34/50 in PyTorch from the paper, with the authors' module names."""
    nn, F = torch.nn, torch.nn.functional

    class BinaryActivation(nn.Module):
        def forward(self, x):
            return torch.sign(x)

    class HardBinaryConv(nn.Module):  # 18/34: flat `weights`; 50: OIHW `weight`
        def __init__(self, cin, cout, k, stride, flat):
            super().__init__()
            self.shape, self.stride, self.padding, self.flat = (cout, cin, k, k), stride, k // 2, flat
            w = torch.randn(self.shape)
            if flat:
                self.weights = nn.Parameter(w.reshape(-1, 1))
            else:
                self.weight = nn.Parameter(w)

        def forward(self, x):
            w = self.weights.view(self.shape) if self.flat else self.weight
            scale = w.abs().mean(dim=(1, 2, 3), keepdim=True)
            return F.conv2d(x, scale * torch.sign(w), stride=self.stride, padding=self.padding)

    def shortcut(cin, cout, stride):
        return nn.Sequential(nn.AvgPool2d(stride, stride), nn.Conv2d(cin, cout, 1, bias=False),
                             nn.BatchNorm2d(cout))

    class BasicBlock(nn.Module):
        def __init__(self, cin, cout, stride):
            super().__init__()
            self.binary_activation = BinaryActivation()
            self.binary_conv = HardBinaryConv(cin, cout, 3, stride, flat=True)
            self.bn1 = nn.BatchNorm2d(cout)
            self.downsample = shortcut(cin, cout, stride) if (stride, cin) != (1, cout) else None

        def forward(self, x):
            y = self.bn1(self.binary_conv(self.binary_activation(x)))
            return y + (x if self.downsample is None else self.downsample(x))

    class Bottleneck(nn.Module):
        def __init__(self, cin, cout, stride, reshape, first):
            super().__init__()
            mid = cout // 4
            self.first, self.reshape, self.stride = first, reshape, stride
            self.conv1 = (nn.Conv2d(cin, mid, 1, bias=False) if first
                          else HardBinaryConv(cin, mid, 1, 1, flat=False))
            self.bn1 = nn.BatchNorm2d(mid)
            self.conv2 = HardBinaryConv(mid, mid, 3, stride, flat=False)
            self.bn2 = nn.BatchNorm2d(mid)
            self.conv3 = HardBinaryConv(mid, cout, 1, 1, flat=False)
            self.bn3 = nn.BatchNorm2d(cout)
            self.binary_activation = BinaryActivation()
            if reshape:
                self.down_conv1x1 = nn.Conv2d(cin // 4, mid, 1, bias=False)
                self.pooling = nn.AvgPool2d(2, 2)
                self.downsample = shortcut(cin, cout, stride)

        def forward(self, mid, out):
            if self.first:
                out1 = self.bn1(self.conv1(torch.where(out < -1, 0.1 * out - 0.9,
                                                       torch.where(out > 1, 0.1 * out + 0.9, out))))
            else:
                out1 = self.bn1(self.conv1(self.binary_activation(out)))
                out1 = out1 + (self.down_conv1x1(mid) if self.reshape else mid)
            out2 = self.bn2(self.conv2(self.binary_activation(out1)))
            out2 = out2 + (self.pooling(out1) if self.reshape and self.stride == 2 else out1)
            out3 = self.bn3(self.conv3(self.binary_activation(out2)))
            return out2, out3 + (self.downsample(out) if self.reshape else out)

    class BiRealNet(nn.Module):
        def __init__(self, depth, num_classes):
            super().__init__()
            self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
            self.bn1 = nn.BatchNorm2d(64)
            self.maxpool = nn.MaxPool2d(3, 2, 1)
            self.depth = depth
            if depth == 50:
                self.layers = nn.ModuleList()
                cin = 64
                for s, (n, cout) in enumerate(zip((3, 4, 6, 3), (256, 512, 1024, 2048))):
                    for b in range(n):
                        stride = 2 if s and not b else 1
                        self.layers.append(Bottleneck(cin, cout, stride, b == 0, s == b == 0))
                        cin = cout
            else:
                cin = 64
                for s, (n, cout) in enumerate(zip({18: (4, 4, 4, 4), 34: (6, 8, 12, 6)}[depth],
                                                  (64, 128, 256, 512))):
                    blocks = []
                    for b in range(n):
                        blocks.append(BasicBlock(cin, cout, 2 if s and not b else 1))
                        cin = cout
                    setattr(self, f"layer{s + 1}", nn.Sequential(*blocks))
            self.fc = nn.Linear(cin, num_classes)

        def forward(self, x):
            x = self.maxpool(self.bn1(self.conv1(x)))
            if self.depth == 50:
                mid = out = x
                for block in self.layers:
                    mid, out = block(mid, out)
                x = out
            else:
                for s in range(1, 5):
                    x = getattr(self, f"layer{s}")(x)
            return self.fc(x.mean(dim=(2, 3)))

    return BiRealNet, BinaryActivation


@pytest.mark.skipif(torch is None, reason="torch is not installed: PyTorch parity not checked "
                                          "(pip install torch to run it)")
@pytest.mark.parametrize("depth", [18, 34, 50])
def test_pytorch_outputs(tmp_path, depth, capsys):
    torch.manual_seed(depth)
    torch.set_num_threads(2)
    BiRealNet, BinaryActivation = _torch_nets()
    net = BiRealNet(depth, num_classes=10)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5), m.bias.normal_(0, 0.3)
                m.running_mean.normal_(0, 0.3), m.running_var.uniform_(0.5, 2.0)
        for name, p in net.named_parameters():  # sign(0): 0 in torch, +1 here and in LCE
            p[p == 0] = 1e-3
    net.eval()
    wrapped = torch.nn.DataParallel(net)
    optimizer = torch.optim.Adam(wrapped.parameters(), lr=0.001)
    path = tmp_path / "checkpoint.pth.tar"
    torch.save({"epoch": 1, "state_dict": wrapped.state_dict(),
                "best_top1_acc": torch.tensor(12.5), "optimizer": optimizer.state_dict()}, path)

    x = torch.randn(CANDIDATES, 3, 32, 32)
    logits, clear, _ = logits_and_clear_inputs(net, BinaryActivation, x, MARGIN[depth])
    model = from_pytorch(path, depth, input_shape=(32, 32, 3), classifier_activation=None)
    assert_logits_match(model, x, logits, clear, f"Bi-Real-{depth}", capsys)

    # Both readers agree on the file torch wrote.
    assert_same_state(load_checkpoint(path, reader="torch"),
                      load_checkpoint(path, reader="restricted"))
    if depth == 18:  # the tests' own zip writer is read by torch as torch's files
        mini = tmp_path / "mini.pt"
        write_torch_zip({"w": np.arange(6, dtype=np.float32).reshape(2, 3)}, mini)
        np.testing.assert_array_equal(torch.load(mini, weights_only=True)["w"].numpy(),
                                      np.arange(6, dtype=np.float32).reshape(2, 3))


def test_larq_zoo_weights_into_a_training_net(tmp_path):
    """What --init-weights larq_zoo does: copy by name, leave a 10-class fc as it is."""
    from bireal_tf.models import load_larq_zoo_weights

    zoo = larq_zoo.literature.BiRealNet(weights=None, input_shape=(64, 64, 3))
    _randomize(zoo, seed=5)
    zoo.save_weights(str(tmp_path / "zoo.h5"))
    model = BiRealNet18(input_shape=(32, 32, 3), num_classes=10, padding="symmetric")
    fc = model.get_layer("fc").get_weights()
    summary = load_larq_zoo_weights(model, tmp_path / "zoo.h5")
    assert "fc left as it is" in summary
    zoo_layers = [l for l in zoo.layers if l.weights][:-1]
    ours = [l for l in model.layers if l.weights and l.name != "fc"]
    for theirs, mine in zip(zoo_layers, ours):
        for a, b in zip(theirs.get_weights(), mine.get_weights()):
            np.testing.assert_array_equal(a, b)
    for a, b in zip(fc, model.get_layer("fc").get_weights()):
        np.testing.assert_array_equal(a, b)
