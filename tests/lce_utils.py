"""An oracle for tests: the op histogram of a .tflite, read with TensorFlow's own schema.

Independent of `bireal_tf.export.flatbuffer` (which reads LCE's copy of the schema
through its accessor API): this goes through TensorFlow's object API
(`tensorflow.lite.tools.flatbuffer_utils`), so a report can be checked against it.
"""
from collections import Counter

from tensorflow.lite.python import schema_py_generated as tf_schema
from tensorflow.lite.tools import flatbuffer_utils

_NAMES = {v: k for k, v in vars(tf_schema.BuiltinOperator).items() if k.isupper()}


def op_histogram(flatbuffer: bytes) -> Counter:
    model = flatbuffer_utils.convert_bytearray_to_object(bytearray(flatbuffer))
    names = [code.customCode.decode() if code.customCode
             else _NAMES[max(code.builtinCode, code.deprecatedBuiltinCode)]
             for code in model.operatorCodes]
    return Counter(names[op.opcodeIndex] for graph in model.subgraphs for op in graph.operators)
