"""ExportReport: what `export_tflite` converted, checked and measured.

Every key of `to_dict()` is documented in docs/export_report_schema.md; a test
checks that the JSON carries exactly those keys. Bump SCHEMA_VERSION when a key
changes.
"""

import dataclasses
import json
from dataclasses import dataclass, field

__all__ = [
    "SCHEMA_VERSION",
    "BinaryConvCheck",
    "ConverterOptions",
    "ExportReport",
    "HostLatency",
    "ParityCheck",
    "SizeCheck",
]

SCHEMA_VERSION = 2
_INPUT_WORDS = {
    "random_normal": "random normal inputs",
    "random_normal_clearest": "random normal inputs (clearest of a pool)",
    "sample_inputs": "sample inputs",
}


@dataclass
class ConverterOptions:
    inference_input_type: str
    inference_output_type: str
    target: str
    experimental_default_int8_range: list[float] | None
    lce_version: str
    tensorflow_version: str


@dataclass
class BinaryConvCheck:
    keras_binary_convs: int
    lce_bconv2d: int
    ok: bool
    float_layers: list[str] = field(default_factory=list)
    float_layer_ops: dict[str, str] = field(default_factory=dict)


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
    verdict: str  # "exact" | "sign_flips" | "inconclusive" | "mismatch" | "not_enforced"
    ok: bool
    enforced: bool


@dataclass
class SizeCheck:
    file_bytes: int
    floor_bytes: int
    ratio: float
    binary_params: int
    float_params: int
    batchnorm_params: int


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
    converter: ConverterOptions
    conversion_seconds: float
    op_histogram: dict[str, int]
    binary_convs: BinaryConvCheck
    parity: ParityCheck
    size: SizeCheck
    host_latency_ms: HostLatency | None
    warnings: list[str] = field(default_factory=list)
    schema_version: int = SCHEMA_VERSION

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self, indent: int = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, sort_keys=False) + "\n"

    @property
    def ok(self) -> bool:
        """True when every binary conv is binary and the outputs agree, with no warning."""
        return self.binary_convs.ok and self.parity.verdict in ("exact", "not_enforced") and not self.warnings

    def format_table(self) -> str:
        """A human-readable summary for the CLI."""
        rows = []

        def add(key, value):
            rows.append((key, value))

        add("tflite", self.tflite_path)
        add("source", self.source)
        if self.keras_precision != "float32":
            add("precision", f"{self.keras_precision} in Keras; converted and compared as its "
                             "float32 twin (same weights)")
        add("input", f"{self.input_shape} {self.input_type}")
        add("output", f"{self.output_shape} {self.output_type}")
        add("conversion", f"{self.conversion_seconds:.1f} s  (LCE {self.converter.lce_version}, "
                          f"target {self.converter.target})")
        ops = ", ".join(f"{name} {count}" for name, count in
                        sorted(self.op_histogram.items(), key=lambda kv: (-kv[1], kv[0])))
        add("ops", ops)
        b = self.binary_convs
        verdict = "ok" if b.ok else "FLOAT CONVS: " + ", ".join(b.float_layers)
        add("binary convs", f"{b.lce_bconv2d} LceBconv2d / {b.keras_binary_convs} Keras  {verdict}")
        p = self.parity
        add("keras vs tflite", f"{p.verdict}: {p.samples_within_tolerance}/{p.num_samples} "
                               f"{_INPUT_WORDS.get(p.inputs, p.inputs)} within {p.tolerance:.2g} "
                               f"(max|diff| {p.max_abs_diff:.3g}, max|out| {p.max_abs_keras_output:.3g}; "
                               f"clear of sign flips {p.clear_samples_within_tolerance}/"
                               f"{p.clear_samples}), top-1 agree {100 * p.top1_agreement:.1f}%")
        s = self.size
        add("size", f"{s.file_bytes / 1e6:.3f} MB, floor {s.floor_bytes / 1e6:.3f} MB "
                    f"(x{s.ratio:.2f}); {s.binary_params:,} binary + "
                    f"{s.float_params + s.batchnorm_params:,} float params")
        lat = self.host_latency_ms
        if lat is None:
            add("host latency", "not measured (--no-benchmark)")
        else:
            times = ", ".join(f"{r['threads']} thr {r['median']:.2f} ms" for r in lat.results)
            add(f"host latency ({lat.machine})", f"{times}  (median of {lat.timed_runs}, batch 1; "
                                                 "host, NOT device latency)")
        width = max(len(k) for k, _ in rows)
        lines = [f"{k:<{width}}  {v}" for k, v in rows]
        if lat is not None:
            lines.append(f"{'':<{width}}  note: {lat.note}")
        for w in self.warnings:
            lines.append(f"WARNING: {w}")
        return "\n".join(lines)
