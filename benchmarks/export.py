"""LCE export of Bi-Real 18/34/50: size against its floor, conversion time, and host
latency (x86-64) at 1 and 2 threads against the float twin under XNNPACK.

- Binary network: `bireal_tf.export.export_tflite`, which converts with LCE,
  checks that every binary conv became an `LceBconv2d` and that the .tflite agrees
  with Keras, and reports the size floor (1 bit per binary weight, 32 bits per
  other parameter, 2 per BatchNorm channel).
- Float twin: the same builder with activation="relu", converted by the plain
  TFLite converter and run by `tf.lite.Interpreter`, which applies XNNPACK to
  float graphs by default.
- Latency: batch 1, one inference per repeat; LCE and float at 1 and 2 threads
  round robin, after a warm-up round.
"""
import os
import tempfile

import numpy as np

from benchmarks.common import Timer, f1, latency_case, log, round_robin, summarize, table, times

TITLE = "Export (LCE) and host latency"
TARGET = ".tflite size within 5% of its floor (ratio <= 1.05)"
HOST_NOTE = ("Host latency (x86-64): LCE runs portable kernels here; its optimized binary "
             "kernels target 64-bit ARM. Not device latency.")
METHOD = ("binary: bireal_tf.export.export_tflite (LCE converter, binary-conv and parity "
          "checks); float twin: activation='relu' network, plain TFLite converter, "
          "tf.lite.Interpreter (XNNPACK); batch-1 latency, one inference per repeat, LCE/float "
          "and 1/2 threads round robin. The 2-thread figures need both cores: when another "
          "process holds one, a thread pool waits for its descheduled worker at every op and 2 "
          "threads can be far slower than 1 (see the load average)")



def _tflite_predict(flatbuffer: bytes, threads: int):
    import tensorflow as tf

    interpreter = tf.lite.Interpreter(model_content=flatbuffer, num_threads=threads)
    interpreter.allocate_tensors()
    inp = interpreter.get_input_details()[0]["index"]
    out = interpreter.get_output_details()[0]["index"]

    def predict(x):
        interpreter.set_tensor(inp, x)
        interpreter.invoke()
        return interpreter.get_tensor(out)

    return predict


def export_one(depth: int, settings, workdir: str) -> dict:
    import warnings

    import tensorflow as tf
    from larq_compute_engine import testing as lce_testing

    from bireal_tf.export import ParitySettings, export_tflite
    from bireal_tf.models import bireal_net

    size, n = settings.export_size, settings.export_num_classes
    path = os.path.join(workdir, f"birealnet{depth}.tflite")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a parity warning is recorded in the row instead
        report = export_tflite(bireal_net(depth, input_shape=(size, size, 3), num_classes=n), path,
                               latency=None, parity=ParitySettings(samples=2),
                               allow_mismatch=True)
    with open(path, "rb") as f:
        binary = f.read()
    row = {"depth": depth, "input": [size, size, 3], "num_classes": n,
           "tflite_bytes": report.size.file_bytes, "floor_bytes": report.size.floor_bytes,
           "size_ratio": report.size.ratio, "conversion_seconds": round(report.conversion_seconds, 2),
           "keras_binary_convs": report.binary_convs.keras_binary_convs,
           "lce_bconv2d": report.binary_convs.lce_bconv2d, "all_binary": report.binary_convs.ok,
           "parity_verdict": report.parity.verdict}
    log(f"export: R{depth} {row['tflite_bytes'] / 2**20:.2f} MiB (floor x{row['size_ratio']}), "
        f"LCE conversion {row['conversion_seconds']} s, {row['lce_bconv2d']}/"
        f"{row['keras_binary_convs']} binary")

    float_model = bireal_net(depth, input_shape=(size, size, 3), num_classes=n, activation="relu")
    timer = Timer()
    float_fb = tf.lite.TFLiteConverter.from_keras_model(float_model).convert()
    row.update(float_tflite_bytes=len(float_fb), float_conversion_seconds=round(timer.seconds, 2))
    del float_model
    tf.keras.backend.clear_session()

    x = np.random.default_rng(depth).standard_normal((1, size, size, 3), dtype=np.float32)
    cases = {f"lce_{t}t": latency_case(lce_testing.Interpreter(binary, num_threads=t).predict, x)
             for t in (1, 2)}
    cases.update({f"float_{t}t": latency_case(_tflite_predict(float_fb, t), x) for t in (1, 2)})
    samples = round_robin(cases, settings.latency_repeats, 1, log_each=False)
    row["latency_ms"] = lat = {k: summarize(v) for k, v in samples.items()}
    row["latency_repeats"] = settings.latency_repeats
    for t in (1, 2):
        row[f"lce_over_float_{t}t"] = round(lat[f"lce_{t}t"]["median"] / lat[f"float_{t}t"]["median"], 3)
    log(f"export: R{depth} host latency LCE {lat['lce_1t']['median']:.1f}/{lat['lce_2t']['median']:.1f}"
        f" ms, float twin {lat['float_1t']['median']:.1f}/{lat['float_2t']['median']:.1f} ms (1/2 threads)")
    return row


def run(settings, sections=None) -> dict:
    with tempfile.TemporaryDirectory(prefix="bireal_bench_export_") as workdir:
        return {"models": [export_one(depth, settings, workdir) for depth in settings.export_depths]}


def _mib(n) -> str:
    return f"{n / 2**20:.2f}"


def markdown(r: dict) -> str:
    sizes = [[f"Bi-Real-{m['depth']}", f"{m['input'][0]}x{m['input'][1]}", _mib(m["tflite_bytes"]),
              _mib(m["floor_bytes"]), times(m["size_ratio"], 3),
              "met" if m["size_ratio"] <= 1.05 else "NOT met", f"{m['lce_bconv2d']}/{m['keras_binary_convs']}",
              m["parity_verdict"], f1(m["conversion_seconds"]), _mib(m["float_tflite_bytes"]),
              f1(m["float_conversion_seconds"])] for m in r["models"]]
    latency = [[f"Bi-Real-{m['depth']}"] + [f1(m["latency_ms"][k]["median"])
                                           for k in ("lce_1t", "lce_2t", "float_1t", "float_2t")]
               + [times(m["lce_over_float_1t"]), times(m["lce_over_float_2t"]), m["latency_repeats"]]
               for m in r["models"]]
    return "\n\n".join([
        f"**{HOST_NOTE}**",
        f"{METHOD}. Target: {TARGET}.",
        table(["network", "input", ".tflite MiB", "floor MiB", "size/floor", "target <= 1.05",
               "LceBconv2d / binary convs", "Keras parity", "LCE conversion s", "float twin MiB",
               "float conversion s"], sizes),
        "The float twin is float32 throughout. Keras parity is export_tflite's verdict on 2 random "
        "inputs (\"inconclusive\": an input lies too close to a sign threshold for float rounding "
        "to be ruled out; the export tests check parity properly).",
        "Host latency (x86-64), ms per single-image inference, median:",
        table(["network", "LCE 1 thread", "LCE 2 threads", "float twin XNNPACK 1 thread",
               "float twin XNNPACK 2 threads", "LCE/float 1t", "LCE/float 2t", "repeats"], latency),
    ])


def findings(r: dict) -> list:
    return [f"Bi-Real-{m['depth']} .tflite {m['tflite_bytes'] / 2**20:.2f} MiB = {m['size_ratio']:.3f}x "
            f"its floor ({'within' if m['size_ratio'] <= 1.05 else 'NOT within'} 5%), "
            f"{m['lce_bconv2d']}/{m['keras_binary_convs']} convs binary; host latency LCE "
            f"{m['latency_ms']['lce_1t']['median']:.0f}/{m['latency_ms']['lce_2t']['median']:.0f} ms vs "
            f"float twin {m['latency_ms']['float_1t']['median']:.0f}/"
            f"{m['latency_ms']['float_2t']['median']:.0f} ms (1/2 threads; x86-64 host, not device)."
            for m in r["models"]]
