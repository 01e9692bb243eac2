"""The benchmark harness: its timing helpers, its outputs, and a tiny end-to-end run (`--tiny`)."""
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import SECTIONS
from benchmarks.__main__ import _previous, build_parser, render, write_outputs
from benchmarks.common import CPU_FLAGS_OF_INTEREST, machine_info, round_robin, summarize

REPO = Path(__file__).resolve().parent.parent
BF16_FLAGS = {"avx512_bf16", "amx_bf16"}


def _proc_cpu_flags() -> set:
    """This CPU's flags, read here without the project's reader."""
    text = Path("/proc/cpuinfo").read_text()
    return set(next(line for line in text.splitlines() if line.startswith("flags")).split(":")[1].split())


def test_round_robin_alternates_and_drops_warmup():
    order = []
    cases = {name: (lambda name=name: order.append(name) or float(len(order))) for name in "AB"}
    out = round_robin(cases, repeats=3, warmup=1, log_each=False)
    assert order == list("ABABABAB")  # ABAB, not AAAABBBB
    assert out == {"A": [3.0, 5.0, 7.0], "B": [4.0, 6.0, 8.0]}  # warm-up round left out


def test_summarize_takes_the_median():
    s = summarize([5.0, 1.0, 3.0, 100.0, 2.0])
    assert s["median"] == 3.0 and s["min"] == 1.0 and s["max"] == 100.0 and s["n"] == 5


def test_recorded_results_render_to_the_committed_benchmarks_md():
    results = json.loads((REPO / "benchmarks" / "results.json").read_text())
    assert set(results["sections"]) == set(SECTIONS)
    assert render(results) == (REPO / "BENCHMARKS.md").read_text(), (
        "BENCHMARKS.md is not what results.json renders to: run `python -m benchmarks --render`")


def test_outputs_are_replaced_without_leftovers(tmp_path):
    results = json.loads((REPO / "benchmarks" / "results.json").read_text())
    md, js = tmp_path / "BENCHMARKS.md", tmp_path / "results.json"
    write_outputs(results, md, js)
    results["command"] = "python -m benchmarks --second-write"
    write_outputs(results, md, js)
    assert json.loads(js.read_text())["command"] == results["command"]
    assert "`python -m benchmarks --second-write`" in md.read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["BENCHMARKS.md", "results.json"]


def test_only_keeps_sections_of_the_same_schema_and_settings(tmp_path):
    path = tmp_path / "results.json"
    path.write_text(json.dumps({"schema_version": 2, "settings": "full",
                                "sections": {"export": {"models": []}}}))
    assert _previous(path, "full") == {"export": {"models": []}}
    assert _previous(path, "tiny") == {}
    assert _previous(tmp_path / "missing.json", "full") == {}
    path.write_text(json.dumps({"schema_version": 1, "settings": "full", "sections": {"export": {}}}))
    assert _previous(path, "full") == {}


def test_parser_flags():
    args = build_parser().parse_args(["--tiny", "--only", "export", "--only", "memory",
                                      "--output-dir", "x"])
    assert args.tiny and args.only == ["export", "memory"] and str(args.output_dir) == "x"
    assert build_parser().parse_args(["--render"]).render
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--only", "nonsense"])


@pytest.mark.skipif(not Path("/proc/cpuinfo").exists(), reason="needs Linux /proc/cpuinfo")
def test_machine_flags_match_an_independent_read_of_cpuinfo():
    flags = _proc_cpu_flags()
    machine = machine_info()
    assert machine["cpu_flags"] == [f for f in CPU_FLAGS_OF_INTEREST if f in flags]
    assert machine["bf16_cpu_flags"] == sorted(flags & BF16_FLAGS)


def test_machine_flags_from_a_known_flags_string():
    # A CPU with AVX2 and AMX-BF16 but no AVX-512: only those two of interest, one of them bf16.
    machine = machine_info(flags="fpu sse4_2 avx2 amx_bf16 amx_tile lm".split())
    assert machine["cpu_flags"] == ["avx2", "amx_tile", "amx_bf16"]
    assert machine["bf16_cpu_flags"] == ["amx_bf16"]
    assert machine_info(flags=["sse2"])["bf16_cpu_flags"] == []


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_memory_reads_the_peak_the_kernel_reports():
    from benchmarks.memory import _proc_mib

    # getrusage's ru_maxrss (KiB) is this process' VmHWM (pytest is larger than its parent).
    rss = _proc_mib("/proc/self/status", "VmRSS")
    peak = _proc_mib("/proc/self/status", "VmHWM")
    assert peak == pytest.approx(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, rel=0.02)
    assert 0 < rss <= peak
    assert _proc_mib("/proc/self/status", "NoSuchField") == 0.0


def _positive(value):
    return isinstance(value, (int, float)) and value > 0


@pytest.mark.slow
def test_tiny_run_writes_well_formed_outputs(tmp_path):
    """`python -m benchmarks --tiny`: every section at toy sizes, outputs complete and consistent."""
    env = dict(os.environ, TF_USE_LEGACY_KERAS="1", TF_CPP_MIN_LOG_LEVEL="2",
               PYTHONPATH=os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p))
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "--tiny", "--output-dir", str(tmp_path)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]

    assert sorted(p.name for p in tmp_path.iterdir()) == ["BENCHMARKS.md", "results.json"]
    results = json.loads((tmp_path / "results.json").read_text())
    md = (tmp_path / "BENCHMARKS.md").read_text()
    assert results["settings"] == "tiny"
    assert set(results["sections"]) == set(SECTIONS)
    machine = results["machine"]
    assert machine["usable_cpus"] >= 1 and machine["versions"]["tensorflow"]
    if Path("/proc/cpuinfo").exists():
        flags = _proc_cpu_flags()
        expected = [f for f in CPU_FLAGS_OF_INTEREST if f in flags]
        assert machine["cpu_flags"] == expected
        assert machine["bf16_cpu_flags"] == sorted(flags & BF16_FLAGS)
        assert f"- **CPU flags:** {', '.join(expected) or 'none of interest'}\n" in md
        assert f"- **bfloat16 instructions:** {', '.join(sorted(flags & BF16_FLAGS)) or 'none'}\n" in md

    training = results["sections"]["training"]
    (headline,) = training["headline"]
    assert _positive(headline["ours"]) and _positive(headline["larq_zoo"])
    assert headline["ratio"] == pytest.approx(headline["ours"] / headline["larq_zoo"], rel=1e-3)
    (group,) = training["groups"]
    assert set(group["cases"]) == {"ours", "zoo", "ours_bf16", "zoo_bf16", "ours_spe"}
    for case in group["cases"].values():
        assert case["images_per_second"]["n"] >= 2
        assert all(_positive(v) for v in case["images_per_second"]["samples"])
    assert group["cases"]["ours_spe"]["steps_per_repeat"] % 2 == 0  # whole executions of 2 steps
    assert group["cases"]["ours_bf16"]["config"]["precision"] == "mixed_bfloat16"
    assert [lv["lever"] for lv in training["levers"]] == [
        "mixed_bfloat16 (ours)", "mixed_bfloat16 (larq-zoo)", "steps_per_execution"]
    assert all(_positive(lv["ratio"]) for lv in training["levers"])

    epoch = results["sections"]["epoch"]
    assert [e["epoch"] for e in epoch["epochs"]] == [1, 2]
    for e in epoch["epochs"]:  # 128 / 32 train steps, 64 / 32 eval steps; ratio from its parts
        assert (e["train_steps"], e["eval_steps"]) == (4, 2)
        busy = e["train_steps"] * e["median_step_s"] + e["eval_steps"] * e["median_eval_step_s"]
        assert e["ratio"] == pytest.approx(e["wall_s"] / busy, rel=0.02) and e["ratio"] >= 1.0
    assert epoch["median_ratio_after_first"] == epoch["epochs"][1]["ratio"]

    pipeline = results["sections"]["pipeline"]
    assert set(pipeline["pipeline_images_per_second"]) == {"adam", "paper"}
    assert all(_positive(s["median"]) for s in pipeline["pipeline_images_per_second"].values())
    # The consumption is the training section's figure at the pipeline's size (64 in both).
    ours = group["cases"]["ours"]["images_per_second"]["median"]
    assert {(h["augmentation"], h["training_case"]) for h in pipeline["headroom"]} == {
        ("adam", "ours"), ("paper", "ours"), ("adam", "ours_bf16"), ("paper", "ours_bf16")}
    for h in pipeline["headroom"]:
        assert h["headroom"] == pytest.approx(h["pipeline"] / h["consumption"], rel=1e-2)
        if h["training_case"] == "ours":
            assert h["consumption"] == ours
    assert all(_positive(s["median"]) for s in pipeline["feeding"]["images_per_second"].values())
    assert pipeline["feeding"]["relative_to_in_memory"]["in_memory"] == 1.0

    (model,) = results["sections"]["export"]["models"]
    assert model["depth"] == 18 and model["all_binary"]
    assert model["lce_bconv2d"] == model["keras_binary_convs"] == 16  # Bi-Real-18's binary convs
    assert model["size_ratio"] == pytest.approx(model["tflite_bytes"] / model["floor_bytes"], rel=1e-3)
    assert _positive(model["conversion_seconds"]) and _positive(model["float_tflite_bytes"])
    assert model["float_tflite_bytes"] > 4 * model["tflite_bytes"]  # float32 weights vs 1 bit
    assert set(model["latency_ms"]) == {"lce_1t", "lce_2t", "float_1t", "float_2t"}
    assert all(_positive(s["median"]) for s in model["latency_ms"].values())

    (distill,) = results["sections"]["distill"]["groups"]
    assert set(distill["cases"]) == {"student", "student+twin", "student+resnet50"}
    assert all(_positive(c["images_per_second"]["median"]) for c in distill["cases"].values())
    assert set(distill["ratios"]) == {"twin", "resnet50"}
    for kind, r in distill["ratios"].items():  # a ratio of the two medians of the same rounds
        assert r["ratio"] == pytest.approx(
            distill["cases"][f"student+{kind}"]["images_per_second"]["median"]
            / distill["cases"]["student"]["images_per_second"]["median"], rel=1e-3)

    (portable,) = results["sections"]["portable"]["models"]
    assert portable["depth"] == 18 and portable["int8_binary_convs"] == 16
    assert not any(op.startswith("Lce") for op in portable["op_histogram"])
    assert portable["bytes"]["portable"] < portable["bytes"]["float"]
    assert portable["portable_over_float_size"] == pytest.approx(
        portable["bytes"]["portable"] / portable["bytes"]["float"], abs=1e-4)
    assert set(portable["latency_ms"]) == {f"{k}_{t}t" for k in ("portable", "lce", "float")
                                           for t in (1, 2)}
    assert all(_positive(s["median"]) for s in portable["latency_ms"].values())

    runs = results["sections"]["memory"]["runs"]
    assert [(r["depth"], r["batch"]) for r in runs] == [(18, 4), (18, 8)]
    for r in runs:
        assert "skipped" not in r
        assert 0 < r["baseline_rss_mib"] < r["peak_rss_mib"]
        assert r["step_peak_mib"] == pytest.approx(r["peak_rss_mib"] - r["baseline_rss_mib"], abs=0.2)

    for needle in ("# Benchmarks", "python -m benchmarks --tiny", "## Summary",
                   "## 1. Training throughput",
                   "| input | precision ours / zoo | ours (Bi-Real-18) | larq-zoo BiRealNet |",
                   "### Levers", "## 2. Time between steps", "| epoch | wall (s) |",
                   "## 3. Distillation",
                   "## 4. Input pipeline", "| augmentation | images/s",
                   "## 5. Export", "Host latency (x86-64)", "| network | LCE 1 thread",
                   "## 6. Portable export", "| network | threads | portable (LiteRT)",
                   "## 7. Training-step memory", "## Elsewhere",
                   "(benchmarks/rejected.md)"):
        assert needle in md, needle
    assert (f"ours {headline['ours']:.1f} vs larq-zoo {headline['larq_zoo']:.1f} images/s"
            in md.split("## 1.")[0])  # the headline is in the summary


def test_precision_study_reads_real_run_files_and_judges_the_spread(tmp_path):
    from benchmarks.precision_accuracy import compare, markdown, read_run, run_dir

    top1 = {("float32", 1): 0.870, ("float32", 2): 0.860, ("float32", 3): 0.880,
            ("bfloat16", 1): 0.875, ("bfloat16", 2): 0.872, ("bfloat16", 3): 0.866}
    for (precision, seed), value in top1.items():
        out = run_dir(tmp_path, precision, seed)
        out.mkdir(parents=True)
        policy = {"float32": None, "bfloat16": "mixed_bfloat16"}[precision]
        (out / "summary.json").write_text(json.dumps({"top1": value, "mixed_precision": policy}))
        (out / "metrics.csv").write_text("stage,epoch,loss,seconds\nbinary,1,1.0,300\nbinary,2,0.8,100\n"
                                         "binary,3,0.7,200\n")
    runs = {}
    for (precision, seed) in top1:
        found, t, seconds = read_run(run_dir(tmp_path, precision, seed))
        assert found == precision and seconds == 200  # median of 300, 100, 200
        runs[(precision, seed)] = (t, seconds)
    result = compare(runs, {"float32": [100.0, 120.0, 90.0], "bfloat16": [150.0, 150.0, 180.0]})
    assert result["float32"]["mean"] == pytest.approx(87.0)
    assert (result["float32"]["lo"], result["float32"]["hi"]) == (pytest.approx(86.0), pytest.approx(88.0))
    assert result["bfloat16"]["mean"] == pytest.approx(87.1)
    assert result["within_spread"]  # 87.1 lies in 86.0..88.0
    assert result["speedup"] == pytest.approx(150 / 100)
    assert result["speedup_range"] == (pytest.approx(1.25), pytest.approx(2.0))
    result["rounds"] = 3
    text = markdown(runs, result, epochs=2)
    assert "| 2 | 86.00 | 87.20 |" in text and "1.50x" in text and "is the training default" in text
    # one seed out of range moves the mean outside: the verdict flips
    runs[("bfloat16", 3)] = (60.0, 200)
    assert not compare(runs, {"float32": [1.0], "bfloat16": [1.0]})["within_spread"]
