"""Op histogram of a TFLite flatbuffer, for tests that check what LCE made binary."""
from collections import Counter

from larq_compute_engine.mlir.python import tflite_schema as schema

_BUILTIN_NAMES = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}


def op_histogram(flatbuffer: bytes) -> Counter:
    model = schema.Model.GetRootAsModel(flatbuffer, 0)
    codes = []
    for i in range(model.OperatorCodesLength()):
        code = model.OperatorCodes(i)
        custom = code.CustomCode()
        if custom:
            codes.append(custom.decode())
        else:
            builtin = max(code.BuiltinCode(), code.DeprecatedBuiltinCode())
            codes.append(_BUILTIN_NAMES.get(builtin, str(builtin)))
    counts = Counter()
    for s in range(model.SubgraphsLength()):
        graph = model.Subgraphs(s)
        for o in range(graph.OperatorsLength()):
            counts[codes[graph.Operators(o).OpcodeIndex()]] += 1
    return counts
