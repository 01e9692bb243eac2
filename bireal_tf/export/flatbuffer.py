"""Read a TFLite / LCE flatbuffer: its op histogram, its I/O and the weights of its convs.

Parsing uses the schema LCE ships (`larq_compute_engine.mlir.python.tflite_schema`),
so it knows nothing about TensorFlow's interpreter and works on any flatbuffer.
Builtin ops are named by the `BuiltinOperator` enum (`CONV_2D`, `ADD`, ...),
custom ops by their `customCode` (`LceBconv2d`, `LceQuantize`, `LceDequantize`).
"""

from collections import Counter
from dataclasses import dataclass, field

import numpy as np
from larq_compute_engine.mlir.python import tflite_schema as schema

__all__ = [
    "LCE_OPS",
    "FlatbufferError",
    "OpInfo",
    "TFLiteGraph",
    "TensorInfo",
    "op_histogram",
    "read_graph",
    "unpack_bconv_filter",
]

LCE_OPS = ("LceBconv2d", "LceQuantize", "LceDequantize", "LceBMaxPool2d")
_BUILTIN_NAMES = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
_TYPE_NAMES = {v: k.lower() for k, v in vars(schema.TensorType).items() if not k.startswith("_")}
_NUMPY_TYPES = {
    schema.TensorType.FLOAT32: np.float32,
    schema.TensorType.FLOAT16: np.float16,
    schema.TensorType.INT32: np.int32,
    schema.TensorType.UINT8: np.uint8,
    schema.TensorType.INT64: np.int64,
    schema.TensorType.INT8: np.int8,
    schema.TensorType.INT16: np.int16,
    schema.TensorType.FLOAT64: np.float64,
}


class FlatbufferError(ValueError):
    """The bytes are not a TFLite flatbuffer (wrong identifier or unreadable)."""


@dataclass
class TensorInfo:
    index: int
    name: str
    shape: tuple[int, ...]
    type: str  # "float32", "int8", "int32", ...
    buffer: int
    scale: float | None = None
    zero_point: int | None = None


@dataclass
class OpInfo:
    index: int
    name: str  # builtin op name or custom code
    inputs: list[int] = field(default_factory=list)
    outputs: list[int] = field(default_factory=list)


class TFLiteGraph:
    """The main subgraph of a flatbuffer, with access to constant tensor data."""

    def __init__(self, flatbuffer: bytes):
        self.flatbuffer = bytes(flatbuffer)
        if len(self.flatbuffer) < 8 or self.flatbuffer[4:8] != b"TFL3":
            raise FlatbufferError(
                "not a TFLite flatbuffer (the file identifier at bytes 4-8 is "
                f"{self.flatbuffer[4:8]!r}, expected b'TFL3')"
            )
        try:
            self.model = schema.Model.GetRootAsModel(self.flatbuffer, 0)
            self._codes = [self._op_name(self.model.OperatorCodes(i))
                           for i in range(self.model.OperatorCodesLength())]
            self.subgraph_count = self.model.SubgraphsLength()
            self.ops_by_subgraph = [self._read_ops(s) for s in range(self.subgraph_count)]
            graph = self.model.Subgraphs(0)
            self.tensors = [self._tensor(graph, i) for i in range(graph.TensorsLength())]
            self.inputs = [self.tensors[i] for i in graph.InputsAsNumpy()]
            self.outputs = [self.tensors[i] for i in graph.OutputsAsNumpy()]
        except FlatbufferError:
            raise
        except Exception as err:  # flatbuffers raises assorted errors on garbage
            raise FlatbufferError(f"unreadable TFLite flatbuffer ({type(err).__name__}: {err})")

    @staticmethod
    def _op_name(code) -> str:
        builtin = max(code.BuiltinCode(), code.DeprecatedBuiltinCode())
        if builtin == schema.BuiltinOperator.CUSTOM:
            custom = code.CustomCode()
            return custom.decode() if custom else "CUSTOM"
        return _BUILTIN_NAMES.get(builtin, f"BUILTIN_{builtin}")

    def _read_ops(self, s) -> list[OpInfo]:
        graph = self.model.Subgraphs(s)
        ops = []
        for o in range(graph.OperatorsLength()):
            op = graph.Operators(o)
            ops.append(OpInfo(
                index=o,
                name=self._codes[op.OpcodeIndex()],
                inputs=[int(i) for i in (op.InputsAsNumpy() if op.InputsLength() else [])],
                outputs=[int(i) for i in (op.OutputsAsNumpy() if op.OutputsLength() else [])],
            ))
        return ops

    @staticmethod
    def _tensor(graph, i) -> TensorInfo:
        t = graph.Tensors(i)
        shape = tuple(int(d) for d in t.ShapeAsNumpy()) if t.ShapeLength() else ()
        scale = zero_point = None
        q = t.Quantization()
        if q is not None and q.ScaleLength() == 1:
            scale = float(q.Scale(0))
            zero_point = int(q.ZeroPoint(0)) if q.ZeroPointLength() else 0
        name = t.Name().decode(errors="replace") if t.Name() else ""
        return TensorInfo(i, name, shape, _TYPE_NAMES.get(t.Type(), str(t.Type())), t.Buffer(),
                          scale, zero_point)

    @property
    def ops(self) -> list[OpInfo]:
        """Operators of the main subgraph."""
        return self.ops_by_subgraph[0]

    def histogram(self) -> Counter:
        """Count of every op over all subgraphs, by name."""
        counts = Counter()
        for ops in self.ops_by_subgraph:
            counts.update(op.name for op in ops)
        return counts

    def tensor_data(self, index: int) -> np.ndarray | None:
        """The constant data of tensor `index` as an array of its shape, or None."""
        info = self.tensors[index]
        buffer = self.model.Buffers(info.buffer)
        dtype = _NUMPY_TYPES.get(schema.TensorType.__dict__.get(info.type.upper(), -1))
        if buffer is None or dtype is None:
            return None
        if buffer.DataLength():
            raw = buffer.DataAsNumpy().tobytes()
        elif buffer.Offset() > 1 and buffer.Size():  # stored after the flatbuffer (> 2 GB models)
            raw = self.flatbuffer[buffer.Offset(): buffer.Offset() + buffer.Size()]
        else:
            return None
        data = np.frombuffer(raw, dtype=dtype)
        if info.shape and data.size == int(np.prod(info.shape)):
            data = data.reshape(info.shape)
        return data


def read_graph(flatbuffer: bytes) -> TFLiteGraph:
    return TFLiteGraph(flatbuffer)


def op_histogram(flatbuffer: bytes) -> Counter:
    """{op name: count} over every subgraph of the flatbuffer."""
    return TFLiteGraph(flatbuffer).histogram()


def unpack_bconv_filter(words: np.ndarray, in_channels: int) -> np.ndarray:
    """LceBconv2d's bitpacked filter [O, H, W, ceil(C/32)] int32 -> bool [O, H, W, C], True = -1.

    LCE packs 32 input channels per int32, channel 32*j + i in bit i of word j,
    a set bit for a negative weight.
    """
    words = np.ascontiguousarray(words, dtype="<i4")
    bits = np.unpackbits(words.view(np.uint8).reshape(words.shape + (4,)), axis=-1,
                         bitorder="little")
    bits = bits.reshape(words.shape[:-1] + (words.shape[-1] * 32,))
    return bits[..., :in_channels].astype(bool)
