"""Comparison rows that take more than one ``fusion_bench`` run.

- **Tuned on validation** (``tuned:`` in ``config/compare/_methods.yaml``): a method's
  hyper-parameter (Task Arithmetic's / TIES's lambda) is swept over a grid on the benchmark's
  *validation* data (its ``validation:`` overrides switch the task pool to held-out data, never
  the test data), the value with the best average validation score is kept, and the method runs
  once more with it on the test data. The row records the chosen value; ``tuning.json`` the sweep.
- **Over the method's seeds** (``method_seeds:`` in a benchmark file): a method with randomness
  runs once per seed of its own; the row is the mean ± sample standard deviation (SyMerge reports
  seeds). Not to be confused with ``compare run --seeds`` (:mod:`.seeds`), which rebuilds an
  embedded track from other seeds.

Both sweeps are one Hydra multirun each (``fusion_bench -m``), every job in its own directory.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import yaml

from .runs import RunResult, run_fusion_bench, run_method, sweep_jobs
from .tables import (
    Row,
    experts_of_tasks,
    mean_or_none,
    measured_row,
    scores_from_report,
    seeded_row,
)


@dataclass
class VariantResult:
    """What one comparison entry produced: its row (or the failure) and the runs behind it."""

    method: str
    ok: bool
    row: Optional[Row] = None
    report: Optional[dict] = None
    """The test run's report (tuned) - what normalisation and diagnostics read."""
    log_dir: Optional[Path] = None
    failed: List[Path] = field(default_factory=list)
    """The directories whose ``fusion_bench.log`` says why it failed."""
    returncode: Optional[int] = None
    """The failed ``fusion_bench`` run's exit status."""
    seconds: float = float("nan")
    reused: bool = False
    """Not run: an earlier run of the same entry had finished (:mod:`.jobs`)."""
    error: Optional[str] = None
    """Why the launcher could not run the entry to its end (:mod:`.launchers`)."""
    engine_logs: Tuple[str, ...] = ()

    def failure_note(self, shown_dir: Optional[Path] = None) -> str:
        """How it failed and which log says why, for its row; ``shown_dir``: the path the reader
        knows ``log_dir`` by (default ``log_dir`` itself)."""
        if self.error is not None:
            where = ", ".join(self.engine_logs) or str(shown_dir or self.log_dir)
            return f"the launcher lost it ({self.error.splitlines()[0]}); logs: {where}"
        shown = Path(shown_dir or self.log_dir)
        failed = self.failed[0] if self.failed else self.log_dir
        log = shown / Path(failed).relative_to(self.log_dir) / "fusion_bench.log"
        if self.returncode in (None, 0):
            return f"no report written; log: {log}"
        return f"exit {self.returncode}; log: {log}"


def _multirun(overrides: Sequence[str], parameter: str, values: Sequence, run_dir: Path):
    """One ``fusion_bench -m`` over ``parameter=values``; {value as written: job directory}."""
    jobs = run_dir / "jobs"
    completed = run_fusion_bench(
        [*overrides, f"{parameter}={','.join(str(v) for v in values)}",
         f"hydra.sweep.dir={jobs}", "path.log_dir=${hydra:runtime.output_dir}"],
        run_dir, multirun=True)
    found = {}
    if jobs.is_dir():
        for job in sweep_jobs(jobs):
            settings = dict(o.split("=", 1) for o in
                            yaml.safe_load((job / "overrides.yaml").read_text()) or [] if "=" in o)
            found[settings[parameter]] = job
    return completed.returncode, found


def _read(job: Path, name: str) -> Optional[dict]:
    path = job / name
    return json.loads(path.read_text()) if path.is_file() else None


def run_tuned(name: str, spec: dict, log_dir: Path, metric: str = "accuracy") -> VariantResult:
    tuned = spec["tuned"][name]
    validation = spec.get("validation")
    if not validation:
        raise ValueError(f"{name}: benchmark {spec['name']!r} has no validation data "
                         "(a `validation:` list of overrides in its config/compare file)")
    base = [*spec["overrides"], *spec["methods"][tuned["method"]]]
    parameter, grid = tuned["parameter"], list(tuned["grid"])
    code, jobs = _multirun([*base, *validation], parameter, grid, log_dir / "validation")
    averages: Dict[str, Optional[float]] = {}
    for value in grid:
        job = jobs.get(str(value))
        report = _read(job, "program_report.json") if job else None
        scores = scores_from_report(tuned["method"], report or {}, spec["tasks"], metric)
        averages[str(value)] = mean_or_none(list(scores.values()))
    scored = [v for v in grid if averages[str(v)] is not None]
    record = {"method": tuned["method"], "parameter": parameter, "grid": grid, "metric": metric,
              "validation_overrides": list(validation),
              "validation_average": averages, "chosen": None}
    if code != 0 or len(scored) < len(grid):
        (log_dir / "tuning.json").write_text(json.dumps(record, indent=1))
        return VariantResult(name, ok=False, log_dir=log_dir, failed=[log_dir / "validation"],
                             returncode=code)
    best = max(scored, key=lambda v: averages[str(v)])  # the first of equal bests, in grid order
    record["chosen"] = best
    (log_dir / "tuning.json").write_text(json.dumps(record, indent=1))
    result = run_method(name, [*base, f"{parameter}={best}"], log_dir)
    if not result.ok:
        return VariantResult(name, ok=False, log_dir=log_dir, failed=[log_dir],
                             returncode=result.returncode)
    setting = f"{parameter}={best}, tuned on validation"
    row = measured_row(name, result.report, result.merge_stats, spec["tasks"], metric, setting)
    return VariantResult(name, ok=True, row=row, report=result.report, log_dir=log_dir)


def run_seeded(name: str, spec: dict, log_dir: Path, metric: str = "accuracy") -> VariantResult:
    seeds = spec["method_seeds"][name]
    parameter, values = seeds["parameter"], list(seeds["values"])
    code, jobs = _multirun([*spec["overrides"], *spec["methods"][name]], parameter, values,
                           log_dir)
    missing = [v for v in values if str(v) not in jobs]
    if code != 0 or missing:
        return VariantResult(name, ok=False, log_dir=log_dir, failed=[log_dir], returncode=code)
    return VariantResult(name, ok=True, log_dir=log_dir,
                         row=seeded_from_jobs(name, [jobs[str(v)] for v in values], spec["tasks"],
                                              metric, f"mean ± std over {parameter}="
                                              + ",".join(map(str, values))))


def seeded_from_jobs(name: str, jobs: Sequence[Path], tasks: Sequence[str], metric: str,
                     setting: str) -> Row:
    reports = [_read(job, "program_report.json") for job in jobs]
    return seeded_row(name, reports, [_read(job, "merge_stats.json") for job in jobs], tasks,
                      metric, setting)


def run_entry(name: str, spec: dict, log_dir: Path, metric: str = "accuracy") -> VariantResult:
    """One comparison entry: tuned, over seeds, or a single run of the method."""
    if name in spec.get("tuned", {}):
        return run_tuned(name, spec, log_dir, metric)
    if name in spec.get("method_seeds", {}):
        return run_seeded(name, spec, log_dir, metric)
    result: RunResult = run_method(name, [*spec["overrides"], *spec["methods"][name]], log_dir)
    if not result.ok:
        return VariantResult(name, ok=False, log_dir=log_dir, failed=[log_dir],
                             returncode=result.returncode)
    row = measured_row(name, result.report, result.merge_stats, spec["tasks"], metric,
                       expert_of=experts_of_tasks(spec))
    return VariantResult(name, ok=True, row=row, report=result.report, log_dir=log_dir)
