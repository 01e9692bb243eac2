"""python -m benchmarks [--tiny] [--only SECTION ...] [--output-dir DIR]

Runs the sections (training, pipeline, export, memory), then writes
BENCHMARKS.md and results.json atomically (temp file + os.replace) after each
section, so an interrupted run leaves the last complete state.

Default outputs: BENCHMARKS.md at the repository root and benchmarks/results.json.
`--tiny` without `--output-dir` writes to a new temporary directory instead,
so a smoke run never replaces the real numbers. With `--only`, the other
sections of an existing results.json (from the same settings) are kept.
"""
import argparse
import json
import shlex
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from benchmarks import SECTIONS
from benchmarks.common import (
    REPO,
    Settings,
    Stopwatch,
    atomic_write_text,
    load_average,
    log,
    machine_info,
    now_iso,
    setup_environment,
)

SCHEMA_VERSION = 1
# The precision of the model the pipeline feeds in section 2 ("mixed_bfloat16" is the
# faster consumer, so the harder test for the pipeline).
FEED_PRECISION = "mixed_bfloat16"


def build_parser():
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="bireal_tf benchmarks: training throughput and levers, input pipeline, "
                    "LCE export, training memory. Writes BENCHMARKS.md and results.json.")
    parser.add_argument("--tiny", action="store_true",
                        help="toy sizes, 2 repeats, R18 only, fewer levers: every section in "
                             "< 2 min (CI smoke run); writes to a temp dir unless --output-dir")
    parser.add_argument("--only", action="append", choices=SECTIONS, metavar="SECTION",
                        help=f"run only this section (repeatable): {', '.join(SECTIONS)}")
    parser.add_argument("--output-dir", type=Path, default=None,
                        help="write DIR/BENCHMARKS.md and DIR/results.json (default: the "
                             "repository's BENCHMARKS.md and benchmarks/results.json)")
    return parser


def output_paths(output_dir, tiny):
    if output_dir is None and tiny:
        output_dir = Path(tempfile.mkdtemp(prefix="bireal_bench_tiny_"))
    if output_dir is None:
        return REPO / "BENCHMARKS.md", REPO / "benchmarks" / "results.json"
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    return output_dir / "BENCHMARKS.md", output_dir / "results.json"


def _previous(json_path: Path, settings_name: str) -> dict:
    """Sections of an earlier results.json taken with the same settings, else {}."""
    try:
        old = json.loads(json_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if old.get("schema_version") != SCHEMA_VERSION or old.get("settings") != settings_name:
        return {}
    return dict(old.get("sections", {}))


def main(argv=None):
    args = build_parser().parse_args(argv)
    setup_environment()
    import bireal_tf  # noqa: F401  (binds tf.keras to Keras 2 before anything else)
    from benchmarks import export as export_section
    from benchmarks import memory as memory_section
    from benchmarks import pipeline as pipeline_section
    from benchmarks import training as training_section
    from benchmarks.report import findings, render

    settings = Settings.tiny() if args.tiny else Settings.full()
    wanted = [s for s in SECTIONS if not args.only or s in args.only]
    md_path, json_path = output_paths(args.output_dir, args.tiny)
    command = shlex.join(["python", "-m", "benchmarks", *(sys.argv[1:] if argv is None else argv)])
    sections = _previous(json_path, settings.name) if args.only else {}
    total = Stopwatch()
    results = {
        "schema_version": SCHEMA_VERSION,
        "command": command,
        "date": now_iso(),
        "settings": settings.name,
        "machine": machine_info(),
        "ran": wanted,
        "sections": sections,
    }
    log(f"benchmarks ({settings.name}): {', '.join(wanted)} -> {md_path}, {json_path}")

    def write():
        results["seconds"] = round(total.seconds, 1)
        results["load_average_at_end"] = load_average()
        results["findings"] = findings(sections)
        atomic_write_text(json_path, json.dumps(results, indent=1, sort_keys=False) + "\n")
        atomic_write_text(md_path, render(results))

    background = None
    if "memory" in wanted and settings.memory_in_background:
        # Tiny runs only: the memory processes overlap the other sections (their
        # figures then mean little, but every code path runs in less time).
        pool = ThreadPoolExecutor(max_workers=1)
        background = (pool.submit(memory_section.run, settings),)
        pool.shutdown(wait=False)

    # The memory section runs first: after the other sections this process holds several
    # GiB (TensorFlow's caches, converted models) that its worker processes could not use.
    order = sorted(wanted, key=lambda name: name != "memory") if background is None else wanted
    for name in order:
        watch = Stopwatch()
        load_at_start = load_average()
        log(f"== {name} (load average {load_at_start})")
        if name == "memory" and background is not None:
            out = background[0].result()
            out["ran_in_background"] = True
        elif name == "training":
            out = training_section.run(settings, levers=True)
        elif name == "pipeline":
            out = pipeline_section.run(settings, training_results=sections.get("training"),
                                       feed=True, feed_precision=FEED_PRECISION)
        elif name == "export":
            out = export_section.run(settings)
        else:
            # `make bench` must finish in 20 minutes; the other sections are fixed in size,
            # so on a busy machine the memory jobs that would not end in time are skipped.
            out = memory_section.run(settings,
                                     deadline=time.monotonic() + settings.memory_budget_seconds)
        out["meta"] = {"date": now_iso(), "command": command, "settings": settings.name,
                       "seconds": round(out.pop("seconds", watch.seconds), 1),
                       "load_average_start": load_at_start, "load_average_end": load_average()}
        sections[name] = out
        log(f"== {name} done in {out['meta']['seconds']:.0f} s")
        write()
    log(f"done in {total.seconds / 60:.1f} min: {md_path} and {json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
