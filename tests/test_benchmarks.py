"""The benchmark harness: its timing helpers, and a tiny end-to-end run (`--tiny`)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import SECTIONS
from benchmarks.__main__ import _previous, build_parser
from benchmarks.common import atomic_write_text, round_robin, summarize
from benchmarks.report import findings

REPO = Path(__file__).resolve().parent.parent


def test_round_robin_alternates_and_drops_warmup():
    order = []
    cases = {name: (lambda name=name: order.append(name) or float(len(order))) for name in "AB"}
    out = round_robin(cases, repeats=3, warmup=1)
    assert order == list("ABABABAB")  # ABAB, not AAAABBBB
    assert out == {"A": [3.0, 5.0, 7.0], "B": [4.0, 6.0, 8.0]}  # warm-up round left out


def test_summarize_takes_the_median():
    s = summarize([5.0, 1.0, 3.0, 100.0, 2.0])
    assert s["median"] == 3.0 and s["min"] == 1.0 and s["max"] == 100.0 and s["n"] == 5


def test_atomic_write_replaces_without_leftovers(tmp_path):
    path = tmp_path / "out.md"
    atomic_write_text(path, "one")
    atomic_write_text(path, "two")
    assert path.read_text() == "two"
    assert [p.name for p in tmp_path.iterdir()] == ["out.md"]


def test_only_keeps_sections_of_the_same_settings(tmp_path):
    path = tmp_path / "results.json"
    path.write_text(json.dumps({"schema_version": 1, "settings": "full",
                                "sections": {"export": {"models": []}}}))
    assert _previous(path, "full") == {"export": {"models": []}}
    assert _previous(path, "tiny") == {}
    assert _previous(tmp_path / "missing.json", "full") == {}


def test_parser_flags():
    args = build_parser().parse_args(["--tiny", "--only", "export", "--only", "memory",
                                      "--output-dir", "x"])
    assert args.tiny and args.only == ["export", "memory"] and str(args.output_dir) == "x"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--only", "nonsense"])


def _positive(value):
    return isinstance(value, (int, float)) and value > 0


@pytest.mark.slow
def test_tiny_run_writes_well_formed_outputs(tmp_path):
    """`python -m benchmarks --tiny`: every section at toy sizes, outputs complete."""
    env = dict(os.environ, TF_USE_LEGACY_KERAS="1", TF_CPP_MIN_LOG_LEVEL="2",
               PYTHONPATH=os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p))
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "--tiny", "--output-dir", str(tmp_path)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]

    assert sorted(p.name for p in tmp_path.iterdir()) == ["BENCHMARKS.md", "results.json"]
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["settings"] == "tiny"
    assert set(results["sections"]) == set(SECTIONS)
    machine = results["machine"]
    assert machine["cpu_model"] and machine["usable_cpus"] >= 1
    assert "avx512_bf16" in machine["cpu_flags"] and machine["versions"]["tensorflow"]

    training = results["sections"]["training"]
    (headline,) = training["headline"]
    assert _positive(headline["ours"]) and _positive(headline["larq_zoo"]) and _positive(headline["ratio"])
    for group in training["groups"]:
        assert {"ours", "zoo"} <= set(group["cases"])
        for case in group["cases"].values():
            assert case["images_per_second"]["n"] >= 2
            assert all(_positive(v) for v in case["images_per_second"]["samples"])
    assert training["levers"] and all(_positive(lv["ratio"]) for lv in training["levers"])

    pipeline = results["sections"]["pipeline"]
    assert set(pipeline["pipeline_images_per_second"]) == {"adam", "paper"}
    assert all(_positive(s["median"]) for s in pipeline["pipeline_images_per_second"].values())
    assert all(_positive(h["headroom"]) for h in pipeline["headroom"])
    assert all(_positive(s["median"]) for s in pipeline["feeding"]["images_per_second"].values())

    (model,) = results["sections"]["export"]["models"]
    assert model["depth"] == 18 and model["all_binary"]
    assert _positive(model["tflite_bytes"]) and _positive(model["floor_bytes"])
    assert _positive(model["conversion_seconds"]) and _positive(model["float_tflite_bytes"])
    assert all(_positive(s["median"]) for s in model["latency_ms"].values())
    assert set(model["latency_ms"]) == {"lce_1t", "lce_2t", "float_1t", "float_2t"}

    runs = results["sections"]["memory"]["runs"]
    assert len(runs) == 2 and all("error" not in r for r in runs)
    assert all(_positive(r["peak_rss_mib"]) and _positive(r["baseline_rss_mib"]) for r in runs)

    assert results["findings"] == findings(results["sections"])
    md = (tmp_path / "BENCHMARKS.md").read_text()
    for needle in ("# Benchmarks", "python -m benchmarks --tiny", "avx512_bf16",
                   "## 1. Training throughput",
                   "| input | precision ours / zoo | ours (Bi-Real-18) | larq-zoo BiRealNet |",
                   "### Levers", "## 2. Input pipeline", "| augmentation | images/s",
                   "## 3. Export", "Host latency (x86-64)", "| network | LCE 1 thread",
                   "## 4. Training-step memory", "## Summary"):
        assert needle in md, needle


def test_memory_prediction_is_linear_in_the_batch():
    from benchmarks.memory import predict_peak

    rows = [{"depth": 50, "batch": 32, "peak_rss_mib": 5000.0, "baseline_rss_mib": 800.0},
            {"depth": 50, "batch": 64, "peak_rss_mib": 9000.0, "baseline_rss_mib": 800.0},
            {"depth": 18, "batch": 32, "peak_rss_mib": 2000.0, "baseline_rss_mib": 600.0},
            {"depth": 18, "batch": 64, "skipped": "too big"}]
    assert predict_peak(50, 128, rows) == 17000.0  # through the two measured points
    # One point: the baseline stays, the step memory grows with the batch (an overestimate).
    assert predict_peak(18, 128, rows) == 600.0 + 1400.0 * 4
    assert predict_peak(34, 128, rows) is None


def test_memory_job_time_estimate_separates_tracing_from_the_batch():
    from benchmarks.memory import _estimated_seconds

    # R18: 24 s at batch 32, 34 s at batch 128 (5 s setup each, 5 s of imports): the first
    # step is 19 s + 10 s per 96 images, so mostly tracing.
    rows = [{"depth": 18, "batch": 32, "setup_seconds": 5.0, "seconds": 24.0, "wall_seconds": 29.0},
            {"depth": 18, "batch": 128, "setup_seconds": 5.0, "seconds": 34.0, "wall_seconds": 39.0}]
    fixed = 19.0 - 10.0 / 96 * 32
    assert _estimated_seconds(18, 256, rows) == pytest.approx(5 + 5 + fixed + 10.0 / 96 * 256)
    # R50 batch 32 measured once: its step splits in R18's proportions.
    rows.append({"depth": 50, "batch": 32, "setup_seconds": 6.0, "seconds": 44.0, "wall_seconds": 50.0})
    grows = (10.0 / 96 * 32) / 19.0
    expected = 6 + 6 + 38.0 * ((1 - grows) + grows * 4)
    assert _estimated_seconds(50, 128, rows) == pytest.approx(expected)
    assert expected < 6 + 6 + 38.0 * 4  # less than scaling the whole step
    assert _estimated_seconds(34, 32, []) == 60.0
