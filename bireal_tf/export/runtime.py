"""Run a .tflite through Larq Compute Engine's Python interpreter.

`larq_compute_engine.testing.Interpreter` registers LCE's custom ops
(`LceBconv2d`, `LceQuantize`, ...) with TFLite. Its input shape is fixed at
conversion (batch 1 for Keras models with a free batch dimension) and it has no
resize call, so `TFLiteRunner.predict` feeds a batch sample by sample (or in
chunks of the flatbuffer's batch size). int8 inputs and outputs are quantized
and dequantized with the tensor's scale and zero point.

On x86-64 LCE runs portable kernels; its optimized kernels are for 64-bit ARM.
Timings taken here are host latencies, not device latencies.
"""

import os
import platform
import statistics
import time
from collections.abc import Iterable, Sequence

import numpy as np

__all__ = [
    "HOST_LATENCY_NOTE",
    "TFLiteRunner",
    "host_description",
    "measure_latency",
]

HOST_LATENCY_NOTE = (
    "Host latency through LCE's Python interpreter, batch 1, median of the timed runs after "
    "warm-up. On x86-64 LCE runs portable (reference-class) kernels; its fast kernels are for "
    "64-bit ARM (aarch64: Android phones, Raspberry Pi with a 64-bit OS). This is not device "
    "latency: measure that on the device with LCE's lce_benchmark_model."
)


def host_description() -> dict:
    return {
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count() or 1,
    }


class TFLiteRunner:
    """Float-in, float-out inference of a single-input flatbuffer with LCE's interpreter."""

    def __init__(self, flatbuffer: bytes, num_threads: int = 1, use_reference_bconv: bool = False):
        from larq_compute_engine import testing as lce_testing  # LCE's interpreter module

        self.interpreter = lce_testing.Interpreter(
            flatbuffer, num_threads=int(num_threads), use_reference_bconv=use_reference_bconv
        )
        if len(self.interpreter.input_shapes) != 1 or len(self.interpreter.output_shapes) != 1:
            raise ValueError(
                "only flatbuffers with one input and one output are supported; this one has "
                f"{len(self.interpreter.input_shapes)} inputs and "
                f"{len(self.interpreter.output_shapes)} outputs"
            )
        self.input_shape = tuple(int(d) for d in self.interpreter.input_shapes[0])
        self.output_shape = tuple(int(d) for d in self.interpreter.output_shapes[0])
        self.input_dtype = np.dtype(self.interpreter.input_types[0])
        self.output_dtype = np.dtype(self.interpreter.output_types[0])
        self.input_scale = self.interpreter.input_scales[0]
        self.input_zero_point = self.interpreter.input_zero_points[0]
        self.output_scale = self.interpreter.output_scales[0]
        self.output_zero_point = self.interpreter.output_zero_points[0]

    @property
    def batch_size(self) -> int:
        return self.input_shape[0] if self.input_shape else 1

    def _quantize(self, x: np.ndarray) -> np.ndarray:
        if self.input_dtype == np.float32:
            return np.ascontiguousarray(x, dtype=np.float32)
        info = np.iinfo(self.input_dtype)
        scale = float(self.input_scale or 1.0)
        zero = int(self.input_zero_point or 0)
        q = np.round(np.asarray(x, np.float32) / scale) + zero
        return np.clip(q, info.min, info.max).astype(self.input_dtype)

    def _dequantize(self, y: np.ndarray) -> np.ndarray:
        if self.output_dtype == np.float32:
            return np.asarray(y, np.float32)
        scale = float(self.output_scale or 1.0)
        zero = int(self.output_zero_point or 0)
        return (np.asarray(y, np.float32) - zero) * scale

    def predict(self, x) -> np.ndarray:
        """x float [N, *input_shape[1:]] -> float outputs [N, *output_shape[1:]]."""
        x = np.asarray(x)
        if tuple(x.shape[1:]) != self.input_shape[1:]:
            raise ValueError(
                f"input of shape {tuple(x.shape)} does not fit the flatbuffer's input "
                f"{self.input_shape} (batch dimension aside)"
            )
        xq = self._quantize(x)
        n = xq.shape[0]
        if n == 0:
            return np.zeros((0,) + self.output_shape[1:], np.float32)
        b = self.batch_size
        if b == 1:
            out = self.interpreter.predict(xq)
        else:  # a flatbuffer converted with a fixed batch: feed full chunks, pad the last
            chunks = []
            for start in range(0, n, b):
                chunk = xq[start: start + b]
                short = b - chunk.shape[0]
                if short:
                    chunk = np.concatenate([chunk, np.repeat(chunk[-1:], short, axis=0)])
                chunks.append(self.interpreter.interpreter.predict([chunk])[0][: b - short])
            out = np.concatenate(chunks)
        out = np.asarray(out).reshape((n,) + self.output_shape[1:])
        return self._dequantize(out)

    def predict_batches(self, batches: Iterable[np.ndarray]) -> list[np.ndarray]:
        return [self.predict(b) for b in batches]


def measure_latency(
    flatbuffer: bytes,
    sample: np.ndarray,
    threads: Sequence[int] = (1, 2),
    runs: int = 10,
    warmup: int = 2,
) -> list[dict]:
    """Median / min wall time in ms of one batch-1 inference, per thread count."""
    results = []
    for n in threads:
        runner = TFLiteRunner(flatbuffer, num_threads=int(n))
        x = np.asarray(sample)[: runner.batch_size]
        if x.shape[0] < runner.batch_size:
            x = np.repeat(x[:1], runner.batch_size, axis=0)
        for _ in range(max(0, int(warmup))):
            runner.predict(x)
        times = []
        for _ in range(max(1, int(runs))):
            start = time.perf_counter()
            runner.predict(x)
            times.append((time.perf_counter() - start) * 1000.0)
        results.append({
            "threads": int(n),
            "median": round(statistics.median(times), 4),
            "min": round(min(times), 4),
        })
    return results

