"""Section 3: LCE export of Bi-Real 18/34/50: size against its floor, conversion time,
host latency (x86-64) at 1 and 2 threads against the float twin under XNNPACK.

- Binary network: `bireal_tf.export.export_tflite(model, path, benchmark=False)`,
  which converts with `larq_compute_engine.convert_keras_model`, checks that
  every binary conv became an `LceBconv2d` and that the .tflite agrees with
  Keras, and gives the size floor (1 bit per binary weight, 32 bits per other
  parameter, 2 per BatchNorm channel; `bireal_tf.export.footprint`).
- Float twin: the same builder with activation="relu" (same layout, real
  weights), converted with the plain TFLite converter (`tf.lite.TFLiteConverter`)
  and run by `tf.lite.Interpreter(num_threads=n)`, which applies XNNPACK to float
  graphs by default.
- Latency: batch 1, one inference per repeat; LCE 1 thread, LCE 2 threads,
  float 1 thread, float 2 threads run round robin, after a warm-up round.

This is host latency on x86-64, where LCE runs its portable kernels; LCE's fast
binary kernels are for 64-bit ARM. It is not device latency.
"""
import os
import shutil
import tempfile
import time

import numpy as np

from benchmarks.common import Settings, Stopwatch, collect, log, round_robin, summarize

HOST_NOTE = ("Host latency (x86-64): LCE runs portable kernels here; its optimized binary "
             "kernels target 64-bit ARM. Not device latency.")


def _lce_runner(flatbuffer: bytes, threads: int):
    from larq_compute_engine import testing as lce_testing

    interpreter = lce_testing.Interpreter(flatbuffer, num_threads=int(threads))
    return lambda x: interpreter.predict(x)


def _tflite_runner(flatbuffer: bytes, threads: int):
    import tensorflow as tf

    interpreter = tf.lite.Interpreter(model_content=flatbuffer, num_threads=int(threads))
    interpreter.allocate_tensors()
    inp = interpreter.get_input_details()[0]["index"]
    out = interpreter.get_output_details()[0]["index"]

    def predict(x):
        interpreter.set_tensor(inp, x)
        interpreter.invoke()
        return interpreter.get_tensor(out)

    return predict


def _timed(predict, x):
    def run() -> float:
        start = time.perf_counter()
        predict(x)
        return (time.perf_counter() - start) * 1000.0

    return run


def convert_float_twin(depth: int, size: int, num_classes: int):
    """(flatbuffer, seconds, model) of the ReLU network converted by the plain TFLite converter."""
    import tensorflow as tf

    from bireal_tf.models import bireal_net

    model = bireal_net(depth, input_shape=(size, size, 3), num_classes=num_classes, activation="relu")
    watch = Stopwatch()
    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    flatbuffer = converter.convert()
    return bytes(flatbuffer), watch.seconds, model


def _lce_export(model, path: str) -> dict:
    """Convert with bireal_tf.export.export_tflite (checks + size floor); if that is not
    usable, with LCE directly and the size floor from bireal_tf.export.footprint."""
    import warnings

    try:
        from bireal_tf.export import export_tflite

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a parity warning is recorded in the row instead
            report = export_tflite(model, path, benchmark=False, parity_samples=2,
                                   allow_mismatch=True)
        with open(path, "rb") as f:
            flatbuffer = f.read()
        parity = report.parity
        return {
            "flatbuffer": flatbuffer,
            "via": "bireal_tf.export.export_tflite",
            "tflite_bytes": report.size.file_bytes,
            "floor_bytes": report.size.floor_bytes,
            "size_ratio": report.size.ratio,
            "binary_params": report.size.binary_params,
            "float_params": report.size.float_params,
            "batchnorm_params": report.size.batchnorm_params,
            "conversion_seconds": round(report.conversion_seconds, 2),
            "keras_binary_convs": report.binary_convs.keras_binary_convs,
            "lce_bconv2d": report.binary_convs.lce_bconv2d,
            "all_binary": report.binary_convs.ok,
            "parity_max_abs_diff": parity.max_abs_diff,
            "parity_verdict": getattr(parity, "verdict", "ok" if parity.ok else "mismatch"),
            "op_histogram": report.op_histogram,
        }
    except Exception as err:  # the export module is still moving: measure anyway
        import larq_compute_engine as lce

        from bireal_tf.export import footprint, op_histogram
        from bireal_tf.models import binary_conv_layers

        log(f"export: export_tflite failed ({type(err).__name__}: {str(err)[:200]}); "
            "converting with LCE directly")
        watch = Stopwatch()
        flatbuffer = bytes(lce.convert_keras_model(model))
        seconds = watch.seconds
        foot = footprint(model)
        hist = dict(op_histogram(flatbuffer))
        n_binary = len(binary_conv_layers(model))
        return {
            "flatbuffer": flatbuffer,
            "via": f"larq_compute_engine.convert_keras_model (export_tflite failed: {type(err).__name__})",
            "tflite_bytes": len(flatbuffer),
            "floor_bytes": foot.floor_bytes,
            "size_ratio": round(len(flatbuffer) / foot.floor_bytes, 4),
            "binary_params": foot.binary_params,
            "float_params": foot.float_params,
            "batchnorm_params": foot.batchnorm_params,
            "conversion_seconds": round(seconds, 2),
            "keras_binary_convs": n_binary,
            "lce_bconv2d": hist.get("LceBconv2d", 0),
            "all_binary": hist.get("LceBconv2d", 0) >= n_binary,
            "parity_max_abs_diff": None,
            "parity_verdict": "not checked",
            "op_histogram": hist,
        }


def export_one(depth: int, settings: Settings, workdir: str) -> dict:
    import tensorflow as tf

    from bireal_tf.models import bireal_net

    size, n = settings.export_size, settings.export_num_classes
    model = bireal_net(depth, input_shape=(size, size, 3), num_classes=n)
    path = os.path.join(workdir, f"birealnet{depth}.tflite")
    converted = _lce_export(model, path)
    binary = converted.pop("flatbuffer")
    row = {"depth": depth, "input": [size, size, 3], "num_classes": n, **converted}
    log(f"export: R{depth} {row['tflite_bytes'] / 2**20:.2f} MiB (floor x{row['size_ratio']}), "
        f"LCE conversion {row['conversion_seconds']} s, {row['lce_bconv2d']}/"
        f"{row['keras_binary_convs']} binary")
    del model
    collect()

    float_fb, float_seconds, float_model = convert_float_twin(depth, size, n)
    row["float_tflite_bytes"] = len(float_fb)
    row["float_conversion_seconds"] = round(float_seconds, 2)
    row["float_converter"] = "tf.lite.TFLiteConverter.from_keras_model (plain TFLite)"
    del float_model
    tf.keras.backend.clear_session()
    collect()

    x = np.random.default_rng(depth).standard_normal((1, size, size, 3), dtype=np.float32)
    cases = {}
    for threads in (1, 2):
        cases[f"lce_{threads}t"] = _timed(_lce_runner(binary, threads), x)
    for threads in (1, 2):
        cases[f"float_{threads}t"] = _timed(_tflite_runner(float_fb, threads), x)
    repeats = max(settings.latency_repeats.get(depth, settings.repeats), 1)
    samples = round_robin(cases, repeats, max(1, settings.warmup))
    latency = {name: summarize(v) for name, v in samples.items()}
    row["latency_ms"] = latency
    row["latency_repeats"] = repeats
    for t in (1, 2):
        row[f"lce_over_float_{t}t"] = round(latency[f"lce_{t}t"]["median"]
                                            / latency[f"float_{t}t"]["median"], 3)
    log(f"export: R{depth} host latency LCE {latency['lce_1t']['median']:.1f}/"
        f"{latency['lce_2t']['median']:.1f} ms, float twin {latency['float_1t']['median']:.1f}/"
        f"{latency['float_2t']['median']:.1f} ms (1/2 threads)")
    return row


def run(settings: Settings) -> dict:
    workdir = tempfile.mkdtemp(prefix="bireal_bench_export_")
    try:
        rows = []
        for depth in settings.export_depths:
            rows.append(export_one(depth, settings, workdir))
        return {
            "note": HOST_NOTE,
            "method": ("binary: bireal_tf.export.export_tflite (LCE converter, binary-conv and "
                       "parity checks); float twin: activation='relu' network, plain TFLite "
                       "converter, tf.lite.Interpreter (XNNPACK); batch-1 latency, one inference "
                       "per repeat, LCE/float and 1/2 threads round robin. The 2-thread figures "
                       "need both cores: when another process holds one, a thread pool waits for "
                       "its descheduled worker at every op and 2 threads can be far slower than 1 "
                       "(see the load average)"),
            "models": rows,
        }
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
