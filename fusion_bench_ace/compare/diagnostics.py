"""Plots of an ACE run's ``ace_diagnostics.json``: γ per layer with its branch, and spectra.

``python -m fusion_bench_ace.compare diagnostics <ace_diagnostics.json> [--out DIR]`` writes
``gamma.png`` (γ of every merged matrix in model order, coloured by the branch taken, τ drawn)
and, when the run recorded singular values (``method.spectrum_keys``), ``spectra.png``: the
singular values of ``W_pre`` and of the final merge per recorded layer (the paper's Fig. 2, where
the refinement lifts the tail of the spectrum). Also a ``diagnostics.md`` summary table.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional


def load_diagnostics(path: Path) -> dict:
    data = json.loads(Path(path).read_text())
    if "layers" not in data:
        raise ValueError(f"{path} is not an ace_diagnostics.json (no 'layers')")
    return data


def branch_rule(data: dict) -> tuple:
    """``(statistic name, threshold name, threshold)`` of the run's ``gamma_mode``."""
    if data.get("gamma_mode", "paper") == "scale_free":
        return "Var[log e]", "tau_scale_free", data["tau_scale_free"]
    return "gamma", "tau", data["tau"]


def summary_markdown(data: dict, title: str) -> str:
    layers = data["layers"]
    heterogeneous = [row for row in layers if row["heterogeneous"]]
    gammas = [row["gamma"] for row in layers]
    statistic, threshold_name, threshold = branch_rule(data)
    ridge = (f"eps_rel={data['eps_rel']:g} (relative)" if data.get("eps_mode") == "relative"
             else f"eps={data['eps']:g}")
    lines = [
        f"# {title}",
        "",
        f"{ridge}, {threshold_name}={threshold:g}, k_frac={data['k_frac']:g}: "
        f"{len(heterogeneous)} of {len(layers)} matrices took the heterogeneous branch "
        f"({statistic} > {threshold_name}); {statistic} from {min(gammas):.3g} to "
        f"{max(gammas):.3g}.",
        "",
        f"| layer | shape | {statistic} | branch | k | fallback |",
        "|---|---|---:|---|---:|---|",
    ]
    for row in layers:
        branch = "heterogeneous" if row["heterogeneous"] else "homogeneous"
        shape = "x".join(map(str, row["shape"]))
        lines.append(f"| {row['name']} | {shape} | {row['gamma']:.4f} | {branch} | "
                     f"{row['rank_k']} | {row.get('fallback') or ''} |")
    return "\n".join(lines) + "\n"


def plot_gamma(data: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = data["layers"]
    statistic, threshold_name, threshold = branch_rule(data)
    colours = ["tab:red" if row["heterogeneous"] else "tab:blue" for row in layers]
    fig, ax = plt.subplots(figsize=(max(6, 0.12 * len(layers) + 3), 3.6))
    ax.bar(range(len(layers)), [row["gamma"] for row in layers], color=colours)
    ax.axhline(threshold, color="black", linestyle="--", linewidth=1,
               label=f"{threshold_name} = {threshold:g}")
    ax.bar([], [], color="tab:red", label="heterogeneous (trace-normalised + refinement)")
    ax.bar([], [], color="tab:blue", label="homogeneous")
    ax.set_xlabel("merged matrix (model order)")
    ax.set_ylabel("gamma (Eq. 7)" if statistic == "gamma" else statistic)
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_spectra(data: dict, path: Path, title: str) -> bool:
    """Singular values of W_pre vs the final merge per recorded layer; False if none recorded."""
    recorded = [row for row in data["layers"] if row.get("singular_values")]
    if not recorded:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(recorded), figsize=(4.2 * len(recorded), 3.6), squeeze=False)
    for ax, row in zip(axes[0], recorded):
        values = row["singular_values"]
        for key, style in (("preliminary", "-"), ("merged", "--")):
            ax.semilogy(
                range(1, len(values[key]) + 1),
                values[key],
                style,
                label="W_pre" if key == "preliminary" else "final (ACE)",
            )
        if row["rank_k"]:
            ax.axvline(row["rank_k"], color="grey", linewidth=0.8, label=f"k = {row['rank_k']}")
        branch = "het." if row["heterogeneous"] else "hom."
        ax.set_title(f"{row['name']}\n(gamma {row['gamma']:.3f}, {branch})", fontsize=8)
        ax.set_xlabel("index")
        ax.set_ylabel("singular value")
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def write_diagnostics(
    json_path: Path, out_dir: Optional[Path] = None, title: Optional[str] = None
) -> List[Path]:
    """Write ``gamma.png``, ``spectra.png`` (if recorded) and ``diagnostics.md``; return their
    paths."""
    json_path = Path(json_path)
    out_dir = Path(out_dir) if out_dir is not None else json_path.parent
    out_dir.mkdir(parents=True, exist_ok=True)
    data = load_diagnostics(json_path)
    title = title or f"ACE-Merging diagnostics ({json_path.parent.name})"
    written = [out_dir / "diagnostics.md", out_dir / "gamma.png"]
    written[0].write_text(summary_markdown(data, title))
    plot_gamma(data, written[1], title)
    if plot_spectra(data, out_dir / "spectra.png", title):
        written.append(out_dir / "spectra.png")
    return written
