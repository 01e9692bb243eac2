"""The TFLite schema, read through one module: the copy LiteRT (`ai_edge_litert`) ships.

LiteRT's generated reader (`schema_py_generated`) and TFLite's `flatbuffer_utils`
come without TensorFlow, so the same copy serves the exporter and the TF-free
predictor (`predict.py`, copied beside a model, imports it itself for the file
identifier). Every other module of bireal_tf that reads or writes a flatbuffer goes
through here.

A file is read into the schema's object API (`ModelT`: plain Python objects, the
constant buffers as numpy views), which the portable lowering also edits and
writes back. Op and type names are the library's: builtin ops by the
`BuiltinOperator` name (`CONV_2D`, `ADD`, ...), custom ops by their code
(`LceBconv2d`, `LceQuantize`), tensor types as numpy dtype names (`float32`, `int8`).
"""

from ai_edge_litert import schema_py_generated as schema
from ai_edge_litert.tools import flatbuffer_utils

__all__ = ["BuiltinOperator", "TensorType", "builtin_code", "has_tflite_identifier", "is_custom",
           "op_name", "read_model", "schema", "text", "type_name", "write_model"]

BuiltinOperator = schema.BuiltinOperator
TensorType = schema.TensorType


def has_tflite_identifier(data: bytes) -> bool:
    """Whether `data` carries TFLite's file identifier ('TFL3' at bytes 4-8)."""
    return len(data) >= 8 and bool(schema.Model.ModelBufferHasIdentifier(bytes(data[:8]), 0))


def read_model(flatbuffer: bytes) -> "schema.ModelT":
    """The flatbuffer as the schema's object API. Trusts its offsets: a hostile file must
    pass `bireal_tf.export.safety.verify_flatbuffer` first."""
    return flatbuffer_utils.convert_bytearray_to_object(bytes(flatbuffer))


def write_model(model: "schema.ModelT") -> bytes:
    """The flatbuffer of an object-API model, with the 'TFL3' identifier."""
    return bytes(flatbuffer_utils.convert_object_to_bytearray(model))


def builtin_code(code) -> int:
    """The builtin operator of an operator code (either of its two fields, whichever is set)."""
    return flatbuffer_utils.get_builtin_code_from_operator_code(code)


def is_custom(code) -> bool:
    """Whether an operator code names a custom op (LCE's ops are custom ops)."""
    return builtin_code(code) == BuiltinOperator.CUSTOM


def op_name(model, index: int) -> str:
    """The name of operator code `index` of `model`: a builtin op's enum name, a custom op's code.

    An operator code newer than this schema is `BUILTIN_<number>`.
    """
    code = model.operatorCodes[index]
    if is_custom(code):
        return text(code.customCode) or "CUSTOM"
    return flatbuffer_utils.opcode_to_name(model, index) or f"BUILTIN_{builtin_code(code)}"


def type_name(tensor_type: int) -> str:
    """A tensor type as the numpy dtype name (`float32`, `int8`, ...); unknown: its number."""
    try:
        return flatbuffer_utils.type_to_name(tensor_type).lower()
    except KeyError:
        return str(tensor_type)


def text(value) -> str:
    """A flatbuffer string of the object API (bytes, or None) as str."""
    return value.decode(errors="replace") if isinstance(value, bytes) else (value or "")
