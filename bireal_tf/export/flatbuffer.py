"""Read a TFLite / LCE flatbuffer: its ops, its I/O tensors and the weights of its convs.

Parsing goes through `bireal_tf.export.schema` (LiteRT's copy of the schema, its op
and type names).
"""

from collections import Counter
from dataclasses import dataclass

import numpy as np

from bireal_tf.export.schema import has_tflite_identifier, is_custom, op_name, read_model, type_name

__all__ = ["LCE_OPS", "FlatbufferError", "TFLiteGraph", "op_histogram", "unpack_bconv_filter"]

LCE_OPS = ("LceBconv2d", "LceQuantize", "LceDequantize", "LceBMaxPool2d")


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
    """The ops and tensors of a flatbuffer's main subgraph, with its constant data.

    `model` is the whole file in the schema's object API; `custom_ops` the names of
    its custom ops (LCE's, or any other), sorted.
    """

    def __init__(self, flatbuffer: bytes):
        self.flatbuffer = bytes(flatbuffer)
        if not has_tflite_identifier(self.flatbuffer):
            raise FlatbufferError("not a TFLite flatbuffer (the file identifier at bytes 4-8 is "
                                  f"{self.flatbuffer[4:8]!r}, expected b'TFL3')")
        try:
            self.model = read_model(self.flatbuffer)
            codes = [op_name(self.model, i) for i in range(len(self.model.operatorCodes or []))]
            self.custom_ops = sorted({name for name, code in zip(codes, self.model.operatorCodes or [])
                                      if is_custom(code)})
            self.histogram = Counter(codes[op.opcodeIndex] for graph in self.model.subgraphs or []
                                     for op in graph.operators or [])
            graph = self.model.subgraphs[0]
            self.ops = [Op(codes[op.opcodeIndex], _ints(op.inputs), _ints(op.outputs))
                        for op in graph.operators or []]
            self.tensors = [Tensor(tuple(_ints(t.shape)), type_name(t.type), t.buffer)
                            for t in graph.tensors or []]
            self.inputs = [self.tensors[i] for i in _ints(graph.inputs)]
            self.outputs = [self.tensors[i] for i in _ints(graph.outputs)]
        except Exception as err:  # flatbuffers raises assorted errors on garbage
            raise FlatbufferError(f"unreadable TFLite flatbuffer ({type(err).__name__}: {err})")

    def _data(self, index: int):
        """The constant bytes of tensor `index` (a uint8 array), or None for an activation."""
        buffers = self.model.buffers or []
        number = self.tensors[index].buffer
        data = buffers[number].data if 0 <= number < len(buffers) else None
        return data if data is not None and len(data) else None

    def is_constant(self, index: int) -> bool:
        """Whether tensor `index` holds constant data (weights), not an activation."""
        return self._data(index) is not None

    def float_ops(self) -> list:
        """The ops (in graph order) that read or write a float32 activation (not weights)."""
        return [op for op in self.ops
                if any(i >= 0 and not self.is_constant(i) and self.tensors[i].type == "float32"
                       for i in list(op.inputs) + list(op.outputs))]

    def tensor_data(self, index: int) -> np.ndarray | None:
        """The constant data of tensor `index` as an array of its shape, or None."""
        info, raw = self.tensors[index], self._data(index)
        if raw is None or info.type not in ("float32", "int32"):
            return None
        data = np.frombuffer(np.asarray(raw, np.uint8).tobytes(), dtype=info.type)
        return data.reshape(info.shape) if data.size == np.prod(info.shape) else data


def _ints(values) -> list[int]:
    """An int vector of the object API (a numpy array, a list or None) as a list."""
    return [] if values is None else [int(v) for v in values]


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
