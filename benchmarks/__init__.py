"""Benchmarks of bireal_tf: training throughput and its levers, the input pipeline,
LCE export (size, conversion time, host latency) and training-step memory.

    python -m benchmarks                 # everything, < 20 min on 2 cores; writes
                                         # BENCHMARKS.md and benchmarks/results.json
    python -m benchmarks --tiny          # every code path at toy sizes (< 2 min, CI)
    python -m benchmarks --only export   # one section (repeatable); the other sections
                                         # of an existing results.json are kept
    python -m benchmarks --output-dir D  # write D/BENCHMARKS.md and D/results.json

Method (every section): each figure is the median of at least `repeats` timed
repeats after a warm-up, and the sides of a comparison run alternately within
one process (ABAB..., round robin for more than two sides), so drift of a
shared machine hits every side alike.
"""

SECTIONS = ("training", "pipeline", "export", "memory")

__all__ = ["SECTIONS"]
