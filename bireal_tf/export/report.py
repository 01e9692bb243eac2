"""ExportReport: what `export_tflite` converted, checked and measured.

Every key of `to_dict()` is documented in docs/export_report_schema.md; a test
checks that the JSON carries exactly those keys. Bump SCHEMA_VERSION when a key
changes.
"""

import dataclasses
import json
from dataclasses import dataclass, field

__all__ = ["SCHEMA_VERSION", "BinaryConvCheck", "ExportReport", "HostLatency", "Int8Check",
           "LceAgreement", "ParityCheck", "SizeCheck"]

SCHEMA_VERSION = 5


@dataclass
class BinaryConvCheck:
    keras_binary_convs: int
    lce_bconv2d: int
    ok: bool
    float_layers: list[str] = field(default_factory=list)
    float_layer_ops: dict[str, str] = field(default_factory=dict)
    int8_convs: int = 0  # portable: CONV_2D ops with int8 +-1 kernels (0 for an LCE file)


@dataclass
class ParityCheck:
    inputs: str  # "sample_inputs" | "random_normal" | "random_normal_clearest"
    num_samples: int
    max_abs_diff: float
    max_abs_keras_output: float
    tolerance: float
    samples_within_tolerance: int
    sign_margin_threshold: float
    clear_samples: int
    clear_samples_within_tolerance: int
    min_sign_margin: float | None
    top1_agreement: float
    verdict: str  # "exact" | "sign_flips" | "inconclusive" | "mismatch" | "int8_top1"
    ok: bool


@dataclass
class SizeCheck:
    file_bytes: int
    floor_bytes: int
    ratio: float
    binary_params: int
    float_params: int
    batchnorm_params: int
    weight_bits: int  # bits per non-binary weight in the floor: 32, or 8 for an int8 model
    scale_params: int  # per-channel int8 scales in the floor (0 for a float model)
    binary_weight_bits: int = 1  # bits per binary weight in the floor: 1 (LCE), 8 (portable)
    float_twin_bytes: int | None = None  # portable: the same graph with float32 kernels
    float_twin_ratio: float | None = None  # file_bytes / float_twin_bytes


@dataclass
class Int8Check:
    fake_quant_layers: int
    int8_ops: int
    float_ops: dict[str, int]  # op name -> count of ops still reading or writing float32


@dataclass
class LceAgreement:
    """A portable file against the LCE file of the same model, on the parity inputs."""

    num_samples: int
    top1_agreement: float
    max_abs_diff: float
    lce_file_bytes: int


@dataclass
class HostLatency:
    machine: str
    processor: str
    cpu_count: int
    note: str
    warmup_runs: int
    timed_runs: int
    results: list[dict]  # [{"threads": int, "median": ms, "min": ms}]


@dataclass
class ExportReport:
    tflite_path: str
    source: str
    keras_precision: str  # the Keras model's dtype policy; a mixed one is exported as float32
    model_name: str
    input_shape: list[int]
    input_type: str
    output_shape: list[int]
    output_type: str
    converter: dict  # {"io_type", "lce_version", "tensorflow_version"}
    conversion_seconds: float
    op_histogram: dict[str, int]
    binary_convs: BinaryConvCheck
    parity: ParityCheck
    size: SizeCheck
    host_latency_ms: HostLatency | None
    int8: Int8Check | None = None
    warnings: list[str] = field(default_factory=list)
    target: str = "lce"  # "lce" (LCE custom ops) | "portable" (builtin ops, stock LiteRT)
    runtime: str = "lce"  # the interpreter of the parity check and latency: "lce" | "litert"
    lce_agreement: LceAgreement | None = None
    metadata_path: str | None = None  # labels + preprocessing for the predictor, or None
    predictor_path: str | None = None  # the predict.py copied beside the .tflite, or None
    schema_version: int = SCHEMA_VERSION

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self, indent: int = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent) + "\n"

    def format_table(self) -> str:
        """A human-readable summary for the CLI."""
        b, p, s, lat = self.binary_convs, self.parity, self.size, self.host_latency_ms
        rows = [("tflite", self.tflite_path), ("source", self.source)]
        if self.keras_precision != "float32":
            rows.append(("precision", f"{self.keras_precision} in Keras; converted and compared "
                                      "as its float32 twin (same weights)"))
        portable = self.target == "portable"
        converter = "TFLiteConverter + int8 +-1 kernels" if portable else "LCE"
        bconvs = (f"{b.int8_convs} int8 +-1 CONV_2D" if portable else f"{b.lce_bconv2d} LceBconv2d")
        rows += [
            ("target", "portable: builtin ops only, runs on stock LiteRT (ai-edge-litert)" if portable
             else "lce: LCE custom ops, needs LCE's interpreter"),
            ("input", f"{self.input_shape} {self.input_type}"),
            ("output", f"{self.output_shape} {self.output_type}"),
            ("conversion", f"{self.conversion_seconds:.1f} s  ({converter}, TF "
                           f"{self.converter['tensorflow_version']})"),
            ("ops", ", ".join(f"{name} {count}" for name, count in self.op_histogram.items())),
            ("binary convs", f"{bconvs} / {b.keras_binary_convs} Keras  "
                             + ("ok" if b.ok else "FLOAT CONVS: " + ", ".join(b.float_layers))),
            ("keras vs tflite", f"{p.verdict}: {p.samples_within_tolerance}/{p.num_samples} "
                                f"{p.inputs.replace('_', ' ')} inputs within {p.tolerance:.2g} (max|diff| "
                                f"{p.max_abs_diff:.3g}, max|out| {p.max_abs_keras_output:.3g}; clear "
                                f"of sign flips {p.clear_samples_within_tolerance}/{p.clear_samples}), "
                                f"top-1 agree {100 * p.top1_agreement:.1f}%"),
            ("size", f"{s.file_bytes / 1e6:.3f} MB, floor {s.floor_bytes / 1e6:.3f} MB "
                     f"(x{s.ratio:.4f}); {s.binary_params:,} binary + "
                     f"{s.float_params + s.batchnorm_params:,} {s.weight_bits}-bit params"
                     + (f" + {s.scale_params:,} scales" if s.scale_params else "")
                     + (f"; float twin {s.float_twin_bytes / 1e6:.3f} MB (x{s.float_twin_ratio:.3f})"
                        if s.float_twin_bytes else "")),
        ]
        if self.lce_agreement is not None:
            a = self.lce_agreement
            rows.append(("vs LCE file", f"top-1 agree {100 * a.top1_agreement:.1f}% on {a.num_samples} "
                                        f"inputs, max|diff| {a.max_abs_diff:.3g}; LCE file "
                                        f"{a.lce_file_bytes / 1e6:.3f} MB"))
        for key, path in (("metadata", self.metadata_path), ("predictor", self.predictor_path)):
            if path:
                rows.append((key, path))
        if self.int8 is not None:
            left = ", ".join(f"{k} {v}" for k, v in self.int8.float_ops.items()) or "none"
            rows.append(("int8", f"{self.int8.int8_ops} integer ops, float ops left: {left} "
                                 f"({self.int8.fake_quant_layers} fake-quant layers)"))
        if lat is None:
            rows.append(("host latency", "not measured (--no-benchmark)"))
        else:
            times = ", ".join(f"{r['threads']} thr {r['median']:.2f} ms" for r in lat.results)
            rows.append((f"host latency ({lat.machine})", f"{times}  (median of {lat.timed_runs}, "
                                                          "batch 1; host, NOT device latency)"))
        width = max(len(k) for k, _ in rows)
        lines = [f"{k:<{width}}  {v}" for k, v in rows]
        if lat is not None:
            lines.append(f"{'':<{width}}  note: {lat.note}")
        return "\n".join(lines + [f"WARNING: {w}" for w in self.warnings])
