"""Hostile and corrupt user files: a clear error, bounded memory, never a dead process.

- .tflite: a flatbuffer that kills TFLite's interpreter (SIGSEGV) is refused by the
  project's readers, which try it in a child process first (bireal_tf.export.safety);
  a seeded fuzz run sends mutated files through `read_flatbuffer_file` and `evaluate`
  in a subprocess, and every case must end in a result or a clear error.
- .keras / .h5 models: a Lambda layer holding Python code is refused (Keras' safe mode,
  kept on for the legacy formats too), and its code never runs.
- .h5 weights for `from_larq_zoo`: absurd or hostile contents give a ValueError naming
  the file, read in bounded memory.
- `--overwrite` never deletes the workers' worker-<i>/ folders.

The .tflite under test is a tiny Bi-Real net (stem, two Bi-Real blocks, one strided
with the avg-pool + 1x1 shortcut), converted by LCE once per module.
"""
import json
import os
import random
import struct
import subprocess
import sys
import textwrap
import tracemalloc
from pathlib import Path

import h5py
import larq as lq
import numpy as np
import pytest
import tensorflow as tf

from bireal_tf import quantizers
from bireal_tf.evaluate import evaluate
from bireal_tf.export import ModelFileError, read_flatbuffer_file
from bireal_tf.export.convert import convert
from bireal_tf.export.schema import schema
from bireal_tf.export.safety import UnsafeFlatbuffer, verify_flatbuffer
from bireal_tf.export.safety import probe_interpreter
from bireal_tf.models import larq_zoo
from bireal_tf.models.larq_zoo import MAX_NUMBERS, assign_larq_zoo_weights
from bireal_tf.recipes import Trainer, get_recipe
from bireal_tf.recipes.rundir import RunDirectory

REPO = Path(__file__).resolve().parents[1]
DATASET = "fashion_mnist_embedded"  # 32x32x3, 10 classes
FAST_FUZZ_CASES = 8
SLOW_FUZZ_CASES = 200


def env():
    env = dict(os.environ, TF_USE_LEGACY_KERAS="1", TF_CPP_MIN_LOG_LEVEL="2")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    return env


# --- .tflite -----------------------------------------------------------------------------


def tiny_bireal(size=32, width=32, classes=10):
    """Stem, two Bi-Real blocks (the second strided, with the avg-pool + 1x1 shortcut), head.

    clear_session: Keras' name counters reset, so the converted bytes are the same on
    every call (measured: the same SHA-256 twice in one process).
    """
    tf.keras.backend.clear_session()
    tf.keras.utils.set_random_seed(0)
    layers = tf.keras.layers
    inputs = tf.keras.Input((size, size, 3))
    x = layers.Conv2D(width, 3, strides=2, padding="same", use_bias=False, name="conv1")(inputs)
    x = layers.BatchNormalization(name="bn1")(x)
    x = layers.MaxPool2D(3, strides=2, padding="same", name="maxpool")(x)
    for i, strides in enumerate((1, 2)):
        shortcut = x
        if strides == 2:
            shortcut = layers.AveragePooling2D(2, strides=2, padding="same",
                                               name=f"block{i}_downsample_0")(x)
            shortcut = layers.Conv2D(width, 1, use_bias=False, name=f"block{i}_downsample_1")(shortcut)
            shortcut = layers.BatchNormalization(name=f"block{i}_downsample_2")(shortcut)
        y = lq.layers.QuantConv2D(width, 3, strides=strides, padding="same", pad_values=1.0,
                                  use_bias=False, input_quantizer=quantizers.ApproxSign(),
                                  kernel_quantizer=quantizers.MagnitudeAwareSign(),
                                  kernel_constraint="weight_clip", name=f"block{i}_binary_conv")(x)
        y = layers.BatchNormalization(name=f"block{i}_bn1")(y)
        x = layers.Add(name=f"block{i}_add")([y, shortcut])
    x = layers.GlobalAveragePooling2D(name="avgpool")(x)
    return tf.keras.Model(inputs, layers.Dense(classes, name="fc")(x), name="tiny_bireal")


@pytest.fixture(scope="module")
def tflite(tmp_path_factory):
    """The tiny net's LCE flatbuffer, on disk."""
    flatbuffer, _ = convert(tiny_bireal())
    path = tmp_path_factory.mktemp("tflite") / "tiny.tflite"
    path.write_bytes(flatbuffer)
    return path


def root(flatbuffer: bytes):
    """The schema's reader at the root of the file, for finding the bytes to change."""
    return schema.Model.GetRootAs(flatbuffer, 0)


def quantization_pointing_away(flatbuffer: bytes) -> bytes:
    """The flatbuffer with one tensor's `quantization` offset pointing 2 GB past its table.

    A broken structure: TFLite reads every tensor's quantization while it builds the
    interpreter, with no bounds check, and dies of SIGSEGV; the schema's reader opens the
    file without reading that field. The fuzz search found it (one byte changed
    in this offset, or in the quantization table's vtable offset).
    """
    subgraph = root(flatbuffer).Subgraphs(0)
    for i in range(subgraph.TensorsLength()):
        table = subgraph.Tensors(i)._tab
        field = table.Offset(12)  # Tensor.quantization, the schema's 5th field
        if field:
            data = bytearray(flatbuffer)
            struct.pack_into("<I", data, table.Pos + field, 0x7FFFFF00)
            return bytes(data)
    raise AssertionError("no tensor with a quantization table: the converter changed")


def max_pool_padding_3(flatbuffer: bytes) -> bytes:
    """The flatbuffer with the max pool's `padding` read as 3 (SAME is 0, VALID 1).

    A well-formed file with a wrong value: every offset stays inside the file, and
    TFLite's max-pool kernel aborts (SIGABRT) when it runs. The converter leaves the
    default padding (SAME) out; the options' vtable entry for it is pointed at the
    filter width (3) in the same table, as the fuzz search did with one byte (in 400
    one- and two-byte mutants the one crash that the structure check let through).
    """
    model = root(flatbuffer)
    subgraph = model.Subgraphs(0)
    for i in range(subgraph.OperatorsLength()):
        op = subgraph.Operators(i)
        if model.OperatorCodes(op.OpcodeIndex()).BuiltinCode() == schema.BuiltinOperator.MAX_POOL_2D:
            options = schema.Pool2DOptions()
            options.Init(flatbuffer, op.BuiltinOptions().Pos)
            assert options.Padding() == schema.Padding.SAME and options.FilterWidth() == 3
            table = options._tab
            vtable = table.Pos - struct.unpack_from("<i", flatbuffer, table.Pos)[0]
            data = bytearray(flatbuffer)
            # Pool2DOptions: padding is field 0 (vtable entry at +4), filter_width field 3 (+10)
            data[vtable + 4: vtable + 6] = data[vtable + 10: vtable + 12]
            return bytes(data)
    raise AssertionError("no MAX_POOL_2D op: the tiny net changed")


def bconv_options_root_width_100(flatbuffer: bytes) -> bytes:
    """The flatbuffer with an LceBconv2d's options (a flexbuffer map) claiming a root
    value 100 bytes wide: LCE's op reads them when the interpreter is built, with no
    bounds check, and dies of SIGSEGV. Found by fuzzing the options' bytes (3 crashes
    in 150 mutants; the last byte of the options holds the root width)."""
    model = root(flatbuffer)
    subgraph = model.Subgraphs(0)
    for i in range(subgraph.OperatorsLength()):
        op = subgraph.Operators(i)
        if model.OperatorCodes(op.OpcodeIndex()).CustomCode() == b"LceBconv2d":
            end = op._tab.Vector(op._tab.Offset(14)) + op.CustomOptionsLength()
            data = bytearray(flatbuffer)
            data[end - 1] = 100
            return bytes(data)
    raise AssertionError("no LceBconv2d op: the tiny net changed")


CRASHERS = {  # how the file is broken: the mutation, what LCE's bare interpreter dies of,
    # when, and what the project's readers say
    "structure": (quantization_pointing_away, "SIGSEGV", "load",
                  "is not a valid TFLite flatbuffer (LiteRT's flatbuffer verifier refuses it"),
    "LCE options": (bconv_options_root_width_100, "SIGSEGV", "load",
                    "is not a valid TFLite flatbuffer (the options of operator"),
    "value": (max_pool_padding_3, "SIGABRT", "invoke",
              "the file crashed the TFLite interpreter: it is corrupt. LCE's interpreter, run "
              "on it in a child process (memory capped at 2048 MB for its tensors), died of "
              "SIGABRT while running it once on zeros"),
}


CLI_RUNNER = textwrap.dedent('''
    """Send each .tflite through read_flatbuffer_file and `python -m bireal_tf.evaluate`'s main().

    One process for all files (TensorFlow is imported once); a file that kills the
    process names itself: its name is printed before it is read.
    """
    import contextlib, io, json, sys

    from bireal_tf.evaluate import main
    from bireal_tf.export import ModelFileError, read_flatbuffer_file

    for path in sys.argv[1:]:
        print(json.dumps({"file": path}), flush=True)
        try:
            read_flatbuffer_file(path)
            read = "read"
        except ModelFileError as err:
            read = f"ModelFileError: {err}"
        except Exception as err:
            read = f"RAW {type(err).__name__}: {err}"
        stderr = io.StringIO()
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
            try:
                code = main([path, "--dataset", "fashion_mnist_embedded", "--limit", "4",
                             "--batch-size", "4", "--allow-non-lce", "--quiet"])
            except BaseException as err:
                code = f"RAW {type(err).__name__}: {err}"
        errors = [line for line in stderr.getvalue().splitlines() if line.startswith("error:")]
        print(json.dumps({"file": path, "read": read, "exit": code, "errors": errors}), flush=True)
''')


def through_the_cli(paths, folder):
    """{path: {"read", "exit", "errors"}} from CLI_RUNNER, which must survive every file."""
    runner = folder / "cli_runner.py"
    runner.write_text(CLI_RUNNER)
    done = subprocess.run([sys.executable, str(runner), *map(str, paths)], env=env(),
                          capture_output=True, text=True, timeout=3600)
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert done.returncode == 0, (f"the reading process died (exit {done.returncode}) at "
                                  f"{lines[-1] if lines else 'start'}: {done.stderr[-2000:]}")
    return {line["file"]: line for line in lines if "exit" in line}


def mutants(original: bytes, folder: Path, seed: int, cases: int) -> list:
    """`cases` copies of `original` with 1 to 20 random bytes replaced (seeded), on disk."""
    rng, paths = random.Random(seed), []
    for case in range(cases):
        data = bytearray(original)
        for _ in range(rng.randint(1, 20)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        paths.append(folder / f"seed{seed}_case{case}.tflite")
        paths[-1].write_bytes(data)
    return paths


def summarize(outcomes) -> dict:
    """{kind of outcome: count}, for the log and the report."""
    kinds = {}
    for o in outcomes:
        text = " ".join(o["errors"])
        kind = ("result" if o["exit"] == 0 else
                "crashed the interpreter (probe)" if "crashed the TFLite interpreter" in text else
                "interpreter error (probe)" if "LCE's interpreter cannot" in text else
                "not a flatbuffer" if "not a valid TFLite flatbuffer" in text else
                "tensors too large" if "of activation tensors" in text else
                text.split("(")[0][:80])
        kinds[kind] = kinds.get(kind, 0) + 1
    return kinds


def check_outcomes(outcomes):
    """A result (exit 0) or exit 2 with one clear error line; read_flatbuffer_file agrees."""
    bad = {}
    for path, o in outcomes.items():
        clear = o["exit"] == 0 or (o["exit"] == 2 and len(o["errors"]) == 1)
        agrees = o["read"] == "read" or o["exit"] == 2  # what read refuses, the CLI refuses
        if not clear or not agrees or o["read"].startswith("RAW"):
            bad[path] = o
    assert not bad, f"outcomes that are neither a result nor a clear error: {bad}"


@pytest.fixture(scope="module")
def cli_outcomes(tflite, tmp_path_factory):
    """The crashers and the fast fuzz cases, through the project's readers in one subprocess."""
    folder = tmp_path_factory.mktemp("mutants")
    crashers = {}
    for name, (mutate, *_) in CRASHERS.items():
        crashers[name] = folder / f"crasher_{name.replace(' ', '_')}.tflite"
        crashers[name].write_bytes(mutate(tflite.read_bytes()))
    fuzzed = mutants(tflite.read_bytes(), folder, seed=20, cases=FAST_FUZZ_CASES)
    outcomes = through_the_cli([*crashers.values(), *fuzzed], folder)
    return ({name: (path, outcomes[str(path)]) for name, path in crashers.items()},
            [outcomes[str(p)] for p in fuzzed])


@pytest.mark.parametrize("broken", CRASHERS)
def test_a_tflite_that_crashes_the_bare_interpreter_gets_a_clear_error(cli_outcomes, broken):
    path, outcome = cli_outcomes[0][broken]
    _, signal, stage, expected = CRASHERS[broken]
    root(path.read_bytes()).Subgraphs(0).Tensors(0)  # it opens as a model

    bare = probe_interpreter(path.read_bytes())  # LCE's interpreter, unchecked, in a child
    assert bare.signal == signal and bare.stage == stage, bare

    if broken == "value":  # well-formed: the interpreter dies in a child, not here
        verify_flatbuffer(path.read_bytes())
    else:  # refused before an interpreter in this process sees it
        with pytest.raises(UnsafeFlatbuffer, match="verifier refuses it|root width"):
            verify_flatbuffer(path.read_bytes())
    with pytest.raises(ModelFileError) as err:
        read_flatbuffer_file(path)
    assert expected in str(err.value) and str(path) in str(err.value), str(err.value)
    # Before these checks `python -m bireal_tf.evaluate` died here: exit 139, printing nothing.
    assert outcome["exit"] == 2 and len(outcome["errors"]) == 1, outcome
    assert expected in outcome["errors"][0] and outcome["read"].startswith("ModelFileError")


def test_fuzzed_tflite_files_end_in_a_result_or_a_clear_error(cli_outcomes):
    _, fuzzed = cli_outcomes
    assert len(fuzzed) == FAST_FUZZ_CASES
    check_outcomes({i: o for i, o in enumerate(fuzzed)})
    print(f"\nfuzz, seed 20, {FAST_FUZZ_CASES} cases: {summarize(fuzzed)}")


@pytest.mark.slow
def test_fuzzed_tflite_files_end_in_a_result_or_a_clear_error_long_run(tflite, tmp_path):
    outcomes = through_the_cli(mutants(tflite.read_bytes(), tmp_path, 2020, SLOW_FUZZ_CASES),
                               tmp_path)
    assert len(outcomes) == SLOW_FUZZ_CASES
    check_outcomes(outcomes)
    kinds = summarize(outcomes.values())
    print(f"\nfuzz, seed 2020, {SLOW_FUZZ_CASES} cases: {kinds}")
    # Both checks met mutants: 1-20 random bytes of a 15 KB file break its structure
    # often (LCE's bare interpreter died on 19 of 40 such files with 20 bytes changed),
    # and the rest reach the interpreter, in the child and then in the reading process.
    assert kinds.get("not a flatbuffer", 0) > 0
    assert kinds.get("result", 0) + kinds.get("interpreter error (probe)", 0) > 0


def one_table_reached(flatbuffer: bytes, times: int) -> bytes:
    """The flatbuffer with its buffer list replaced by `times` references to one empty
    Buffer table (appended, sharing the vtable of the model's first buffer): a file of
    4 bytes per reference that makes a verifier visit a table `times` times."""
    model = root(flatbuffer)
    first = model.Buffers(0)._tab.Pos
    vtable = first - struct.unpack_from("<i", flatbuffer, first)[0]
    data = bytearray(flatbuffer) + bytes(-len(flatbuffer) % 4)
    vector = len(data)
    table = vector + 4 + 4 * times
    data += struct.pack("<I", times)
    data += (table - (vector + 4 + 4 * np.arange(times, dtype=np.int64))).astype("<u4").tobytes()
    data += struct.pack("<i", table - vtable)
    field = model._tab.Pos + model._tab.Offset(12)  # Model.buffers
    struct.pack_into("<I", data, field, vector - field)
    return bytes(data)


def test_the_structure_check_follows_every_offset(tflite):
    good = tflite.read_bytes()
    verify_flatbuffer(good)
    tensor = root(good).Subgraphs(0).Tensors(0)._tab
    quantization = tensor.Indirect(tensor.Pos + tensor.Offset(12))
    refused = "LiteRT's flatbuffer verifier refuses it"

    # The fuzz run's find: a vtable offset that points before the file. A child process
    # read it and survived; the evaluating process read it and died (SIGSEGV).
    before = bytearray(good)
    struct.pack_into("<i", before, quantization, quantization + 9000)
    with pytest.raises(UnsafeFlatbuffer, match=refused):
        verify_flatbuffer(bytes(before))
    # A string whose length runs past the end.
    name = bytearray(good)
    struct.pack_into("<I", name, tensor.Pos + tensor.Offset(10) + struct.unpack_from(
        "<I", good, tensor.Pos + tensor.Offset(10))[0], 1 << 30)
    with pytest.raises(UnsafeFlatbuffer, match=refused):
        verify_flatbuffer(bytes(name))
    # Shared tables count each time they are reached (a small file can reach one table
    # billions of times); past the verifier's limit of 1,000,000 tables the file is refused.
    with pytest.raises(UnsafeFlatbuffer, match=refused):
        verify_flatbuffer(one_table_reached(good, 1_000_001))
    verify_flatbuffer(one_table_reached(good, 999_000))  # the model's own tables: < 1,000


def test_the_probe_passes_a_good_file_and_reports_a_timeout(tflite, monkeypatch):
    good = probe_interpreter(tflite.read_bytes())
    assert good.ok and good.stage == "done" and good.signal is None, good
    assert evaluate(tflite, DATASET, limit=4, batch_size=4)["num_examples"] == 4

    monkeypatch.setenv("BIREAL_TF_TFLITE_TIMEOUT_S", "0.001")
    changed = tflite.read_bytes() + b"\0" * 8  # other bytes: not among the files that passed
    with pytest.raises(ModelFileError, match="did not finish .* BIREAL_TF_TFLITE_TIMEOUT_S"):
        evaluate(changed, DATASET, limit=4)


def test_a_tflite_declaring_huge_tensors_is_refused_before_any_interpreter(tflite):
    data = bytearray(tflite.read_bytes())
    subgraph = root(bytes(data)).Subgraphs(0)
    table = subgraph.Tensors(subgraph.InputsAsNumpy()[0])._tab
    shape = table.Vector(table.Offset(4))  # Tensor.shape: [1, 32, 32, 3]
    struct.pack_into("<i", data, shape, 1 << 30)  # batch 2^30: 12 TB of float32 input
    with pytest.raises(ModelFileError, match=r"declares 12,582,91\d MB of activation tensors"):
        evaluate(bytes(data), DATASET, limit=4)


# --- Keras models with a Lambda layer -------------------------------------------------------


def lambda_model(marker: Path):
    """A model whose Lambda layer creates the file `marker` when its code runs."""
    marker_name = str(marker)
    touch = lambda x: (open(marker_name, "a").close(), x * 2.0)[1]  # noqa: E731 (the point)
    inputs = tf.keras.Input((4,))
    return tf.keras.Model(inputs, tf.keras.layers.Lambda(touch, name="double")(inputs))


@pytest.fixture(scope="module")
def lambda_models(tmp_path_factory):
    """The Lambda model as .keras and .h5, and the marker its code would create."""
    folder = tmp_path_factory.mktemp("lambda")
    marker = folder / "code_ran"
    model = lambda_model(marker)
    paths = {name: folder / name for name in ("model.keras", "model.h5")}
    for path in paths.values():
        model.save(path)
    marker.unlink(missing_ok=True)  # saving may have traced the lambda
    return paths, marker


@pytest.mark.parametrize("name", ["model.keras", "model.h5"])
def test_a_model_with_a_lambda_layer_is_refused_and_its_code_never_runs(lambda_models, name):
    from bireal_tf.export import load_keras_model

    paths, marker = lambda_models
    with pytest.raises(ModelFileError, match="holds a Lambda layer with Python code") as err:
        load_keras_model(paths[name])
    assert "safe_mode=False" in str(err.value)
    with pytest.raises(ModelFileError, match="Lambda layer"):
        evaluate(paths[name], DATASET, limit=4)
    # --init-weights of the training loop reads .keras files the same way
    trainer = Trainer(get_recipe("r18_adam"), str(paths[name].parent / "run"))
    if name == "model.keras":
        with pytest.raises(ModelFileError, match="Lambda layer"):
            trainer.load_initial_weights(None, str(paths[name]))
    assert not marker.exists()
    # Keras' own legacy reader runs the code: the refusal above is ours.
    if name == "model.h5":
        tf.keras.models.load_model(paths[name], compile=False)(tf.ones((1, 4)))
        assert marker.exists()
        marker.unlink()


@pytest.mark.slow
def test_a_saved_model_with_a_lambda_layer_loads_its_graph_not_its_code(tmp_path):
    """A SavedModel keeps the traced graph: with safe mode on, Keras revives the layer
    from that graph instead of unpacking the Python bytecode (without it, the code runs)."""
    from bireal_tf.export import load_keras_model

    marker = tmp_path / "code_ran"
    lambda_model(marker).save(tmp_path / "saved_model")
    marker.unlink()  # saving traced the lambda
    model = load_keras_model(tmp_path / "saved_model")
    np.testing.assert_allclose(model(tf.ones((1, 4))).numpy(), 2.0)
    assert not marker.exists()


# --- .h5 weights for from_larq_zoo ----------------------------------------------------------


KERNEL = "conv1/kernel:0"


def ones(group, name):
    group.create_dataset(name, data=np.ones((7, 7, 3, 64), np.float32))


def declared(*shape):
    """A chunked dataset of `shape` with nothing written: the file stays a few KB."""
    return lambda group, name: group.create_dataset(name, shape=shape, dtype="f4",
                                                    chunks=(1,) * (len(shape) - 1) + (1000,))


def link(target):
    def make(group, name):
        group[name] = target
    return make


def weights_file(path, weight=ones, edit=None):
    """A weights file as Keras lays one out: layer 'conv1' with the weight KERNEL, made by
    `weight(group, name)`; then `edit(file)`."""
    with h5py.File(path, "w") as f:
        f.attrs["layer_names"] = [b"conv1"]
        group = f.create_group("conv1")
        group.attrs["weight_names"] = [KERNEL.encode()]
        weight(group, KERNEL)
        if edit:
            edit(f)
    return path


def layer_as_dataset(f):
    del f["conv1"]
    f.create_dataset("conv1", data=np.ones(3))


def hostile_files(folder):
    """{what: (path, what the error must say)}."""
    other = weights_file(folder / "other.h5")
    secret = folder / "secret.bin"
    secret.write_bytes(b"\1" * 4096)
    (folder / "noise.h5").write_bytes(random.Random(0).randbytes(4096))
    truncated = folder / "truncated.h5"
    truncated.write_bytes(weights_file(folder / "whole.h5").read_bytes()[:3000])
    cases = {
        "10^10 numbers declared in an 8 KB file": (
            dict(weight=declared(100_000, 100_000)), "declares 10,000,000,000 numbers"),
        "an absurd shape, 2^31 x 2^31": (
            dict(weight=declared(2**31, 2**31)), "declares 4,611,686,018,427,387,904 numbers"),
        "strings where numbers belong": (
            dict(weight=lambda g, n: g.create_dataset(n, data=np.array([b"abc"] * 4))), "not numbers"),
        "a null dataset": (
            dict(weight=lambda g, n: g.create_dataset(n, data=h5py.Empty("f4"))), "not numbers"),
        "layer names that are numbers": (
            dict(edit=lambda f: f.attrs.__setitem__("layer_names", np.arange(3))),
            "is not a list of names"),
        "a layer that is a dataset": (dict(edit=layer_as_dataset), "not a Group"),
        "no layer_names": (dict(edit=lambda f: f.attrs.__delitem__("layer_names")), "layer_names"),
        "a layer without weight_names": (
            dict(edit=lambda f: f["conv1"].attrs.__delitem__("weight_names")), "weight_names"),
        "a weight behind an external link": (
            dict(weight=link(h5py.ExternalLink(other, f"/conv1/{KERNEL}"))),
            "ExternalLink, not in the file"),
        "a weight behind a soft link": (
            dict(weight=link(h5py.SoftLink("/elsewhere"))), "SoftLink, not in the file"),
        "a weight stored in another file (external storage)": (
            dict(weight=lambda g, n: g.create_dataset(n, shape=(1024,), dtype="f4",
                                                      external=[(str(secret), 0, 4096)])),
            "keeps its data outside the file"),
    }
    files = {what: (weights_file(folder / f"case{i}.h5", **how), cause)
             for i, (what, (how, cause)) in enumerate(cases.items())}
    files["not HDF5 at all"] = (folder / "noise.h5", "OSError")
    files["a truncated weights file"] = (truncated, "OSError")
    return files


def test_hostile_h5_weights_get_a_value_error_naming_the_file(tmp_path):
    # What Keras writes is read, layers without weights left out (the reader is not blind).
    model = tf.keras.Sequential([tf.keras.Input((2,)), tf.keras.layers.Dense(3, name="fc"),
                                 tf.keras.layers.ReLU(name="relu")])
    model.save_weights(str(tmp_path / "keras.h5"))
    (name, arrays), = larq_zoo._read_h5(tmp_path / "keras.h5")
    assert name == "fc" and [a.shape for a in arrays] == [(2, 3), (3,)]

    files = hostile_files(tmp_path)
    tracemalloc.start()
    try:
        for what, (path, cause) in files.items():
            with pytest.raises(ValueError) as err:
                larq_zoo._read_h5(path)  # what from_larq_zoo and load_larq_zoo_weights read with
            assert str(path) in str(err.value) and cause in str(err.value), (what, str(err.value))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20, f"reading the hostile files took {peak / 2**20:.0f} MB"
    assert MAX_NUMBERS < 100_000 * 100_000


def test_larq_zoo_weights_loading_refuses_a_hostile_h5(tmp_path):
    path = hostile_files(tmp_path)["a weight stored in another file (external storage)"][0]
    model = tf.keras.Sequential([tf.keras.Input((2,)), tf.keras.layers.Dense(3, name="fc")])
    # from_larq_zoo(path) builds Bi-Real-18 (10-35 s on the loaded test host), then calls this
    with pytest.raises(ValueError, match=f"{path} is not a readable Keras .h5 weights file"):
        assign_larq_zoo_weights(model, path)
    with pytest.raises(ValueError, match=f"{path} is not a readable Keras .h5 weights file"):
        larq_zoo.load_larq_zoo_weights(model, path)


@pytest.mark.slow
def test_from_larq_zoo_refuses_a_hostile_h5(tmp_path):
    from bireal_tf.models import from_larq_zoo

    path = hostile_files(tmp_path)["10^10 numbers declared in an 8 KB file"][0]
    with pytest.raises(ValueError, match=f"{path} is not a readable .*10,000,000,000 numbers"):
        from_larq_zoo(path, input_shape=(32, 32, 3))


# --- --overwrite and the workers' folders ----------------------------------------------------


def test_overwrite_keeps_the_workers_folders(tmp_path):
    out = tmp_path / "run"
    (out / "worker-1" / "stages").mkdir(parents=True)
    (out / "worker-1" / "run.json").write_text(json.dumps({"recipe": "r18_adam"}))
    (out / "worker-1" / "stages" / "model.keras").write_text("worker 1's")
    (out / "stages" / "0_binary").mkdir(parents=True)
    (out / "run.json").write_text(json.dumps({"recipe": "r18_paper"}))
    (out / "metrics.csv").write_text("old")
    (out / "stale-worker-file").write_text("a file, not a worker's folder")

    RunDirectory.for_worker(str(out), is_chief=True).claim(get_recipe("r18_adam"), overwrite=True)

    assert sorted(p.name for p in out.iterdir()) == ["run.json", "worker-1"]
    assert json.loads((out / "run.json").read_text())["recipe"] == "r18_adam"
    assert (out / "worker-1" / "stages" / "model.keras").read_text() == "worker 1's"
