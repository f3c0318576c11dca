"""The comparison runner: ``run_comparison`` (one table of methods) and ``run_sweep`` (a grid).

Each run writes ``table.md``, ``table.csv``, ``bars.png`` and ``provenance.json`` into a new
timestamped directory under the output directory, then points ``latest`` at it; an ACE run's
diagnostics (γ per layer, spectra) are plotted into ``diagnostics/<method>/``. A sweep writes a
table and a heatmap of a grid of one method's settings.

Every method (every grid point) is one job: a ``fusion_bench`` run in its own directory under
``<out>/jobs/`` (linked from the table's ``runs/<method>``), run through a launcher
(:mod:`.launchers`: here one after another or in parallel, SLURM, Ray). The same command run
again reuses the jobs whose report exists (``rerun=True`` runs them again), and a job that fails
becomes a row saying so and where its log is, beside the other rows.
"""

from __future__ import annotations

import datetime as _dt
import itertools
import json
import os
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence

import yaml

from .. import provenance
from .benchmarks import (
    load_benchmark,
    paper_rows,
    resolve_methods,
    track_change_warning,
    track_manifest,
)
from .diagnostics import write_diagnostics
from .jobs import run_entries
from .launchers import Launcher, load_launcher
from .runs import log_tail, sweep_jobs
from .tables import (
    INDIVIDUAL,
    NORMALISED,
    RAW,
    Row,
    bar_plot,
    csv_table,
    experts_of_tasks,
    failed_row,
    heatmap,
    markdown_table,
    measured_row,
    normalised_row,
    reference_scores,
)
from .variants import VariantResult

# --- output directories ---------------------------------------------------------------------------


def new_run_dir(out: Path) -> Path:
    """A fresh timestamped directory under ``out`` (never an existing one)."""
    out.mkdir(parents=True, exist_ok=True)
    stamp = _dt.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    for suffix in itertools.chain([""], (f"_{i}" for i in itertools.count(1))):
        candidate = out / f"{stamp}{suffix}"
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            continue
    raise AssertionError("unreachable")


def point_latest(out: Path, run_dir: Path) -> None:
    """Atomically repoint ``out/latest`` (a relative symlink) at ``run_dir``."""
    link, tmp = out / "latest", out / f".latest-{os.getpid()}"
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    tmp.symlink_to(run_dir.name)
    os.replace(tmp, link)


# --- the two commands -----------------------------------------------------------------------------


def run_comparison(
    benchmark: str, methods: Optional[Sequence[str]], out: Path, argv: Sequence[str],
    *, launcher: Optional[Launcher] = None, rerun: bool = False, jobs_root: Optional[Path] = None,
    log=print,
) -> Path:
    """One table of ``methods`` (default: the benchmark's) under ``out``; ``jobs_root``: where the
    jobs' directories are kept (default ``out/jobs``)."""
    spec = load_benchmark(benchmark)
    names = resolve_methods(spec, methods)
    _prepare(spec, log)
    warning = track_change_warning(spec, out / "latest" / "provenance.json")
    if warning:
        log(warning)
    launcher = launcher or load_launcher("local")
    run_dir = new_run_dir(out)
    log(f"[compare] {benchmark}: {len(names)} methods -> {run_dir}")
    results = run_entries(
        names, spec, jobs_root or out / "jobs", launcher=launcher,
        fingerprint=_fingerprint(spec), rerun=rerun, engine_folder=run_dir / "launcher", log=log,
    )
    rows, failures, individual = [], [], None
    for name, result in zip(names, results):
        _link(run_dir / "runs" / name, result.log_dir)
        if result.ok:
            rows.append(result.row)
            if name == INDIVIDUAL:
                individual = result.report
            diagnostics = result.log_dir / "ace_diagnostics.json"
            if diagnostics.is_file():  # gamma per layer and spectra of the ACE run
                write_diagnostics(diagnostics, run_dir / "diagnostics" / name,
                                  f"{benchmark}: {name} diagnostics")
        else:
            failures.append(result)
            rows.append(failed_row(name, spec["tasks"], result.failure_note(Path("runs") / name)))
            for directory in result.failed:
                log(log_tail(directory))
            if result.error:
                log(result.error)
    rows += normalised_rows(spec, rows, individual, log)
    rows += paper_rows(spec)
    _write_tables(run_dir, spec, rows, argv, failures, launcher=launcher, results=results)
    point_latest(out, run_dir)
    log(markdown_table(rows, spec["tasks"]))
    if failures:
        raise RuntimeError(f"{len(failures)} method(s) failed: {[f.method for f in failures]}; "
                           f"see their rows in {run_dir}/table.md")
    return run_dir


def normalised_rows(spec: dict, rows: List[Row], individual: Optional[dict], log=print
                    ) -> List[Row]:
    """With ``normalize: individual`` (or ``{individual: {task: expert}}``, ACE Table 9 style),
    every measured row again as percent of the reference expert's score on each task."""
    how = spec.get("normalize")
    if not how:
        return []
    expert_of = experts_of_tasks(spec)
    if individual is None:
        log("[compare] normalised scores need the `individual` run; not computed")
        return []
    reference = reference_scores(individual, spec["tasks"], spec.get("metric", "accuracy"),
                                 expert_of)
    return [normalised_row(row, reference, spec["tasks"]) for row in rows
            if row.source == "measured" and row.scale == RAW]


def run_sweep(
    benchmark: str, grid: Dict[str, List[str]], out: Path, argv: Sequence[str], *,
    launcher: Optional[Launcher] = None, rerun: bool = False, validation: bool = False, log=print,
) -> Path:
    """One method (the benchmark's ``sweep.method``) at every point of ``grid`` (default: the
    benchmark's ``sweep.grid``), each point a job; table and heatmap under ``out``. With
    ``validation``, on the benchmark's validation data (its ``validation:`` overrides) instead of
    its test data."""
    spec = load_benchmark(benchmark)
    sweep = spec.get("sweep") or {}
    method = sweep.get("method")
    if method is None:
        raise ValueError(f"benchmark {benchmark!r} defines no sweep method")
    split = []
    if validation:
        split = list(spec.get("validation") or [])
        if not split:
            raise ValueError(f"benchmark {benchmark!r} has no validation data "
                             "(a `validation:` list of overrides in its config/compare file)")
    grid = grid or {k: [str(v) for v in vals] for k, vals in sweep["grid"].items()}
    _prepare(spec, log)
    launcher = launcher or load_launcher("local")
    run_dir = new_run_dir(out)
    params = list(grid)
    points = list(itertools.product(*(grid[p] for p in params)))
    data = "validation" if validation else "test"
    log(f"[compare] sweep of {method} on {benchmark} ({data} data): {len(points)} jobs "
        f"-> {run_dir}")
    labels = [", ".join(f"{p}={v}" for p, v in zip(params, point)) for point in points]
    # every grid point an entry of its own, as a comparison's methods are
    points_spec = {
        **spec, "overrides": [*spec["overrides"], *split], "tuned": {}, "method_seeds": {},
        "methods": {label: [f"method={method}", *(f"{p}={v}" for p, v in zip(params, point))]
                    for label, point in zip(labels, points)},
    }
    results = run_entries(
        labels, points_spec, out / "jobs", launcher=launcher, fingerprint=_fingerprint(spec),
        rerun=rerun, engine_folder=run_dir / "launcher", log=log,
    )
    rows, failures = [], []
    for index, (label, result) in enumerate(zip(labels, results)):
        _link(run_dir / "jobs" / str(index), result.log_dir)
        if result.ok:
            rows.append(result.row)
        else:
            failures.append(result)
            rows.append(failed_row(label, spec["tasks"],
                                   result.failure_note(Path("jobs") / str(index))))
    _sweep_tables(spec, params, points, rows, run_dir, argv, failures, launcher=launcher,
                  results=results,
                  title_suffix=" (sweep, validation data)" if validation else " (sweep)")
    point_latest(out, run_dir)
    log((run_dir / "table.md").read_text())
    if failures:
        raise RuntimeError(f"{len(failures)} of {len(points)} sweep jobs failed; see their rows "
                           f"in {run_dir}/table.md")
    return run_dir


def summarize_sweep(
    jobs_dir: Path, spec: dict, params: Sequence[str], run_dir: Path, argv: Sequence[str],
    title_suffix: str = " (sweep)",
) -> None:
    """Table and heatmap of a Hydra multirun you ran yourself: one row per finished job."""
    tasks = spec["tasks"]
    rows, points = [], []
    for job in sweep_jobs(jobs_dir):
        overrides = yaml.safe_load((job / "overrides.yaml").read_text()) or []
        settings = dict(o.split("=", 1) for o in overrides if "=" in o)
        point = tuple(settings.get(p) for p in params)
        report = json.loads((job / "program_report.json").read_text())
        stats_path = job / "merge_stats.json"
        stats = json.loads(stats_path.read_text()) if stats_path.is_file() else None
        row = measured_row(
            ", ".join(f"{p}={v}" for p, v in zip(params, point)), report, stats, tasks,
            spec.get("metric", "accuracy"),
        )
        rows.append(row)
        points.append(point)
    if not rows:
        raise RuntimeError(f"no finished jobs under {jobs_dir}")
    _sweep_tables(spec, params, points, rows, run_dir, argv, [], title_suffix=title_suffix)


def _sweep_tables(spec, params, points, rows, run_dir, argv, failures, title_suffix=" (sweep)",
                  **provenance_of_jobs):
    """The sweep's table, and a heatmap of the average over the first two swept parameters (one
    panel per value of the others)."""
    _write_tables(run_dir, spec, rows, argv, failures, title_suffix=title_suffix,
                  **provenance_of_jobs)
    swept = [i for i, p in enumerate(params) if len({v[i] for v in points}) > 1]
    if len(swept) >= 2:
        xi, yi = swept[0], swept[1]
        x_values = _ordered({v[xi] for v in points})
        y_values = _ordered({v[yi] for v in points})
        panels: Dict[str, Dict[tuple, float]] = {}
        for point, row in zip(points, rows):
            rest = ", ".join(
                f"{params[i]}={point[i]}" for i in range(len(params)) if i not in (xi, yi)
            )
            panels.setdefault(rest, {})[(point[xi], point[yi])] = row.average
        heatmap(
            {},
            params[xi],
            x_values,
            params[yi],
            y_values,
            run_dir / "heatmap.png",
            f"{spec['name']}{title_suffix}: average accuracy",
            panels=panels,
        )


def _ordered(values: Iterable[str]) -> List[str]:
    def key(v):
        try:
            return (0, float(v))
        except (TypeError, ValueError):
            return (1, str(v))

    return sorted(values, key=key)


def _prepare(spec: dict, log) -> None:
    if spec.get("track"):
        from ..mini import build

        build([spec["track"]])


def _fingerprint(spec: dict) -> Optional[str]:
    """What, beyond a job's overrides, decides its result: the embedded track's content."""
    manifest = track_manifest(spec)
    return None if manifest is None else manifest.get("content_hash")


def _link(link: Path, target: Path) -> None:
    """``link`` -> ``target`` as a relative symlink (the run directory can move with ``out``)."""
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(os.path.relpath(target, link.parent), target_is_directory=True)


def _write_tables(
    run_dir: Path,
    spec: dict,
    rows: List[Row],
    argv: Sequence[str],
    failures: List[VariantResult],
    title_suffix: str = "",
    launcher: Optional[Launcher] = None,
    results: Sequence[VariantResult] = (),
) -> None:
    tasks = spec["tasks"]
    info = {
        **provenance.collect(" ".join(["python -m fusion_bench_ace.compare", *argv])),
        "benchmark": spec,
        "track_manifest": track_manifest(spec),
        "launcher": launcher.config if launcher is not None else None,
        "jobs": {r.method: {"dir": os.path.relpath(r.log_dir, run_dir), "reused": r.reused,
                            "ok": r.ok, "seconds": None if r.error else r.seconds}
                 for r in results},
    }
    (run_dir / "provenance.json").write_text(json.dumps(info, indent=1))
    (run_dir / "table.csv").write_text(csv_table(rows, tasks))
    measured = [r for r in rows if r.source == "measured"]
    if measured and not title_suffix:
        bar_plot(
            rows, tasks, run_dir / "bars.png", f"{spec['name']}: {spec.get('description', '')}",
            ylabel=f"{spec.get('metric', 'accuracy')} (%)",
        )
    lines = [
        f"# {spec['name']}{title_suffix}: {spec.get('description', '')}",
        "",
        *provenance.markdown_lines(info),
        f"- fusion_bench overrides: `{' '.join(spec['overrides'])}`; per-method overrides in "
        "provenance.json",
        "",
        f"{spec.get('metric_note') or 'Accuracy in %.'} `individual` = each expert on its own "
        "task. `merge s` = wall time of the method's `run` (loading the pool + merging); `peak "
        "RSS` = the process's peak resident memory. A setting in brackets says how the row was "
        "obtained (a value tuned on validation data - see runs/<method>/tuning.json - or the "
        "seeds of mean ± std).",
        "",
    ]
    raw = [r for r in rows if r.scale == RAW]
    normalised = [r for r in rows if r.scale == NORMALISED]
    if normalised:
        lines += ["## Raw scores", "", markdown_table(raw, tasks), "",
                  "## Normalised: % of the individual expert's score, per task", "",
                  markdown_table(normalised, tasks, with_cost=False), ""]
    else:
        lines += [markdown_table(rows, tasks), ""]
    if failures:
        lines.append("Failed: " + ", ".join(f.method for f in failures) + " (see their rows)")
    reused = sum(r.reused for r in results)
    if reused:
        lines.append(f"{reused} of {len(results)} jobs reused from an earlier run of the same "
                     "command (their merge time is that run's).")
    (run_dir / "table.md").write_text("\n".join(lines))
