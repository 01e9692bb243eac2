"""Benchmarks of bireal_tf: training throughput and its live levers, the time between steps,
the cost of a teacher (distillation), the input pipeline,
LCE export (size, conversion time, host latency) and training-step memory.

    python -m benchmarks                 # everything (make bench); writes BENCHMARKS.md
                                         # and benchmarks/results.json
    python -m benchmarks --tiny          # every code path at toy sizes (CI smoke run)
    python -m benchmarks --only export   # one section (repeatable); the other sections
                                         # of an existing results.json are kept
    python -m benchmarks --render        # rewrite BENCHMARKS.md from results.json

Method (every section): each figure is the median of the timed repeats after a
warm-up, and the sides of a comparison run alternately within one process
(round robin), so the drift of a shared machine hits every side alike.
"""
import importlib

# The sections, in the order of BENCHMARKS.md. A section is a module benchmarks/<name>.py with
#   TITLE                            its heading;
#   run(settings, sections) -> dict  its measurements (JSON-able); `sections` holds the
#                                    results of the sections measured before it;
#   markdown(result) -> str          its part of BENCHMARKS.md, under the heading;
#   findings(result) -> list[str]    its lines of the summary.
# A new section is its module, its name here and its sizes in common.Settings.
SECTIONS = ("training", "epoch", "distill", "pipeline", "export", "portable", "memory")


def section(name: str):
    return importlib.import_module(f"benchmarks.{name}")


__all__ = ["SECTIONS", "section"]
