"""Turning FusionBench reports into comparison tables (Markdown, CSV) and plots (PNG)."""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

INDIVIDUAL = "individual"


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


def scores_from_report(
    method: str, report: dict, tasks: Sequence[str]
) -> Dict[str, Optional[float]]:
    """Per-task accuracy in percent; for ``individual`` the diagonal (expert t on task t)."""
    scores = {}
    for task in tasks:
        entry = report.get(task, {}).get(task) if method == INDIVIDUAL else report.get(task)
        accuracy = entry.get("accuracy") if isinstance(entry, dict) else None
        scores[task] = None if accuracy is None else 100.0 * accuracy
    return scores


def mean_or_none(values: Sequence[Optional[float]]) -> Optional[float]:
    if not values or any(v is None for v in values):
        return None
    return sum(values) / len(values)


def measured_row(
    method: str, report: dict, merge_stats: Optional[dict], tasks: Sequence[str]
) -> Row:
    scores = scores_from_report(method, report, tasks)
    stats = merge_stats or {}
    return Row(
        name=method,
        scores=scores,
        average=mean_or_none([scores[t] for t in tasks]),
        merge_seconds=stats.get("merge_seconds"),
        peak_rss_mib=stats.get("peak_rss_mib"),
        peak_cuda_mib=stats.get("peak_cuda_mib"),
    )


def _fmt(value: Optional[float], digits: int = 1) -> str:
    return (
        "–"
        if value is None or (isinstance(value, float) and math.isnan(value))
        else f"{value:.{digits}f}"
    )


def markdown_table(rows: Sequence[Row], tasks: Sequence[str], *, with_cost: bool = True) -> str:
    header = ["method", *tasks, "avg"]
    if with_cost:
        header += ["merge s", "peak RSS MiB"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        name = row.name if row.source == "measured" else f"{row.name} *({row.source})*"
        cells = [name, *(_fmt(row.scores.get(t)) for t in tasks), _fmt(row.average)]
        if with_cost:
            cells += [_fmt(row.merge_seconds, 2), _fmt(row.peak_rss_mib, 0)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def csv_table(rows: Sequence[Row], tasks: Sequence[str]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(
        ["method", "source", *tasks, "average", "merge_seconds", "peak_rss_mib", "peak_cuda_mib"]
    )
    for row in rows:
        writer.writerow(
            [
                row.name,
                row.source,
                *("" if row.scores.get(t) is None else f"{row.scores[t]:.4f}" for t in tasks),
                "" if row.average is None else f"{row.average:.4f}",
                "" if row.merge_seconds is None else f"{row.merge_seconds:.3f}",
                "" if row.peak_rss_mib is None else f"{row.peak_rss_mib:.1f}",
                "" if row.peak_cuda_mib is None else f"{row.peak_cuda_mib:.1f}",
            ]
        )
    return buffer.getvalue()


def bar_plot(rows: Sequence[Row], tasks: Sequence[str], path: Path, title: str) -> None:
    """Grouped bars: one group per task (plus the average), one bar per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    measured = [r for r in rows if r.source == "measured"]
    groups = [*tasks, "avg"]
    width = 0.8 / max(1, len(measured))
    fig, ax = plt.subplots(figsize=(max(8, 1.1 * len(groups) + 2), 4.5))
    for i, row in enumerate(measured):
        values = [row.scores.get(t) for t in tasks] + [row.average]
        xs = [g + (i - (len(measured) - 1) / 2) * width for g in range(len(groups))]
        ax.bar(xs, [0 if v is None else v for v in values], width, label=row.name)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(groups, rotation=30, ha="right")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
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
