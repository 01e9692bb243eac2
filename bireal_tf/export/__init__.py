"""Export Bi-Real Nets to TFLite through Larq Compute Engine, verified.

    from bireal_tf.export import export_tflite
    report = export_tflite(model_or_path, "model.tflite")
    print(report.format_table())

or `python -m bireal_tf.export MODEL -o model.tflite --report report.json`
(`--portable` / `target="portable"`: builtin ops only, for stock LiteRT).
The report (keys in docs/export_report_schema.md) holds the op histogram, the
binary conv check, Keras-vs-.tflite parity, the size beside its floor and the
host latency (not device latency).

export/ converts, checks and reports; what it converts is built on the model side
(`bireal_tf.models`, including `int8_model` for int8 files).
"""

from bireal_tf.export.checks import ParitySettings, lce_zero_padding_hazards, sign_margins
from bireal_tf.export.convert import TARGETS, ExportWarning, LatencySettings, export_tflite, float32_twin
from bireal_tf.export.files import ExportError, ModelFileError, load_keras_model, read_flatbuffer_file
from bireal_tf.export.flatbuffer import LCE_OPS, op_histogram
from bireal_tf.export.report import SCHEMA_VERSION, ExportReport
from bireal_tf.export.runtime import HOST_LATENCY_NOTE, LiteRTRunner, TFLiteRunner, measure_latency
from bireal_tf.export.size import int8_size_floor, size_floor

__all__ = [
    "HOST_LATENCY_NOTE", "LCE_OPS", "SCHEMA_VERSION", "TARGETS", "ExportError", "ExportReport",
    "ExportWarning", "LatencySettings", "LiteRTRunner", "ModelFileError", "ParitySettings",
    "TFLiteRunner",
    "export_tflite", "float32_twin", "int8_size_floor", "lce_zero_padding_hazards",
    "load_keras_model", "measure_latency", "op_histogram", "read_flatbuffer_file",
    "sign_margins", "size_floor",
]
