"""ReActNet on the Bi-Real structure: the network against ReActNet's code, its checkpoints in.

ReActNet (Liu et al., ECCV 2020; github.com/liuzechun/ReActNet, resnet/2_step2/birealnet.py)
adds to each Bi-Real block a learnable shift before the sign (`move0`) and, after the
residual add, shift -> per-channel PReLU -> shift (`move1`, `prelu`, `move2`); its binary
conv keeps an OIHW `weight`. Step 1 (resnet/1_step1) is the same net with real 3x3 weights.

The PyTorch parity test imports ReActNet's own birealnet.py (never copied here) from
$BIREAL_TF_REACTNET_DIR, a folder holding resnet/2_step2/birealnet.py (and
resnet/1_step1/birealnet.py), e.g. a checkout of ReActNet; it is skipped, saying why,
without torch or that folder. Everything else runs without either.
"""
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import larq_compute_engine as lce
import numpy as np
import pytest
import tensorflow as tf
from larq_compute_engine.tflite.python.interpreter import Interpreter

from bireal_tf.export import ParitySettings, export_tflite
from bireal_tf.interop import CheckpointError, from_pytorch, load_checkpoint
from bireal_tf.interop.__main__ import main as interop_cli
from bireal_tf.models import (BiRealNet34, BiRealNet50, LearnableBias, TorchConvPadding2D,
                              binary_conv_layers, bireal_net)
from bireal_tf.quantizers import ApproxSign
from tests.lce_utils import op_histogram
from tests.test_interop import authors_wrapper
from tests.test_interop import random_state as bireal_random_state
from tests.torch_files import write_torch_legacy, write_torch_zip
from tests.torch_parity import assert_logits_match, assert_same_state, logits_and_clear_inputs

BLOCKS = {18: (4, 4, 4, 4), 34: (6, 8, 12, 6)}
MARGIN = 2e-6  # every sign input at least this x its layer's max away from zero (the export's margin)
CANDIDATES = 128  # random 32x32 inputs, of which the clear ones are compared
REACTNET_DIR = os.environ.get("BIREAL_TF_REACTNET_DIR")
try:
    import torch
except ImportError:
    torch = None


# --- ReActNet's names and shapes, written from its resnet/2_step2/birealnet.py -----------------

def reactnet_shapes(depth, num_classes=10):
    """{key: shape} of ReActNet's state dict (without `module.`), both steps alike."""
    def bn(prefix, c):
        return {f"{prefix}.{n}": (c,) for n in ("weight", "bias", "running_mean", "running_var")}

    shapes = {"conv1.weight": (64, 3, 7, 7), **bn("bn1", 64)}
    inplanes = 64
    for stage, (blocks, planes) in enumerate(zip(BLOCKS[depth], (64, 128, 256, 512)), start=1):
        for b in range(blocks):
            p = f"layer{stage}.{b}"
            shapes[f"{p}.move0.bias"] = (1, inplanes, 1, 1)  # LearnableBias(inplanes)
            shapes[f"{p}.binary_conv.weight"] = (planes, inplanes, 3, 3)
            shapes.update(bn(f"{p}.bn1", planes))
            shapes[f"{p}.move1.bias"] = (1, planes, 1, 1)
            shapes[f"{p}.prelu.weight"] = (planes,)  # nn.PReLU(planes)
            shapes[f"{p}.move2.bias"] = (1, planes, 1, 1)
            if b == 0 and stage > 1:  # stride 2: AvgPool2d -> conv1x1 -> BatchNorm2d
                shapes[f"{p}.downsample.1.weight"] = (planes, inplanes, 1, 1)
                shapes.update(bn(f"{p}.downsample.2", planes))
            inplanes = planes
    shapes["fc.weight"], shapes["fc.bias"] = (num_classes, 512), (num_classes,)
    return shapes


def keras_weight_shape(key, shape):
    """The shape a ReActNet tensor takes in Keras: OIHW -> HWIO, (1, C, 1, 1) -> (C,),
    PReLU (C,) -> (1, 1, C), fc (C, F) -> (F, C)."""
    if key.endswith(".bias") and len(shape) == 4:
        return (shape[1],)
    if key.endswith("prelu.weight"):
        return (1, 1) + shape
    if len(shape) == 4:
        return shape[2:] + shape[1::-1]
    return shape[::-1]


def distinct_state(depth, num_classes=10):
    """A ReActNet state dict whose every value differs from every other (the float32
    integers 1..N, exact below 2**24), so a tensor or an element that lands in the
    wrong place shows."""
    shapes = reactnet_shapes(depth, num_classes)
    total = sum(int(np.prod(s)) for s in shapes.values())
    assert total < 2 ** 24
    values = np.arange(1, 1 + total, dtype=np.float32)
    state, start = {}, 0
    for key, shape in shapes.items():
        size = int(np.prod(shape))
        state[key] = values[start: start + size].reshape(shape)
        start += size
    return state


def random_state(depth, num_classes=10, seed=0):
    """A ReActNet state dict a trained net could have: kernels ~ N(0, 1/fan-in), BatchNorm
    variances > 0, shifts around 0, PReLU slopes around torch's 0.25; logits of a few units."""
    rng = np.random.default_rng(seed)
    state = {}
    for key, shape in reactnet_shapes(depth, num_classes).items():
        if key.endswith("running_var"):
            state[key] = rng.uniform(0.5, 2.0, shape)
            state[key[: -len("running_var")] + "num_batches_tracked"] = np.array(100, np.int64)
        elif key.endswith("bn1.weight") or key.endswith("downsample.2.weight"):
            state[key] = rng.uniform(0.5, 1.5, shape)
        elif key.endswith("prelu.weight"):
            state[key] = rng.normal(0.25, 0.3, shape)
        elif len(shape) in (2, 4) and not key.endswith(".bias"):  # conv and fc kernels
            state[key] = rng.normal(0, 1 / np.sqrt(np.prod(shape[1:])), shape)
        else:  # shifts, BatchNorm biases and means, fc bias
            state[key] = rng.normal(0, 0.3, shape)
    return {k: v.astype(np.float32) if v.dtype == np.float64 else v for k, v in state.items()}


def randomize_react_layers(model, seed):
    """BatchNorm, shifts and slopes at random values a trained net could have; kernels
    stay at the builder's initialisation (they keep the logits at a few units)."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, tf.keras.layers.BatchNormalization):
            c = layer.gamma.shape
            layer.set_weights([rng.uniform(0.5, 1.5, c), rng.normal(0, 0.3, c),
                               rng.normal(0, 0.3, c), rng.uniform(0.5, 2.0, c)])
        elif isinstance(layer, LearnableBias):
            layer.set_weights([rng.normal(0, 0.3, layer.bias.shape)])
        elif isinstance(layer, tf.keras.layers.PReLU):
            layer.set_weights([rng.normal(0.25, 0.3, layer.alpha.shape)])


@pytest.fixture(scope="module")
def reactnet18(tmp_path_factory):
    """(state, model): a ReActNet-18 state dict of distinct values, saved as ReActNet's
    train.py saves it under its pinned torch 1.4 (the legacy format), loaded with from_pytorch."""
    state = distinct_state(18, num_classes=7)
    path = tmp_path_factory.mktemp("reactnet18") / "checkpoint.pth.tar"
    write_torch_legacy(authors_wrapper(state), path)
    return state, from_pytorch(path, 18, arch="reactnet", input_shape=(64, 64, 3))


def check_names_shapes_and_count(model, depth, num_classes):
    """Layer names are ReActNet's module paths ("." -> "_"), each layer holds the tensors of
    its module in our layout, and the parameter count is the torch module's."""
    shapes = reactnet_shapes(depth, num_classes)
    modules = {key.rsplit(".", 1)[0].replace(".", "_") for key in shapes}
    assert {layer.name for layer in model.layers if layer.weights} == modules
    assert {"layer1_0_move0", "layer1_0_prelu", "layer4_1_move2"} <= modules
    for layer in model.layers:
        if layer.weights:
            theirs = sorted(keras_weight_shape(k, s) for k, s in shapes.items()
                            if k.rsplit(".", 1)[0].replace(".", "_") == layer.name)
            assert sorted(tuple(w.shape) for w in layer.weights) == theirs, layer.name
    assert model.count_params() == sum(int(np.prod(s)) for s in shapes.values())


# --- the network -------------------------------------------------------------------------------

def test_reactnet18_names_shapes_and_count_follow_reactnet(reactnet18):
    check_names_shapes_and_count(reactnet18[1], 18, num_classes=7)
    assert len(binary_conv_layers(reactnet18[1])) == 16


def test_step1_checkpoint_builds_binary_activations_with_real_weights(reactnet18):
    """ReActNet's step 1: the same layers and weights as step 2 (which starts from them),
    binary activations, real 3x3 weights: no binary conv for LCE."""
    state, step2 = reactnet18
    step1 = from_pytorch(authors_wrapper(state), 18, arch="auto", step=1, input_shape=(64, 64, 3))
    assert binary_conv_layers(step1) == []
    convs = [layer for layer in step1.layers if layer.name.endswith("_binary_conv")]
    assert len(convs) == 16
    assert all(isinstance(c.input_quantizer, ApproxSign) and c.kernel_quantizer is None
               for c in convs)
    assert [(w.name, w.shape) for w in step1.weights] == [(w.name, w.shape) for w in step2.weights]
    np.testing.assert_array_equal(step1.get_layer("layer3_1_binary_conv").kernel.numpy(),
                                  state["layer3.1.binary_conv.weight"].transpose(2, 3, 1, 0))


def test_symmetric_padding_survives_lce_conversion():
    """The authors' padding of strided real convs (the 7x7 stem; 3x3 in the real-valued
    variants): PyTorch's arithmetic in Keras, and still in the .tflite. LCE's converter
    folds a pad with equal sides into "same", which pads differently at stride 2 on even
    sizes."""
    for size in (64, 65):  # LCE keeps the pad (even) or folds it (odd)
        x = inputs = tf.keras.layers.Input((size, size, 3))
        images = np.random.default_rng(size).normal(size=(2, size, size, 3)).astype(np.float32)
        torch_arithmetic = images
        for pad, kernel in ((3, 7), (1, 3)):
            conv = tf.keras.layers.Conv2D(8, kernel, strides=2, padding="valid", use_bias=False)
            x = conv(TorchConvPadding2D(pad, kernel, strides=2)(x))
            padded = np.pad(torch_arithmetic, [(0, 0), (pad, pad), (pad, pad), (0, 0)])
            torch_arithmetic = tf.nn.conv2d(padded, conv.kernel, 2, "VALID").numpy()
        model = tf.keras.Model(inputs, x)
        keras = model(images).numpy()
        tflite = Interpreter(lce.convert_keras_model(model)).predict(images)
        scale = np.abs(torch_arithmetic).max()
        assert scale > 1.0
        np.testing.assert_allclose(keras, torch_arithmetic, rtol=0, atol=1e-6 * scale)
        np.testing.assert_allclose(tflite, keras, rtol=0, atol=1e-5 * scale)


def test_50_layers_refuse_the_react_block():
    for build in (lambda: BiRealNet50(block="react"), lambda: bireal_net(50, block="react")):
        with pytest.raises(ValueError, match=r"block='react' exists for Bi-Real Net 18 and 34 "
                                             r"only.*no 50-layer version"):
            build()
    with pytest.raises(ValueError, match="ReActNet's Bi-Real-based code has 18 and 34 layers"):
        from_pytorch(random_state(18), 50, arch="reactnet")


@pytest.mark.slow
def test_reactnet34_structure_and_lce_conversion(tmp_path):
    """ReActNet-34's names, shapes and starting values; LCE makes each of its 32 binary convs
    an LceBconv2d, with the shifts and PReLU around them, and the .tflite computes the Keras
    logits (random BatchNorm, shifts and slopes)."""
    model = BiRealNet34(block="react", padding="symmetric", num_classes=10, input_shape=(72, 72, 3),
                        classifier_activation=None)
    check_names_shapes_and_count(model, 34, num_classes=10)
    # torch's starting values: LearnableBias 0, nn.PReLU's slopes 0.25
    shifts = [layer for layer in model.layers if isinstance(layer, LearnableBias)]
    slopes = [layer for layer in model.layers if isinstance(layer, tf.keras.layers.PReLU)]
    assert len(shifts) == 3 * 32 and len(slopes) == 32
    assert all(not layer.bias.numpy().any() for layer in shifts)
    assert all((layer.alpha.numpy() == 0.25).all() for layer in slopes)

    randomize_react_layers(model, seed=34)
    path = tmp_path / "react34.tflite"
    report = export_tflite(model, path, latency=None, parity=ParitySettings(samples=8, pool=4))
    hist = op_histogram(path.read_bytes())
    assert hist["LceBconv2d"] == 32 and hist["PRELU"] == 32
    assert hist.get("CONV_2D", 0) == 4  # conv1 and the three 1x1 shortcuts stay float
    assert "LceDequantize" not in hist
    assert report.binary_convs.ok and report.binary_convs.float_layers == []
    assert report.parity.verdict == "exact", report.parity
    assert report.parity.max_abs_keras_output > 1.0  # logits, not a saturated softmax


# --- ReActNet checkpoints in, without torch ----------------------------------------------------

def test_each_reactnet_tensor_lands_in_its_layer_in_its_layout(reactnet18):
    state, model = reactnet18
    assert model.get_layer("fc").units == 7
    checked = 0
    for key, value in state.items():
        module, param = key.rsplit(".", 1)
        layer = model.get_layer(module.replace(".", "_"))
        w = {v.name.split("/")[-1].split(":")[0]: v.numpy() for v in layer.weights}
        if param == "running_mean":
            got, want = w["moving_mean"], value
        elif param == "running_var":
            got, want = w["moving_variance"], value
        elif "gamma" in w:  # BatchNorm weight and bias
            got, want = w["gamma" if param == "weight" else "beta"], value
        elif ".move" in key:  # LearnableBias: (1, C, 1, 1) -> (C,)
            got, want = w["bias"], value[0, :, 0, 0]
        elif module.endswith("prelu"):  # slope of channel c -> alpha[0, 0, c]
            got, want = w["alpha"][0, 0, :], value
        elif module == "fc":
            got, want = w[param if param == "bias" else "kernel"], value.T if param == "weight" else value
        else:  # conv OIHW: element [o, i, h, x] sits at [h, x, i, o]
            got, want = w["kernel"], np.einsum("oihx->hxio", value)
        np.testing.assert_array_equal(got, want, err_msg=key)
        checked += 1
    assert checked == len(model.weights)


def test_reactnet_checkpoint_as_bireal_names_it_and_the_flag():
    with pytest.raises(CheckpointError, match=r"this is a ReActNet checkpoint \(64 keys of "
                                              r"ReActNet's shifts and PReLU slopes, such as "
                                              r"'layer1\.0\.move0\.bias'\).*arch='reactnet' "
                                              r"\(--arch reactnet"):
        from_pytorch(authors_wrapper(random_state(18)), 18)


def test_bireal_checkpoint_as_reactnet_names_it_and_the_flag():
    with pytest.raises(CheckpointError, match=r"this is a Bi-Real Net checkpoint \(.*"
                                              r"'layer1\.0\.binary_conv\.weights'\), not a "
                                              r"ReActNet one: pass arch='bireal' \(--arch bireal\)"):
        from_pytorch(bireal_random_state(18), 18, arch="reactnet")


def test_other_refusals_name_the_fix():
    state = random_state(18)
    with pytest.raises(CheckpointError, match=r"looks like ReActNet-18.*depth=18"):
        from_pytorch(state, 34, arch="reactnet")
    with pytest.raises(ValueError, match="step=1 is ReActNet's first training step"):
        from_pytorch(bireal_random_state(18), 18, step=1)
    with pytest.raises(ValueError, match=r"block='bireal' contradicts .*ReActNet-18"):
        from_pytorch(state, 18, arch="reactnet", block="bireal")
    with pytest.raises(CheckpointError, match=r"cannot tell the architecture.*arch='bireal'"):
        from_pytorch({"conv1.weight": state["conv1.weight"]}, 18, arch="auto")


def test_cli_refuses_the_wrong_arch_and_writes_nothing(tmp_path, capsys):
    react, bireal = tmp_path / "react.pth.tar", tmp_path / "bireal.pth.tar"
    write_torch_zip(authors_wrapper(random_state(18)), react)
    write_torch_zip(authors_wrapper(bireal_random_state(18)), bireal)
    out = ["-o", str(tmp_path / "model.keras")]
    cases = (([str(react), "--depth", "18"] + out, r"ReActNet checkpoint.*--arch reactnet"),
             ([str(bireal), "--depth", "18", "--arch", "reactnet"] + out,
              r"Bi-Real Net checkpoint.*--arch bireal"),
             ([str(react), "--depth", "18", "--arch", "reactnet", "--step", "1", "--export",
               str(tmp_path / "m.tflite")] + out, r"--export needs binary weights"),
             ([str(react), "--depth", "18", "--arch", "reactnet"], r"nothing to write"))
    for argv, pattern in cases:
        assert interop_cli(argv) == 2, argv
        assert re.search(pattern, capsys.readouterr().err), pattern
    assert sorted(tmp_path.iterdir()) == sorted([react, bireal])


@pytest.mark.slow
def test_cli_reactnet_checkpoint_to_keras_to_tflite(tmp_path):
    state = random_state(18, num_classes=5, seed=18)
    ckpt = tmp_path / "checkpoint.pth.tar"
    write_torch_zip(authors_wrapper(state), ckpt)
    keras_path, tflite_path, report_path = (tmp_path / n for n in ("m.keras", "m.tflite", "r.json"))
    out = subprocess.run(
        [sys.executable, "-m", "bireal_tf.interop", str(ckpt), "--arch", "reactnet", "--depth", "18",
         "-o", str(keras_path), "--export", str(tflite_path), "--report", str(report_path),
         "--input-size", "72"],
        capture_output=True, text=True, timeout=900,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "ReActNet-18 (Bi-Real structure), step 2, 5 classes, input 72x72x3" in out.stdout

    # The .keras file computes what from_pytorch's net computes.
    saved = tf.keras.models.load_model(keras_path, compile=False)
    direct = from_pytorch(state, 18, arch="reactnet", input_shape=(72, 72, 3))
    x = np.random.default_rng(0).normal(size=(2, 72, 72, 3)).astype(np.float32)
    np.testing.assert_array_equal(saved(x, training=False), direct(x, training=False))

    hist = op_histogram(tflite_path.read_bytes())
    assert hist["LceBconv2d"] == 16 and hist["PRELU"] == 16
    assert hist.get("CONV_2D", 0) == 4 and "LceDequantize" not in hist
    report = json.loads(report_path.read_text())
    assert report["binary_convs"]["ok"] and report["parity"]["verdict"] == "exact"


# --- PyTorch parity against ReActNet's own module code (torch and ReActNet's files) ------------

def reactnet_module(step):
    """ReActNet's birealnet.py of `step`, imported from $BIREAL_TF_REACTNET_DIR; skip if absent."""
    if torch is None:
        pytest.skip("torch is not installed: ReActNet parity not checked (pip install torch)")
    if not REACTNET_DIR:
        pytest.skip("BIREAL_TF_REACTNET_DIR is not set: ReActNet parity not checked (set it to a "
                    "checkout of github.com/liuzechun/ReActNet)")
    path = Path(REACTNET_DIR) / "resnet" / ("1_step1" if step == 1 else "2_step2") / "birealnet.py"
    if not path.is_file():
        pytest.skip(f"{path} does not exist: ReActNet parity not checked (BIREAL_TF_REACTNET_DIR "
                    "must hold ReActNet's resnet/1_step1 and resnet/2_step2 folders)")
    spec = importlib.util.spec_from_file_location(f"reactnet_step{step}_birealnet", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def save_as_reactnet_train_py(net, path, **save_kwargs):
    """ReActNet's train.py: nn.DataParallel, Adam with its two parameter groups, save_checkpoint's dict."""
    wrapped = torch.nn.DataParallel(net)
    convs = [p for name, p in wrapped.named_parameters() if p.ndimension() == 4 or "conv" in name]
    others = [p for p in wrapped.parameters() if all(p is not c for c in convs)]
    optimizer = torch.optim.Adam([{"params": others},
                                  {"params": convs, "weight_decay": 1e-5}], lr=2.5e-3)
    torch.save({"epoch": 3, "state_dict": wrapped.state_dict(), "best_top1_acc": 12.5,
                "optimizer": optimizer.state_dict()}, path, **save_kwargs)


@pytest.mark.parametrize("depth,step", [(18, 2), (34, 2), (18, 1)])
def test_pytorch_outputs_of_reactnets_own_code(tmp_path, depth, step, capsys):
    module = reactnet_module(step)
    torch.manual_seed(100 * step + depth)
    torch.set_num_threads(2)
    net = getattr(module, f"birealnet{depth}")(num_classes=10)
    assert {k: tuple(v.shape) for k, v in net.state_dict().items()
            if not k.endswith("num_batches_tracked")} == reactnet_shapes(depth)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5), m.bias.normal_(0, 0.3)
                m.running_mean.normal_(0, 0.3), m.running_var.uniform_(0.5, 2.0)
            elif isinstance(m, module.LearnableBias):
                m.bias.normal_(0, 0.3)
            elif isinstance(m, torch.nn.PReLU):
                m.weight.normal_(0.25, 0.3)
        for name, p in net.named_parameters():
            if "binary_conv" in name:  # ReActNet starts them at rand * 0.001: all positive
                p.normal_(0, 1)
    net.eval()
    path = tmp_path / "checkpoint.pth.tar"
    save_as_reactnet_train_py(net, path)

    x = torch.randn(CANDIDATES, 3, 32, 32)
    logits, clear, signs = logits_and_clear_inputs(net, module.BinaryActivation, x, MARGIN)
    assert signs == sum(BLOCKS[depth])
    model = from_pytorch(path, depth, arch="reactnet", step=step, input_shape=(32, 32, 3),
                         classifier_activation=None)
    assert model.count_params() == sum(p.numel() for p in net.parameters()) + sum(
        b.numel() for name, b in net.named_buffers() if "running" in name)
    assert_logits_match(model, x, logits, clear, f"ReActNet-{depth} step {step}", capsys)

    # The restricted reader reads torch's file as torch does, and so the legacy format,
    # which torch 1.4 (ReActNet's pin) wrote.
    state = load_checkpoint(path, reader="torch")
    assert_same_state(state, load_checkpoint(path, reader="restricted"))
    if depth == 18 and step == 2:
        legacy = tmp_path / "legacy.pth.tar"
        save_as_reactnet_train_py(net, legacy, _use_new_zipfile_serialization=False)
        assert_same_state(state, load_checkpoint(legacy, reader="restricted"))
