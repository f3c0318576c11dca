"""Issue 18's experiment: ACE's ε in ``absolute`` vs ``relative`` mode, γ ``paper`` vs
``scale_free``, read off ``compare sweep`` outputs (docs/ace_scale_free.md).

``python -m fusion_bench_ace.studies.ace_scale_free ROOT [--within 0.5]`` reads the ``latest``
run of every sweep directory under ``ROOT`` (each made by ``compare sweep ... --out ROOT/<name>``,
with or without ``--validation``) and writes ``summary.md``, ``summary.json`` and
``validation_vs_eps.png`` into ``ROOT``. Everything chosen is chosen on validation data:

- per benchmark and ε mode (γ ``paper``), the best ε and the values within ``--within`` points;
- per mode, the one ε (swept on every benchmark) with the smallest worst gap to every
  benchmark's best (over both modes), and whether that gap is within ``--within`` points; how
  far apart the absolute bests are;
- for runs that differ only in ``gamma_mode``, the layers whose branch changes, and the accuracy
  change;
- every test-split run beside the validation score of the same setting;
- what the layers look like (not accuracy): the mean centred Gram eigenvalue s̄/d_in of every
  layer (the ridge of a relative run over its eps_rel), the eps_rel that equals the paper's
  absolute preset there, and the branch statistics γ (paper) and Var[log e] (scale_free).

Ties go to the smaller ε.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import yaml

from .. import provenance
from ..compare.runs import sweep_jobs
from ..compare.tables import measured_row
from ..paths import config_dir

ABSOLUTE, RELATIVE = "absolute", "relative"
VALIDATION, TEST = "validation", "test"


@dataclass
class AceRun:
    """One ACE job of a sweep: where it ran, its ε and γ settings, its average score."""

    benchmark: str
    split: str
    eps_mode: str
    value: float
    """``eps`` in absolute mode, ``eps_rel`` in relative mode."""
    gamma_mode: str
    tau: float
    k_frac: float
    average: float
    layers: List[dict]
    """Per merged matrix of ``ace_diagnostics.json``: name, heterogeneous, gamma, eps."""
    job: str

    @property
    def heterogeneous(self) -> Dict[str, bool]:
        return {row["name"]: row["heterogeneous"] for row in self.layers}

    @property
    def setting(self) -> Tuple[str, str, float]:
        return self.benchmark, self.eps_mode, self.value


def load_runs(root: Path) -> List[AceRun]:
    """Every finished job of every ``ROOT/<name>/latest`` sweep."""
    runs = []
    for latest in sorted(Path(root).glob("*/latest")):
        run_dir = latest.resolve()
        spec = json.loads((run_dir / "provenance.json").read_text())["benchmark"]
        validation = set(spec.get("validation") or [])
        for job in sweep_jobs(run_dir / "jobs"):
            overrides = set(yaml.safe_load((job / "overrides.yaml").read_text()) or [])
            diagnostics = json.loads((job / "ace_diagnostics.json").read_text())
            report = json.loads((job / "program_report.json").read_text())
            mode = diagnostics["eps_mode"]
            runs.append(AceRun(
                benchmark=spec["name"],
                split=VALIDATION if validation and validation <= overrides else TEST,
                eps_mode=mode,
                value=diagnostics["eps_rel" if mode == RELATIVE else "eps"],
                gamma_mode=diagnostics["gamma_mode"],
                tau=diagnostics["tau" if diagnostics["gamma_mode"] == "paper"
                                else "tau_scale_free"],
                k_frac=diagnostics["k_frac"],
                average=measured_row("ace", report, None, spec["tasks"],
                                     spec.get("metric", "accuracy")).average,
                layers=[{k: row.get(k) for k in ("name", "heterogeneous", "gamma", "eps")}
                        for row in diagnostics["layers"]],
                job=str(job.relative_to(Path(root).resolve().parent)
                        if job.is_relative_to(Path(root).resolve().parent) else job),
            ))
    return runs


def best(runs: Sequence[AceRun]) -> AceRun:
    """The highest average; ties go to the smaller ε."""
    return max(sorted(runs, key=lambda r: r.value), key=lambda r: r.average)


def analyse(runs: Sequence[AceRun], within: float) -> dict:
    sweep = [r for r in runs if r.split == VALIDATION and r.gamma_mode == "paper"]
    benchmarks = sorted({r.benchmark for r in sweep})
    curves: Dict[str, Dict[str, List[AceRun]]] = {
        b: {m: sorted((r for r in sweep if (r.benchmark, r.eps_mode) == (b, m)),
                      key=lambda r: r.value) for m in (ABSOLUTE, RELATIVE)}
        for b in benchmarks
    }
    per_mode, track_best = {}, {}
    for b in benchmarks:
        track_best[b] = max(r.average for r in sweep if r.benchmark == b)
        for mode, curve in curves[b].items():
            if not curve:
                continue
            top = best(curve)
            near = [r.value for r in curve if r.average >= top.average - within]
            per_mode[f"{b}/{mode}"] = {
                "benchmark": b, "eps_mode": mode, "best_value": top.value,
                "best_average": top.average, "gap_to_track_best": track_best[b] - top.average,
                "within_range": [min(near), max(near)], "grid": [r.value for r in curve],
                "averages": [r.average for r in curve],
                "heterogeneous_layers": sum(top.heterogeneous.values()),
                "layers": len(top.heterogeneous),
            }
    common = {mode: _common(curves, track_best, within, mode) for mode in (ABSOLUTE, RELATIVE)}
    absolute_best = {b: per_mode[f"{b}/{ABSOLUTE}"]["best_value"]
                     for b in benchmarks if f"{b}/{ABSOLUTE}" in per_mode}
    decades = {f"{a} vs {b}": abs(math.log10(absolute_best[a] / absolute_best[b]))
               for i, a in enumerate(absolute_best) for b in list(absolute_best)[i + 1:]}
    return {
        "within_points": within, "track_best": track_best, "per_mode": per_mode,
        "common": common, "absolute_best_decades_apart": decades,
        "gamma": _gamma_pairs(runs), "test": _test_rows(runs),
    }


def layer_statistics(runs: Sequence[AceRun], presets: Dict[str, float]) -> Dict[str, dict]:
    """Per benchmark, from its runs' diagnostics: s̄/d_in, the preset as eps_rel, γ and V."""
    out = {}
    for b in sorted({r.benchmark for r in runs}):
        mine = [r for r in runs if r.benchmark == b]
        stats: dict = {}
        relative = next((r for r in mine if r.eps_mode == RELATIVE), None)
        if relative is not None:
            # solved layers; eps == eps_rel marks a layer with s̄ = 0 (no centred energy)
            scale = [row["eps"] / relative.value for row in relative.layers
                     if row["eps"] is not None and row["eps"] != relative.value]
            stats["layers"] = len(relative.layers)
            stats["mean_gram_eigenvalue"] = _spread(scale)
            if b in presets and scale:
                stats["preset"] = presets[b]
                stats["preset_as_eps_rel"] = _spread([presets[b] / s for s in scale])
        for gamma_mode in ("paper", "scale_free"):
            run = next((r for r in mine if r.gamma_mode == gamma_mode), None)
            if run is not None:
                values = [row["gamma"] for row in run.layers if row["gamma"] is not None]
                stats[gamma_mode] = {**_spread(values), "threshold": run.tau,
                                     "heterogeneous": sum(run.heterogeneous.values()),
                                     "layers": len(run.layers)}
        out[b] = stats
    return out


def _spread(values: Sequence[float]) -> dict:
    if not values:
        return {"min": None, "median": None, "max": None}
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def _common(curves, track_best, within, mode) -> Optional[dict]:
    """The ε of ``mode`` swept on every benchmark whose worst gap to the benchmarks' bests is
    least."""
    by_value = [{r.value: r for r in curves[b][mode]} for b in curves]
    shared = sorted(set.intersection(*(set(v) for v in by_value))) if by_value else []
    if not shared:
        return None
    gaps = {v: {b: track_best[b] - values[v].average for b, values in zip(curves, by_value)}
            for v in shared}
    chosen = min(shared, key=lambda v: max(gaps[v].values()))  # ties: the smaller (sorted)
    return {"value": chosen, "gaps": gaps[chosen], "worst_gap": max(gaps[chosen].values()),
            "holds": max(gaps[chosen].values()) <= within,
            "worst_gap_per_value": {v: max(g.values()) for v, g in gaps.items()}}


def _gamma_pairs(runs: Sequence[AceRun]) -> List[dict]:
    """Runs equal but for ``gamma_mode``: branch changes (scale_free vs paper), score change."""
    index = {(r.split, *r.setting, r.gamma_mode): r for r in runs}
    pairs = []
    for (split, b, mode, value, gamma), free in sorted(index.items(), key=str):
        paper = index.get((split, b, mode, value, "paper"))
        if gamma != "scale_free" or paper is None:
            continue
        changed = sorted(n for n in free.heterogeneous
                         if free.heterogeneous[n] != paper.heterogeneous.get(n))
        pairs.append({
            "split": split, "benchmark": b, "eps_mode": mode, "value": value,
            "layers": len(free.heterogeneous),
            "heterogeneous_paper": sum(paper.heterogeneous.values()),
            "heterogeneous_scale_free": sum(free.heterogeneous.values()),
            "changed": changed, "average_paper": paper.average,
            "average_scale_free": free.average, "delta": free.average - paper.average,
        })
    return pairs


def _test_rows(runs: Sequence[AceRun]) -> List[dict]:
    validation = {(*r.setting, r.gamma_mode): r for r in runs if r.split == VALIDATION}
    rows = []
    for r in sorted((r for r in runs if r.split == TEST),
                    key=lambda r: (r.benchmark, r.eps_mode, r.value, r.gamma_mode)):
        seen = validation.get((*r.setting, r.gamma_mode))
        rows.append({"benchmark": r.benchmark, "eps_mode": r.eps_mode, "value": r.value,
                     "gamma_mode": r.gamma_mode, "validation": seen and seen.average,
                     "test": r.average, "heterogeneous_layers": sum(r.heterogeneous.values()),
                     "layers": len(r.heterogeneous)})
    return rows


def paper_presets(runs: Sequence[AceRun]) -> Dict[str, float]:
    """Each benchmark's absolute ε preset: ``eps`` of its sweep method's config."""
    presets = {}
    for b in sorted({r.benchmark for r in runs}):
        spec = yaml.safe_load((config_dir() / "compare" / f"{b}.yaml").read_text())
        method = yaml.safe_load((config_dir() / "method" / f"{spec['sweep']['method']}.yaml")
                                .read_text())
        if "eps" in method:
            presets[b] = float(method["eps"])
    return presets


# --- output ---------------------------------------------------------------------------------------


def _g(value) -> str:
    return "–" if value is None else f"{value:.3g}" if isinstance(value, float) else str(value)


def _pct(value) -> str:
    return "–" if value is None else f"{value:.2f}"


def markdown(result: dict, runs: Sequence[AceRun], presets: Dict[str, float], info: dict,
             sources: List[str]) -> str:
    within = result["within_points"]
    lines = ["# ACE: ε absolute vs relative, γ paper vs scale-free (issue 18)", "",
             *provenance.markdown_lines(info), "- sweeps read (their own commands):",
             *[f"  - {s}" for s in sources], "",
             f"Average accuracy (%) over the benchmark's tasks. Validation data chose everything; "
             f"`within {within:g}` = the ε values whose validation average is within {within:g} "
             "points of the mode's best. τ and k_frac as in the table (the paper's).", "",
             "## Validation sweeps of ε (gamma_mode=paper)", ""]
    per_mode = result["per_mode"]
    for key, m in per_mode.items():
        lines += [f"### {m['benchmark']}, eps_mode={m['eps_mode']}", "",
                  "| " + ("eps" if m["eps_mode"] == ABSOLUTE else "eps_rel") + " | "
                  + " | ".join(_g(v) for v in m["grid"]) + " |",
                  "|---|" + "---|" * len(m["grid"]),
                  "| validation avg | " + " | ".join(_pct(a) for a in m["averages"]) + " |", ""]
    taus = sorted({(r.tau, r.k_frac) for r in runs if r.gamma_mode == "paper"})
    lines += [f"(τ, k_frac) of these runs: {', '.join(f'({t:g}, {k:g})' for t, k in taus)}", "",
              "## Best ε per benchmark and mode (validation)", "",
              "| benchmark | mode | best | validation avg | gap to the benchmark's best | "
              f"within {within:g} | heterogeneous layers | paper preset (absolute) |",
              "|---|---|---|---|---|---|---|---|"]
    for m in per_mode.values():
        low, high = m["within_range"]
        lines.append(f"| {m['benchmark']} | {m['eps_mode']} | {_g(m['best_value'])} | "
                     f"{_pct(m['best_average'])} | {_pct(m['gap_to_track_best'])} | "
                     f"{_g(low)} … {_g(high)} | {m['heterogeneous_layers']} of {m['layers']} | "
                     f"{_g(presets.get(m['benchmark']))} |")
    lines += ["", "## The claim: one ε for every benchmark", "",
              "Per mode, each ε swept on every benchmark and its worst gap (points) to a "
              "benchmark's best validation average over both modes.", ""]
    for mode, name in ((RELATIVE, "eps_rel"), (ABSOLUTE, "eps")):
        common = result["common"][mode]
        if common is None:
            lines.append(f"No {name} was swept on every benchmark.")
            continue
        worst = common["worst_gap_per_value"]
        lines += [f"| {name} | " + " | ".join(_g(v) for v in worst) + " |",
                  "|---|" + "---|" * len(worst),
                  "| worst gap | " + " | ".join(_pct(g) for g in worst.values()) + " |", "",
                  f"Best common {name} = {_g(common['value'])}: gaps "
                  + ", ".join(f"{b} {_pct(g)}" for b, g in common["gaps"].items())
                  + f" → {'within' if common['holds'] else 'NOT within'} {within:g} points of "
                  "every benchmark's best (over both modes).", ""]
    for pair, decades in result["absolute_best_decades_apart"].items():
        lines.append(f"Best absolute ε, {pair}: {decades:.1f} decades apart.")
    lines += ["", "## γ: gamma_mode=scale_free against paper at the same ε", "",
              "| split | benchmark | mode | ε | heterogeneous paper → scale_free | layers changed "
              "| avg paper | avg scale_free | Δ |", "|---|---|---|---|---|---|---|---|---|"]
    for p in result["gamma"]:
        changed = ", ".join(f"`{n}`" for n in p["changed"]) or "none"
        lines.append(f"| {p['split']} | {p['benchmark']} | {p['eps_mode']} | {_g(p['value'])} | "
                     f"{p['heterogeneous_paper']} → {p['heterogeneous_scale_free']} of "
                     f"{p['layers']} | {len(p['changed'])}: {changed} | "
                     f"{_pct(p['average_paper'])} | {_pct(p['average_scale_free'])} | "
                     f"{p['delta']:+.2f} |")
    lines += ["", "## Test-split runs of the settings chosen on validation", "",
              "| benchmark | mode | ε | gamma_mode | validation avg | test avg | heterogeneous |",
              "|---|---|---|---|---|---|---|"]
    for t in result["test"]:
        lines.append(f"| {t['benchmark']} | {t['eps_mode']} | {_g(t['value'])} | "
                     f"{t['gamma_mode']} | {_pct(t['validation'])} | {_pct(t['test'])} | "
                     f"{t['heterogeneous_layers']} of {t['layers']} |")
    lines += ["", "## The layers (from the runs' diagnostics; not accuracy)", "",
              "s̄/d_in: mean eigenvalue of a layer's mean centred Gram matrix (a relative run's "
              "ridge over its eps_rel); the preset as eps_rel = preset / (s̄/d_in); γ (paper, "
              "against τ) and V = Var[log e] (scale_free, against tau_scale_free); min … max "
              "(median) over the merged matrices.", "",
              "| benchmark | layers | s̄/d_in | preset | preset as eps_rel | γ (paper) | "
              "heterogeneous (paper) | V (scale_free) | heterogeneous (scale_free) |",
              "|---|---|---|---|---|---|---|---|---|"]
    for b, st in result.get("layers", {}).items():
        def spread(d):
            return "–" if not d or d["min"] is None else (
                f"{d['min']:.2g} … {d['max']:.2g} ({d['median']:.2g})")

        def branches(d):
            return "–" if not d else (f"{d['heterogeneous']} of {d['layers']} "
                                      f"(> {d['threshold']:g})")
        lines.append(f"| {b} | {st.get('layers', '–')} | "
                     f"{spread(st.get('mean_gram_eigenvalue'))} | {_g(st.get('preset'))} | "
                     f"{spread(st.get('preset_as_eps_rel'))} | {spread(st.get('paper'))} | "
                     f"{branches(st.get('paper'))} | {spread(st.get('scale_free'))} | "
                     f"{branches(st.get('scale_free'))} |")
    return "\n".join(lines) + "\n"


def plot(result: dict, presets: Dict[str, float], path: Path) -> None:
    """Validation average minus the benchmark's best, against ε, one panel per mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    within = result["within_points"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, mode in zip(axes, (ABSOLUTE, RELATIVE)):
        for i, m in enumerate(m for m in result["per_mode"].values() if m["eps_mode"] == mode):
            best = result["track_best"][m["benchmark"]]
            line, = ax.plot(m["grid"], [a - best for a in m["averages"]], "o-",
                            label=f"{m['benchmark']} (best {best:.1f}%)")
            ax.plot([m["best_value"]], [m["best_average"] - best], "*", ms=14,
                    color=line.get_color())
            if mode == ABSOLUTE and m["benchmark"] in presets:
                ax.axvline(presets[m["benchmark"]], color=line.get_color(), ls=":", lw=1)
        common = result["common"][mode]
        if common is not None:
            ax.axvline(common["value"], color="k", ls="--", lw=0.8,
                       label=f"best common value {common['value']:g}")
        ax.axhspan(-within, 0, color="0.85", zorder=0)
        ax.set_xscale("log")
        ax.set_xlabel("eps (absolute; dotted: the paper's preset)" if mode == ABSOLUTE
                      else "eps_rel (relative)")
        ax.set_title(f"eps_mode={mode}")
        ax.legend(fontsize=8, loc="lower center")
    axes[0].set_ylabel("validation avg − benchmark's best (points)")
    fig.suptitle(f"ACE, validation data: gap to each benchmark's best (grey: within {within:g})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m fusion_bench_ace.studies.ace_scale_free",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("root", type=Path, help="directory of the sweeps' --out directories")
    parser.add_argument("--within", type=float, default=0.5, help="points (default 0.5)")
    args = parser.parse_args(argv)
    runs = load_runs(args.root)
    if not runs:
        raise SystemExit(f"no finished sweep jobs under {args.root}/*/latest")
    result = analyse(runs, args.within)
    presets = paper_presets(runs)
    result["layers"] = layer_statistics(runs, presets)
    info = provenance.collect(" ".join(
        ["python -m fusion_bench_ace.studies.ace_scale_free", *argv]))
    sources = []
    for latest in sorted(args.root.glob("*/latest")):
        command = json.loads((latest / "provenance.json").read_text())["command"]
        sources.append(f"`{latest.parent.name}/{latest.resolve().name}`: `{command}`")
    (args.root / "summary.md").write_text(markdown(result, runs, presets, info, sources))
    (args.root / "summary.json").write_text(json.dumps(
        {"provenance": info, **result, "runs": [asdict(r) for r in runs]}, indent=1))
    plot(result, presets, args.root / "validation_vs_eps.png")
    print((args.root / "summary.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
