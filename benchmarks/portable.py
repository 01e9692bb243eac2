"""Portable export (builtin ops, stock LiteRT) against the LCE file and the float twin:
file sizes and host latency of Bi-Real 18/34/50 at 1 and 2 threads.

- Three files of the same network and weights (random, BatchNorm at its initial
  statistics): the portable file (`bireal_tf.export.convert.convert_portable`: binary
  convs as int8 +-1 hybrid CONV_2D), the float twin (the same graph with float32
  kernels, what the TFLite converter gives before the kernels are stored as int8) and
  the LCE file (`larq_compute_engine.convert_keras_model`). Both binary files are
  checked against Keras on 2 random inputs (top-1 and max |difference|).
- The networks are built with pad_values=1.0 (LCE's own padding; the portable file of
  a zero-padded net carries one extra constant map per binary conv).
- Latency: batch 1, one inference per repeat; the portable file and the float twin run
  on stock LiteRT (ai_edge_litert, default XNNPACK delegate), the LCE file on LCE's
  interpreter; all six cases round robin in one process after a warm-up round.
"""

import numpy as np

from benchmarks.common import f1, latency_case, log, round_robin, summarize, table, times

TITLE = "Portable export (stock LiteRT) against LCE and the float twin"
TARGET = "portable file <= 0.3x the float twin's size"
HOST_NOTE = ("Host latency (x86-64). LCE runs portable kernels here, while its optimized binary kernels "
             "are for 64-bit ARM; LiteRT runs XNNPACK. Not device latency.")
CASES = ("portable", "lce", "float")



def export_one(depth: int, settings) -> dict:
    import tensorflow as tf

    from bireal_tf.export import LiteRTRunner, TFLiteRunner
    from bireal_tf.export.convert import convert, convert_portable
    from bireal_tf.export.flatbuffer import TFLiteGraph
    from bireal_tf.models import bireal_net

    size, n = settings.export_size, settings.export_num_classes
    model = bireal_net(depth, input_shape=(size, size, 3), num_classes=n, pad_values=1.0)
    files = {}
    files["portable"], files["float"], lowered, seconds = convert_portable(model)
    files["lce"], lce_seconds = convert(model)
    x = np.random.default_rng(depth).standard_normal((2, size, size, 3), dtype=np.float32)
    keras = model(x).numpy()
    outputs = {"portable": LiteRTRunner(files["portable"]).predict(x),
               "lce": TFLiteRunner(files["lce"]).predict(x)}
    top1 = {k: float(np.mean(v.argmax(1) == keras.argmax(1))) for k, v in outputs.items()}
    row = {"depth": depth, "input": [size, size, 3], "num_classes": n,
           "bytes": {k: len(v) for k, v in files.items()},
           "portable_over_float_size": round(len(files["portable"]) / len(files["float"]), 4),
           "portable_over_lce_size": round(len(files["portable"]) / len(files["lce"]), 3),
           "conversion_seconds": round(seconds, 1), "lce_conversion_seconds": round(lce_seconds, 1),
           "int8_binary_convs": len(lowered),
           "op_histogram": dict(sorted(TFLiteGraph(files["portable"]).histogram.items())),
           "keras_max_abs_diff": {k: float(np.abs(v - keras).max()) for k, v in outputs.items()},
           "keras_top1_agreement": top1,
           "lce_top1_agreement": float(np.mean(outputs["portable"].argmax(1) == outputs["lce"].argmax(1)))}
    del model
    tf.keras.backend.clear_session()
    x = x[:1]
    cases = {}
    for t in (1, 2):
        cases[f"portable_{t}t"] = latency_case(LiteRTRunner(files["portable"], num_threads=t).predict, x)
        cases[f"lce_{t}t"] = latency_case(TFLiteRunner(files["lce"], num_threads=t).predict, x)
        cases[f"float_{t}t"] = latency_case(LiteRTRunner(files["float"], num_threads=t).predict, x)
    samples = round_robin(cases, settings.latency_repeats, 1, log_each=False)
    row["latency_ms"] = lat = {k: summarize(v) for k, v in samples.items()}
    row["latency_repeats"] = settings.latency_repeats
    for t in (1, 2):
        for other in ("lce", "float"):
            row[f"portable_over_{other}_{t}t"] = round(
                lat[f"portable_{t}t"]["median"] / lat[f"{other}_{t}t"]["median"], 3)
    log(f"portable: R{depth} {row['bytes']['portable'] / 2**20:.2f} MiB (x{row['portable_over_float_size']}"
        f" float twin), latency portable/LCE/float 1t {lat['portable_1t']['median']:.1f}/"
        f"{lat['lce_1t']['median']:.1f}/{lat['float_1t']['median']:.1f} ms")
    return row


def run(settings, sections=None) -> dict:
    return {"models": [export_one(depth, settings) for depth in settings.export_depths]}


def _mib(n) -> str:
    return f"{n / 2**20:.2f}"


def markdown(r: dict) -> str:
    sizes = [[f"Bi-Real-{m['depth']}", f"{m['input'][0]}x{m['input'][1]}, {m['num_classes']} classes"]
             + [_mib(m["bytes"][k]) for k in CASES]
             + [times(m["portable_over_float_size"], 3),
                "met" if m["portable_over_float_size"] <= 0.3 else "NOT met",
                times(m["portable_over_lce_size"]),
                f"{m['keras_max_abs_diff']['portable']:.2g} / {m['keras_max_abs_diff']['lce']:.2g}",
                f"{100 * m['lce_top1_agreement']:.0f}%",
                f1(m["conversion_seconds"]), f1(m["lce_conversion_seconds"])] for m in r["models"]]
    latency = [[f"Bi-Real-{m['depth']}", str(t)]
               + [f1(m["latency_ms"][f"{k}_{t}t"]["median"]) for k in CASES]
               + [times(m[f"portable_over_lce_{t}t"]), times(m[f"portable_over_float_{t}t"]),
                  m["latency_repeats"]]
               for m in r["models"] for t in (1, 2)]
    ops = "; ".join(f"Bi-Real-{m['depth']}: " + ", ".join(f"{k} {v}" for k, v in m["op_histogram"].items())
                    for m in r["models"])
    size_table = table(["network", "input", "portable MiB", "LCE MiB", "float twin MiB", "portable/float",
                        "target <= 0.3", "portable/LCE", "max diff vs Keras portable / LCE (2 inputs)",
                        "top-1 = LCE file", "portable conversion s", "LCE conversion s"], sizes)
    latency_table = table(["network", "threads", "portable (LiteRT)", "LCE (LCE interpreter)",
                           "float twin (LiteRT)", "portable/LCE", "portable/float", "repeats"], latency)
    method = __doc__.split("\n\n", 1)[1].strip()
    parts = [f"**{HOST_NOTE}**", method, f"Target: {TARGET}.", size_table,
             f"Ops of the portable files (no custom op): {ops}.",
             "Host latency (x86-64), ms per single-image inference, median of the repeats:",
             latency_table]
    return "\n\n".join(parts)


def findings(r: dict) -> list:
    return [f"Bi-Real-{m['depth']} portable .tflite {m['bytes']['portable'] / 2**20:.2f} MiB = "
            f"{m['portable_over_float_size']:.3f}x the float twin, {m['portable_over_lce_size']:.2f}x the "
            f"LCE file; host latency 1 thread portable {m['latency_ms']['portable_1t']['median']:.0f} ms, "
            f"LCE {m['latency_ms']['lce_1t']['median']:.0f} ms, float twin "
            f"{m['latency_ms']['float_1t']['median']:.0f} ms (x86-64 host, not device)."
            for m in r["models"]]
