"""Run a .tflite through Larq Compute Engine's interpreter or stock LiteRT, and time it here.

`larq_compute_engine.testing.Interpreter` (TFLiteRunner) registers LCE's custom
ops (`LceBconv2d`, `LceQuantize`, ...) with TFLite and feeds a batch sample by
sample. On x86-64 LCE runs portable kernels; its optimized kernels are for
64-bit ARM, so timings taken here are host latencies, not device latencies.

`LiteRTRunner` runs a file of builtin ops (a portable export, a float model)
through stock LiteRT (`ai_edge_litert`, the TFLite runtime a Raspberry Pi or an
Android app has), with its default XNNPACK delegate.
"""

import statistics
import time
from collections.abc import Sequence

import numpy as np

from bireal_tf.export.files import check_tflite

__all__ = ["HOST_LATENCY_NOTE", "LITERT_LATENCY_NOTE", "RUNNERS", "LiteRTRunner", "TFLiteRunner",
           "measure_latency"]

HOST_LATENCY_NOTE = (
    "Host latency through LCE's Python interpreter, batch 1, median of the timed runs after "
    "warm-up. On x86-64 LCE runs portable (reference-class) kernels; its fast kernels are for "
    "64-bit ARM (aarch64: Android phones, Raspberry Pi with a 64-bit OS). This is not device "
    "latency: measure that on the device with LCE's lce_benchmark_model."
)


LITERT_LATENCY_NOTE = (
    "Host latency through stock LiteRT (ai_edge_litert, default XNNPACK delegate), batch 1, median "
    "of the timed runs after warm-up, on the exporting machine. Not device latency: measure on the "
    "device (LiteRT's benchmark_model, or the predictor's timing)."
)


class TFLiteRunner:
    """Float-in, float-out inference of a single-input, batch-1 flatbuffer.

    An int8 input is quantized as q = round(x / scale) + zero_point (clipped to
    int8), an int8 output dequantized as (q - zero_point) * scale, with the
    tensor's own scale and zero point.
    """

    runtime = "lce"

    def __init__(self, flatbuffer: bytes, num_threads: int = 1, use_reference_bconv: bool = False,
                 source: str = "<in-memory .tflite>"):
        from larq_compute_engine import testing as lce_testing

        # A corrupt file can kill the interpreter's process: try it in a child first.
        check_tflite(flatbuffer, source, use_reference_bconv=use_reference_bconv)
        self.interpreter = lce_testing.Interpreter(
            flatbuffer, num_threads=int(num_threads), use_reference_bconv=use_reference_bconv)
        i = self.interpreter
        if len(i.input_shapes) != 1 or len(i.output_shapes) != 1 or i.input_shapes[0][0] != 1:
            raise ValueError(f"expected one batch-1 input and one output, got inputs "
                             f"{i.input_shapes} and outputs {i.output_shapes}")
        self.input_shape = tuple(int(d) for d in i.input_shapes[0])
        self.output_shape = tuple(int(d) for d in i.output_shapes[0])
        self.input_dtype = np.dtype(i.input_types[0])
        self.output_dtype = np.dtype(i.output_types[0])

    def predict(self, x) -> np.ndarray:
        """x float [N, *input_shape[1:]] -> float outputs [N, *output_shape[1:]]."""
        x = np.asarray(x, np.float32)
        if x.shape[1:] != self.input_shape[1:]:
            raise ValueError(f"input of shape {x.shape} does not fit the flatbuffer's input "
                             f"{self.input_shape} (batch dimension aside)")
        if len(x) == 0:
            return np.zeros((0,) + self.output_shape[1:], np.float32)
        i = self.interpreter
        if self.input_dtype != np.float32:
            scale, zero = i.input_scales[0], i.input_zero_points[0]
            info = np.iinfo(self.input_dtype)
            x = np.clip(np.round(x / scale) + zero, info.min, info.max).astype(self.input_dtype)
        y = np.asarray(i.predict(x)).reshape((len(x),) + self.output_shape[1:])
        if self.output_dtype != np.float32:
            y = (y.astype(np.float32) - i.output_zero_points[0]) * i.output_scales[0]
        return y.astype(np.float32)


class LiteRTRunner(TFLiteRunner):
    """TFLiteRunner's interface on stock LiteRT (`ai_edge_litert.interpreter.Interpreter`).

    Builtin ops only: a file with custom ops (LCE's) fails to load with LiteRT's own
    message ("Encountered unresolved custom op: LceQuantize").
    """

    runtime = "litert"

    def __init__(self, flatbuffer: bytes, num_threads: int = 1, source: str = "<in-memory .tflite>"):
        from ai_edge_litert.interpreter import Interpreter

        # The same structure check and child-process probe as TFLiteRunner's (LCE's
        # interpreter runs builtin ops as LiteRT does).
        check_tflite(flatbuffer, source)
        self.interpreter = Interpreter(model_content=bytes(flatbuffer), num_threads=int(num_threads))
        self.interpreter.allocate_tensors()
        (self._in,), (self._out,) = (self.interpreter.get_input_details(),
                                     self.interpreter.get_output_details())
        if self._in["shape"][0] != 1:
            raise ValueError(f"expected a batch-1 input, got {self._in['shape'].tolist()}")
        self.input_shape = tuple(int(d) for d in self._in["shape"])
        self.output_shape = tuple(int(d) for d in self._out["shape"])
        self.input_dtype = np.dtype(self._in["dtype"])
        self.output_dtype = np.dtype(self._out["dtype"])

    def predict(self, x) -> np.ndarray:
        """x float [N, *input_shape[1:]] -> float outputs [N, *output_shape[1:]]."""
        x = np.asarray(x, np.float32)
        if x.shape[1:] != self.input_shape[1:]:
            raise ValueError(f"input of shape {x.shape} does not fit the flatbuffer's input "
                             f"{self.input_shape} (batch dimension aside)")
        i, outputs = self.interpreter, []
        (in_scale, in_zero), (out_scale, out_zero) = self._in["quantization"], self._out["quantization"]
        for sample in x:
            if self.input_dtype != np.float32:
                info = np.iinfo(self.input_dtype)
                sample = np.clip(np.round(sample / in_scale) + in_zero, info.min, info.max)
            i.set_tensor(self._in["index"], sample[None].astype(self.input_dtype))
            i.invoke()
            y = i.get_tensor(self._out["index"])[0]
            if self.output_dtype != np.float32:
                y = (y.astype(np.float32) - out_zero) * out_scale
            outputs.append(np.asarray(y, np.float32))
        if not outputs:
            return np.zeros((0,) + self.output_shape[1:], np.float32)
        return np.stack(outputs)


RUNNERS = {"lce": TFLiteRunner, "litert": LiteRTRunner}


def measure_latency(flatbuffer: bytes, sample: np.ndarray, threads: Sequence[int] = (1, 2),
                    runs: int = 10, warmup: int = 2, runtime: str = "lce") -> list[dict]:
    """Median / min wall time in ms of one batch-1 inference, per thread count.

    `runtime`: "lce" (LCE's interpreter) or "litert" (stock LiteRT; builtin ops only).
    """
    results = []
    for n in threads:
        runner = RUNNERS[runtime](flatbuffer, num_threads=int(n))
        x = np.asarray(sample)[:1]
        for _ in range(warmup):
            runner.predict(x)
        times = []
        for _ in range(max(1, runs)):
            start = time.perf_counter()
            runner.predict(x)
            times.append((time.perf_counter() - start) * 1000.0)
        results.append({"threads": int(n), "median": round(statistics.median(times), 4),
                        "min": round(min(times), 4)})
    return results
