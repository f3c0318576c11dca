"""The comparison runner: one command per table.

``python -m fusion_bench_ace.compare run <benchmark>`` runs every method of the benchmark through
``fusion_bench`` (FusionBench's Task Arithmetic, TIES, TSV-M beside ours), collects the reports
and writes the table (:mod:`.runner`); ``sweep`` does the same for a grid of one method's
settings. Benchmarks are defined in ``config/compare/<name>.yaml`` (:mod:`.benchmarks`); one
``fusion_bench`` run per method (:mod:`.runs`), tuned and seeded entries (:mod:`.variants`);
each entry a resumable job (:mod:`.jobs`) run through a launcher (:mod:`.launchers`); tables and
plots (:mod:`.tables`); ACE's per-layer diagnostics (:mod:`.diagnostics`).
"""

from .benchmarks import (
    PAPER_NUMBERS,
    available_benchmarks,
    compare_config_dir,
    load_benchmark,
    paper_rows,
    resolve_methods,
)
from .runner import new_run_dir, point_latest, run_comparison, run_sweep, summarize_sweep

__all__ = [
    "PAPER_NUMBERS",
    "available_benchmarks",
    "compare_config_dir",
    "load_benchmark",
    "new_run_dir",
    "point_latest",
    "paper_rows",
    "resolve_methods",
    "run_comparison",
    "run_sweep",
    "summarize_sweep",
]
