"""Turning lm-eval's results JSON into a FusionBench report (no lm-eval import).

lm-eval writes ``<output_path>/<model name>/results_<timestamp>.json`` holding
``{"results": {task or group: {"<metric>,<filter>": value, "<metric>_stderr,<filter>": ...}}}``.
The report keeps every metric per task and adds ``score``: the metric named for the task (e.g.
``exact_match,strict-match`` for gsm8k), so a table can read one number per task.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Dict, Iterable, Mapping, Optional, Sequence, Set


def results_files(output_path: str | Path) -> Set[Path]:
    return set(Path(output_path).glob("**/results_*.json"))


def newest_results(output_path: str | Path, before: Iterable[Path] = ()) -> Path:
    """The results file written under ``output_path`` since ``before`` was listed."""
    new = results_files(output_path) - set(before)
    if not new:
        raise FileNotFoundError(f"lm-eval wrote no results_*.json under {output_path}")
    return max(new, key=lambda path: path.stat().st_mtime)


def report_from_results(results: Mapping, tasks: Sequence[str],
                        scores: Optional[Mapping[str, str]] = None) -> Dict[str, dict]:
    """``{task: {metric: value, ..., "score": the named metric}, "average": {"score": ...}}``;
    a task missing from the results, or a named metric it lacks, is a ``KeyError`` naming it."""
    scores = dict(scores or {})
    table = results.get("results", {})
    report: Dict[str, dict] = {}
    for task in tasks:
        if task not in table:
            raise KeyError(f"lm-eval reported no results for task {task!r} "
                           f"(it reported {sorted(table)})")
        metrics = {k: v for k, v in table[task].items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if task in scores:
            if scores[task] not in metrics:
                raise KeyError(f"task {task!r} has no metric {scores[task]!r}; it has "
                               f"{sorted(metrics)}")
            metrics["score"] = metrics[scores[task]]
        report[task] = metrics
    named = [report[t]["score"] for t in tasks if "score" in report[t]]
    report["average"] = {"score": sum(named) / len(named) if named else math.nan}
    return report


def read_report(path: str | Path, tasks: Sequence[str],
                scores: Optional[Mapping[str, str]] = None) -> Dict[str, dict]:
    return report_from_results(json.loads(Path(path).read_text()), tasks, scores)
