"""Read a TFLite / LCE flatbuffer: its ops, its I/O tensors and the weights of its convs.

Parsing uses the schema LCE ships (`larq_compute_engine.mlir.python.tflite_schema`).
Builtin ops are named by the `BuiltinOperator` enum (`CONV_2D`, `ADD`, ...), custom
ops by their `customCode` (`LceBconv2d`, `LceQuantize`, `LceDequantize`).
"""

from collections import Counter
from dataclasses import dataclass

import numpy as np
from larq_compute_engine.mlir.python import tflite_schema as schema

__all__ = ["LCE_OPS", "FlatbufferError", "TFLiteGraph", "op_histogram", "unpack_bconv_filter"]

LCE_OPS = ("LceBconv2d", "LceQuantize", "LceDequantize", "LceBMaxPool2d")
_OP_NAMES = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
_TYPE_NAMES = {v: k.lower() for k, v in vars(schema.TensorType).items() if not k.startswith("_")}


class FlatbufferError(ValueError):
    """The bytes are not a TFLite flatbuffer (wrong identifier or unreadable)."""


@dataclass
class Tensor:
    shape: tuple[int, ...]
    type: str  # "float32", "int8", "int32", ... (a numpy dtype name)
    buffer: int


@dataclass
class Op:
    name: str  # builtin op name or custom code
    inputs: list[int]
    outputs: list[int] = ()


class TFLiteGraph:
    """The ops and tensors of a flatbuffer's main subgraph, with its constant data."""

    def __init__(self, flatbuffer: bytes):
        self.flatbuffer = bytes(flatbuffer)
        if self.flatbuffer[4:8] != b"TFL3":
            raise FlatbufferError("not a TFLite flatbuffer (the file identifier at bytes 4-8 is "
                                  f"{self.flatbuffer[4:8]!r}, expected b'TFL3')")
        try:
            self.model = schema.Model.GetRootAsModel(self.flatbuffer, 0)
            codes = [self._op_name(self.model.OperatorCodes(i))
                     for i in range(self.model.OperatorCodesLength())]
            self.histogram = Counter()
            for s in range(self.model.SubgraphsLength()):
                graph = self.model.Subgraphs(s)
                ops = [graph.Operators(o) for o in range(graph.OperatorsLength())]
                self.histogram.update(codes[op.OpcodeIndex()] for op in ops)
                if s == 0:
                    self.ops = [Op(codes[op.OpcodeIndex()], [int(i) for i in op.InputsAsNumpy()],
                                   [int(i) for i in op.OutputsAsNumpy()]) for op in ops]
                    self.tensors = [self._tensor(graph.Tensors(t)) for t in range(graph.TensorsLength())]
                    self.inputs = [self.tensors[i] for i in graph.InputsAsNumpy()]
                    self.outputs = [self.tensors[i] for i in graph.OutputsAsNumpy()]
        except Exception as err:  # flatbuffers raises assorted errors on garbage
            raise FlatbufferError(f"unreadable TFLite flatbuffer ({type(err).__name__}: {err})")

    @staticmethod
    def _op_name(code) -> str:
        builtin = max(code.BuiltinCode(), code.DeprecatedBuiltinCode())
        if builtin == schema.BuiltinOperator.CUSTOM:
            return (code.CustomCode() or b"CUSTOM").decode()
        return _OP_NAMES.get(builtin, f"BUILTIN_{builtin}")

    @staticmethod
    def _tensor(t) -> Tensor:
        shape = tuple(int(d) for d in t.ShapeAsNumpy()) if t.ShapeLength() else ()
        return Tensor(shape, _TYPE_NAMES.get(t.Type(), str(t.Type())), t.Buffer())

    def is_constant(self, index: int) -> bool:
        """Whether tensor `index` holds constant data (weights), not an activation."""
        buffer = self.model.Buffers(self.tensors[index].buffer)
        return buffer is not None and buffer.DataLength() > 0

    def float_ops(self) -> list:
        """The ops (in graph order) that read or write a float32 activation (not weights)."""
        return [op for op in self.ops
                if any(i >= 0 and not self.is_constant(i) and self.tensors[i].type == "float32"
                       for i in list(op.inputs) + list(op.outputs))]

    def tensor_data(self, index: int) -> np.ndarray | None:
        """The constant data of tensor `index` as an array of its shape, or None."""
        info = self.tensors[index]
        buffer = self.model.Buffers(info.buffer)
        if buffer is None or not buffer.DataLength() or info.type not in ("float32", "int32"):
            return None
        data = np.frombuffer(buffer.DataAsNumpy().tobytes(), dtype=info.type)
        return data.reshape(info.shape) if data.size == np.prod(info.shape) else data


def op_histogram(flatbuffer: bytes) -> Counter:
    """{op name: count} over every subgraph of the flatbuffer."""
    return TFLiteGraph(flatbuffer).histogram


def unpack_bconv_filter(words: np.ndarray, in_channels: int) -> np.ndarray:
    """LceBconv2d's bitpacked filter [O, H, W, ceil(C/32)] int32 -> bool [O, H, W, C], True = -1.

    LCE packs 32 input channels per int32, channel 32*j + i in bit i of word j,
    a set bit for a negative weight.
    """
    words = np.ascontiguousarray(words, dtype="<i4")
    bits = np.unpackbits(words.view(np.uint8).reshape(words.shape + (4,)), axis=-1,
                         bitorder="little")
    return bits.reshape(words.shape[:-1] + (-1,))[..., :in_channels].astype(bool)
