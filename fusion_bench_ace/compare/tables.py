"""Turning FusionBench reports into comparison tables (Markdown, CSV) and plots (PNG)."""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

INDIVIDUAL = "individual"
RAW, NORMALISED = "raw", "normalised"


@dataclass
class Row:
    """One line of a comparison: a method's per-task scores (percent) and its cost."""

    name: str
    scores: Dict[str, Optional[float]]
    average: Optional[float] = None
    merge_seconds: Optional[float] = None
    peak_rss_mib: Optional[float] = None
    peak_cuda_mib: Optional[float] = None
    source: str = "measured"
    notes: List[str] = field(default_factory=list)
    stds: Dict[str, Optional[float]] = field(default_factory=dict)
    """Per task, the standard deviation over seeds (rows of repeated runs)."""
    average_std: Optional[float] = None
    setting: Optional[str] = None
    """How the row was obtained beyond the method's config (a tuned value, the seeds)."""
    scale: str = RAW
    """``raw``: the metric in percent; ``normalised``: percent of the individual expert's."""


def scores_from_report(method: str, report: dict, tasks: Sequence[str], metric: str = "accuracy",
                       expert_of: Optional[Dict[str, str]] = None) -> Dict[str, Optional[float]]:
    """Per-task ``metric`` in percent; for ``individual`` expert ``expert_of[t]`` on task t
    (default: the diagonal, expert t on task t)."""
    expert_of = expert_of or {}
    scores = {}
    for task in tasks:
        entry = (report.get(expert_of.get(task, task), {}).get(task) if method == INDIVIDUAL
                 else report.get(task))
        value = entry.get(metric) if isinstance(entry, dict) else None
        scores[task] = None if value is None else 100.0 * value
    return scores


def mean_or_none(values: Sequence[Optional[float]]) -> Optional[float]:
    if not values or any(v is None for v in values):
        return None
    return sum(values) / len(values)


def std_or_none(values: Sequence[Optional[float]]) -> Optional[float]:
    """Sample standard deviation (n - 1), as seeds are a sample of the method's randomness."""
    if len(values) < 2 or any(v is None for v in values):
        return None
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def measured_row(method: str, report: dict, merge_stats: Optional[dict], tasks: Sequence[str],
                 metric: str = "accuracy", setting: Optional[str] = None,
                 expert_of: Optional[Dict[str, str]] = None) -> Row:
    scores = scores_from_report(method, report, tasks, metric, expert_of)
    stats = merge_stats or {}
    return Row(
        name=method, scores=scores, average=mean_or_none([scores[t] for t in tasks]),
        merge_seconds=stats.get("merge_seconds"), peak_rss_mib=stats.get("peak_rss_mib"),
        peak_cuda_mib=stats.get("peak_cuda_mib"), setting=setting,
    )


def seeded_row(method: str, reports: Sequence[dict], merge_stats: Sequence[Optional[dict]],
               tasks: Sequence[str], metric: str = "accuracy", setting: Optional[str] = None
               ) -> Row:
    """Mean ± sample std over repeated runs (one report per seed); the average's std is over the
    runs' averages. Cost: mean merge time, largest peak memory."""
    runs = [measured_row(method, r, s, tasks, metric) for r, s in zip(reports, merge_stats)]
    if not runs:
        raise ValueError(f"{method}: no finished run to aggregate")
    column = {t: [run.scores[t] for run in runs] for t in tasks}
    averages = [run.average for run in runs]

    def largest(values):
        values = [v for v in values if v is not None]
        return max(values) if values else None

    return Row(
        name=method, scores={t: mean_or_none(column[t]) for t in tasks},
        average=mean_or_none(averages), stds={t: std_or_none(column[t]) for t in tasks},
        average_std=std_or_none(averages),
        merge_seconds=mean_or_none([run.merge_seconds for run in runs]),
        peak_rss_mib=largest([run.peak_rss_mib for run in runs]),
        peak_cuda_mib=largest([run.peak_cuda_mib for run in runs]), setting=setting,
    )


def experts_of_tasks(spec: dict) -> Optional[Dict[str, str]]:
    """``normalize: {individual: {task: expert}}`` (ACE Table 9: experts named otherwise than their
    tasks), else ``None`` (expert t is task t's)."""
    how = spec.get("normalize")
    return how.get(INDIVIDUAL) if isinstance(how, dict) else None


def reference_scores(individual_report: dict, tasks: Sequence[str], metric: str = "accuracy",
                     expert_of: Optional[Dict[str, str]] = None) -> Dict[str, Optional[float]]:
    """The score each task is normalised by, in percent: expert ``expert_of[t]`` (default: t's own
    expert, ACE Table 3) on task t, read off the ``individual`` run's report (every expert on
    every task; ACE Table 9 names another expert for some tasks)."""
    expert_of = expert_of or {}
    scores = {}
    for task in tasks:
        entry = individual_report.get(expert_of.get(task, task), {}).get(task)
        value = entry.get(metric) if isinstance(entry, dict) else None
        scores[task] = None if value is None else 100.0 * value
    return scores


def normalised_row(row: Row, reference: Dict[str, Optional[float]], tasks: Sequence[str]) -> Row:
    """``100 * score / reference`` per task (undefined where the reference is not positive), the
    average of those (as ACE Table 3 averages its normalised cells), stds scaled alike."""

    def ratio(value: Optional[float], task: str) -> Optional[float]:
        base = reference.get(task)
        if value is None or base is None or base <= 0:
            return None
        return 100.0 * value / base

    scores = {t: ratio(row.scores.get(t), t) for t in tasks}
    return Row(
        name=row.name, scores=scores, average=mean_or_none([scores[t] for t in tasks]),
        merge_seconds=row.merge_seconds, peak_rss_mib=row.peak_rss_mib,
        peak_cuda_mib=row.peak_cuda_mib, source=row.source, notes=list(row.notes),
        stds={t: ratio(row.stds.get(t), t) for t in tasks} if row.stds else {},
        setting=row.setting, scale=NORMALISED,
    )


FAILED = "failed"


def failed_row(name: str, tasks: Sequence[str], note: str) -> Row:
    """The row of a job that produced no report: no scores, and ``note`` (why, which log)."""
    return Row(name=name, scores={t: None for t in tasks}, source=FAILED, notes=[note])


def _fmt(value: Optional[float], digits: int = 1) -> str:
    return (
        "–"
        if value is None or (isinstance(value, float) and math.isnan(value))
        else f"{value:.{digits}f}"
    )


def _cell(value: Optional[float], std: Optional[float] = None) -> str:
    return _fmt(value) if std is None or value is None else f"{_fmt(value)} ± {_fmt(std)}"


def markdown_table(rows: Sequence[Row], tasks: Sequence[str], *, with_cost: bool = True) -> str:
    header = ["method", *tasks, "avg"]
    if with_cost:
        header += ["merge s", "peak RSS MiB"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        name = row.name if row.source == "measured" else f"{row.name} *({row.source})*"
        if row.setting:
            name += f" ({row.setting})"
        if row.notes:
            name += ": " + "; ".join(row.notes).replace("|", "\\|")
        cells = [name, *(_cell(row.scores.get(t), row.stds.get(t)) for t in tasks),
                 _cell(row.average, row.average_std)]
        if with_cost:
            cells += [_fmt(row.merge_seconds, 2), _fmt(row.peak_rss_mib, 0)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def csv_table(rows: Sequence[Row], tasks: Sequence[str]) -> str:
    """One line per row; ``std_<task>`` / ``average_std`` columns only when some row has seeds."""
    def number(value: Optional[float], digits: int = 4) -> str:
        return "" if value is None else f"{value:.{digits}f}"

    with_std = any(row.stds for row in rows)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["method", "source", "scale", "setting", *tasks, "average",
                     *([f"std_{t}" for t in tasks] + ["average_std"] if with_std else []),
                     "merge_seconds", "peak_rss_mib", "peak_cuda_mib", "notes"])
    for row in rows:
        writer.writerow([
            row.name, row.source, row.scale, row.setting or "",
            *(number(row.scores.get(t)) for t in tasks), number(row.average),
            *([number(row.stds.get(t)) for t in tasks] + [number(row.average_std)]
              if with_std else []),
            number(row.merge_seconds, 3), number(row.peak_rss_mib, 1),
            number(row.peak_cuda_mib, 1), "; ".join(row.notes),
        ])
    return buffer.getvalue()


def bar_plot(rows: Sequence[Row], tasks: Sequence[str], path: Path, title: str,
             ylabel: str = "accuracy (%)") -> None:
    """Grouped bars: one group per task (plus the average), one bar per measured raw row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    measured = [r for r in rows if r.source == "measured" and r.scale == RAW]
    groups = [*tasks, "avg"]
    width = 0.8 / max(1, len(measured))
    fig, ax = plt.subplots(figsize=(max(8, 1.1 * len(groups) + 2), 4.5))
    for i, row in enumerate(measured):
        values = [row.scores.get(t) for t in tasks] + [row.average]
        xs = [g + (i - (len(measured) - 1) / 2) * width for g in range(len(groups))]
        ax.bar(xs, [0 if v is None else v for v in values], width, label=row.name)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(groups, rotation=30, ha="right")
    ax.set_ylabel(ylabel)
    lowest = min([v for r in measured for v in [*r.scores.values(), r.average] if v is not None],
                 default=0.0)
    ax.set_ylim(min(0.0, lowest), 100)  # correlations (CoLA, STS-B) can be negative
    ax.set_title(title)
    ax.legend(
        fontsize=8, ncol=min(4, len(measured)), loc="upper center", bbox_to_anchor=(0.5, -0.22)
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def heatmap(
    grid: Dict[tuple, float],
    x_name: str,
    x_values: Sequence,
    y_name: str,
    y_values: Sequence,
    path: Path,
    title: str,
    panels: Optional[Dict[str, Dict[tuple, float]]] = None,
) -> None:
    """Average accuracy over two swept parameters; one panel per value of any third parameter."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    panels = panels or {"": grid}
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels) + 1, 3.8), squeeze=False)
    finite = [v for p in panels.values() for v in p.values() if v is not None]
    vmin, vmax = (min(finite), max(finite)) if finite else (0, 100)
    for ax, (label, cells) in zip(axes[0], panels.items()):
        data = np.array(
            [[cells.get((x, y), np.nan) for x in x_values] for y in y_values], dtype=float
        )
        image = ax.imshow(data, cmap="viridis", vmin=vmin, vmax=vmax, aspect="auto")
        ax.set_xticks(range(len(x_values)))
        ax.set_xticklabels([str(v) for v in x_values], rotation=30)
        ax.set_yticks(range(len(y_values)))
        ax.set_yticklabels([str(v) for v in y_values])
        ax.set_xlabel(x_name)
        ax.set_ylabel(y_name)
        ax.set_title(label or title, fontsize=9)
        for yi in range(len(y_values)):
            for xi in range(len(x_values)):
                if not np.isnan(data[yi, xi]):
                    ax.text(
                        xi,
                        yi,
                        f"{data[yi, xi]:.1f}",
                        ha="center",
                        va="center",
                        fontsize=7,
                        color="white",
                    )
    fig.colorbar(image, ax=axes[0].tolist(), label="average accuracy (%)")
    if len(panels) > 1:
        fig.suptitle(title)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
