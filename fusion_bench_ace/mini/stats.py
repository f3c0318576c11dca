"""Regime statistics of a built track: is it in the regime real fine-tuned experts live in?

``python -m fusion_bench_ace.mini stats --track clip`` (or ``gpt2``, ``llm``) measures, before any
merging method is compared on the track, the statistics that decide whether data-free merging
*can* work there, and compares them with the ranges measured on real checkpoints
(``config/mini/regime.yaml``):

- accuracy: zero-shot (the pretrained model) and experts per task, chance-corrected; each expert
  on the *other* tasks relative to zero-shot;
- linearity: one task vector at strength α alone (own gain kept), simple averaging and Task
  Arithmetic (share of the zero-shot → expert gap closed);
- geometry: ‖τ_t‖/‖θ₀‖ for the whole model and per block, the share of ‖τ_t‖² in 1-D parameters
  (biases, norms), the spread of norms across tasks, pairwise cosines (whole model and per
  layer), the stable rank and top-10 % singular-value energy of every task matrix beside those of
  a Gaussian matrix of the same shape.

A track module provides ``load_for_stats(directory) -> TrackModels``; everything here works on
state dicts and an ``evaluate(state, task)`` callable, so it knows no model.
"""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch
from torch import Tensor

StateDict = Dict[str, Tensor]


@dataclass
class TrackModels:
    """What the statistics need from a built track."""

    tasks: List[str]
    pretrained: StateDict
    """The merged part of the pretrained model (vision tower / GPT-2 backbone), float32."""
    experts: Dict[str, StateDict]
    evaluate: Callable[[StateDict, str], float]
    """Accuracy in [0, 1] of a state dict of the merged part on a task's test split."""
    chance: Dict[str, float]
    block_of: Callable[[str], str]
    """Groups parameter names into blocks (e.g. one transformer layer)."""
    info: Dict[str, object] = field(default_factory=dict)


def task_vectors(models: TrackModels) -> Dict[str, StateDict]:
    return {t: {k: models.experts[t][k] - v for k, v in models.pretrained.items()}
            for t in models.tasks}


def _flat(state: StateDict) -> Tensor:
    return torch.cat([v.reshape(-1).double() for v in state.values()])


def _add(base: StateDict, vectors: List[StateDict], weights: List[float]) -> StateDict:
    return {k: v + sum(w * tv[k] for w, tv in zip(weights, vectors)) for k, v in base.items()}


def geometry(models: TrackModels, vectors: Dict[str, StateDict]) -> dict:
    """Norms, norm spread, cosines and rank structure of the task vectors."""
    tasks = models.tasks
    theta = models.pretrained
    flat = {t: _flat(vectors[t]) for t in tasks}
    theta_norm = float(_flat(theta).norm())
    whole = {t: float(flat[t].norm()) / theta_norm for t in tasks}
    one_d = [k for k, v in theta.items() if v.dim() < 2]
    one_d_share = {t: float(sum(vectors[t][k].double().pow(2).sum() for k in one_d)
                            / flat[t].pow(2).sum()) for t in tasks}
    theta_one_d_share = float(sum(theta[k].double().pow(2).sum() for k in one_d)
                              / _flat(theta).pow(2).sum())

    blocks: Dict[str, List[str]] = {}
    for name in theta:
        blocks.setdefault(models.block_of(name), []).append(name)
    per_block = {}
    for block, names in blocks.items():
        base = math.sqrt(sum(float(theta[k].double().pow(2).sum()) for k in names))
        per_block[block] = {
            t: math.sqrt(sum(float(vectors[t][k].double().pow(2).sum()) for k in names)) / base
            for t in tasks
        }

    pairs = list(itertools.combinations(tasks, 2))
    cosines = [float(torch.dot(flat[a], flat[b]) / (flat[a].norm() * flat[b].norm()))
               for a, b in pairs]

    generator = torch.Generator().manual_seed(0)
    layers = {}
    for name, weight in theta.items():
        if weight.dim() != 2 or min(weight.shape) < 2:
            continue
        matrices = {t: vectors[t][name].double() for t in tasks}
        norms = {t: float(m.norm()) for t, m in matrices.items()}
        layer_cos = [float((matrices[a] * matrices[b]).sum() / (norms[a] * norms[b]))
                     for a, b in pairs if norms[a] > 0 and norms[b] > 0]
        ranks = [_rank_structure(m) for m in matrices.values()]
        gaussian = _rank_structure(torch.randn(weight.shape, generator=generator,
                                               dtype=torch.float64))
        positive = [n for n in norms.values() if n > 0]
        layers[name] = {
            "shape": list(weight.shape),
            "relative_norm": {t: norms[t] / float(weight.double().norm()) for t in tasks},
            "norm_spread": max(positive) / min(positive) if positive else None,
            "cosine_mean": _mean(layer_cos), "cosine_max": max(layer_cos, default=None),
            "stable_rank": _mean([r[0] for r in ranks]),
            "top10_energy": _mean([r[1] for r in ranks]),
            "gaussian_stable_rank": gaussian[0], "gaussian_top10_energy": gaussian[1],
        }
    block_values = [v for b in per_block.values() for v in b.values()]
    return {
        "relative_norm": whole,
        "relative_norm_per_block": per_block,
        "relative_norm_block_max": max(block_values),
        "relative_norm_block_median": _median(block_values),
        "one_d_share_of_task_vector": one_d_share,
        "one_d_share_of_pretrained": theta_one_d_share,
        "norm_spread": max(whole.values()) / min(whole.values()),
        "cosine_mean": _mean(cosines), "cosine_max": max(cosines, default=None),
        "cosine_pairs": {f"{a}/{b}": c for (a, b), c in zip(pairs, cosines)},
        "layers": layers,
        "layer_cosine_mean": _mean([v["cosine_mean"] for v in layers.values()]),
        "layer_cosine_max": max((v["cosine_max"] for v in layers.values()), default=None),
        "layer_norm_spread_median": _median([v["norm_spread"] for v in layers.values()
                                             if v["norm_spread"]]),
        "stable_rank_ratio_median": _median([v["stable_rank"] / v["gaussian_stable_rank"]
                                             for v in layers.values()]),
        "top10_energy_median": _median([v["top10_energy"] for v in layers.values()]),
        "gaussian_top10_energy_median": _median([v["gaussian_top10_energy"]
                                                 for v in layers.values()]),
    }


def _rank_structure(matrix: Tensor) -> tuple:
    """Stable rank ‖A‖²_F / ‖A‖²_2 and the share of ‖A‖²_F in the top 10 % singular values."""
    s = torch.linalg.svdvals(matrix)
    energy = s.pow(2)
    total = float(energy.sum())
    if total == 0:
        return (0.0, 0.0)
    top = max(1, math.ceil(0.1 * len(s)))
    return (total / float(energy[0]), float(energy[:top].sum()) / total)


def accuracies(models: TrackModels, vectors: Dict[str, StateDict], alphas: dict,
               progress: bool = True) -> dict:
    """Zero-shot, experts (on every task), single task vectors, simple average, Task Arithmetic."""
    from tqdm.auto import tqdm

    tasks = models.tasks
    evaluate = models.evaluate
    theta = models.pretrained
    jobs = [("pretrained", theta, tasks)]
    jobs += [(f"expert/{t}", models.experts[t], tasks) for t in tasks]
    jobs += [(f"single/{t}", _add(theta, [vectors[t]], [alphas["single"]]), [t]) for t in tasks]
    everything = [vectors[t] for t in tasks]
    jobs.append(("simple_average", _add(theta, everything, [1 / len(tasks)] * len(tasks)), tasks))
    jobs.append(("task_arithmetic", _add(theta, everything, [alphas["task_arithmetic"]]
                                         * len(tasks)), tasks))
    bar = tqdm(total=sum(len(j[2]) for j in jobs), desc="evaluating", disable=not progress)
    table: Dict[str, Dict[str, float]] = {}
    for name, state, on in jobs:
        table[name] = {}
        for task in on:
            table[name][task] = evaluate(state, task)
            bar.update()
    bar.close()
    return table


def summarize(models: TrackModels, table: Dict[str, Dict[str, float]], alphas: dict) -> dict:
    tasks, chance = models.tasks, models.chance
    zero_shot = table["pretrained"]
    expert = {t: table[f"expert/{t}"][t] for t in tasks}

    def avg(row):
        return sum(row[t] for t in tasks) / len(tasks)

    def closure(row):
        gap = avg(expert) - avg(zero_shot)
        return (avg(row) - avg(zero_shot)) / gap if gap else None

    others = {}
    for t in tasks:
        rest = [s for s in tasks if s != t]
        base = sum(zero_shot[s] for s in rest)
        # None where zero-shot scores 0 on every other task: nothing to keep, no ratio
        others[t] = sum(table[f"expert/{t}"][s] for s in rest) / base if base else None
    single_kept = {t: (table[f"single/{t}"][t] - zero_shot[t]) / (expert[t] - zero_shot[t])
                   if expert[t] != zero_shot[t] else None for t in tasks}
    return {
        "zero_shot": zero_shot,
        "zero_shot_average": avg(zero_shot),
        "zero_shot_above_chance": {t: zero_shot[t] - chance[t] for t in tasks},
        "zero_shot_chance_corrected": sum((zero_shot[t] - chance[t]) / (1 - chance[t])
                                          for t in tasks) / len(tasks),
        "expert": expert,
        "expert_average": avg(expert),
        "expert_gain": {t: expert[t] - zero_shot[t] for t in tasks},
        "expert_on_other_tasks_vs_zero_shot": others,
        "single_alpha": alphas["single"],
        "single_gain_kept": single_kept,
        "simple_average": table["simple_average"],
        "simple_average_gap_closed": closure(table["simple_average"]),
        "task_arithmetic_lambda": alphas["task_arithmetic"],
        "task_arithmetic": table["task_arithmetic"],
        "task_arithmetic_gap_closed": closure(table["task_arithmetic"]),
    }


# --- targets --------------------------------------------------------------------------------------


def check_targets(stats: dict, targets: dict) -> List[dict]:
    """One row per target: the measured value(s), the allowed range, whether it holds."""
    acc, geo = stats["accuracy"], stats["geometry"]
    rows = []

    def add(name, values, low=None, high=None):
        values = values if isinstance(values, dict) else {"": values}
        ok = all(v is not None and (low is None or v >= low) and (high is None or v <= high)
                 for v in values.values())
        shown = [v for v in values.values() if v is not None]
        rows.append({"target": name, "min": low, "max": high, "ok": ok,
                     "worst": (min(shown) if low is not None and (high is None or min(shown) < low)
                               else max(shown)) if shown else None,
                     "values": values})

    t = targets
    kept = [v for v in acc["single_gain_kept"].values() if v is not None]
    checks = [
        ("relative_norm", "task vector ‖τ_t‖/‖θ₀‖, whole model", geo["relative_norm"]),
        ("relative_norm_block_max", "task vector ‖τ_t‖/‖θ₀‖, every block (max)",
         geo["relative_norm_block_max"]),
        ("one_d_share_max", "share of ‖τ_t‖² in biases and norms",
         geo["one_d_share_of_task_vector"]),
        ("norm_spread", "norm spread across tasks (max/min)", geo["norm_spread"]),
        ("cosine_mean_max", "mean pairwise cosine", geo["cosine_mean"]),
        ("cosine_max_max", "max pairwise cosine", geo["cosine_max"]),
        ("stable_rank_ratio_max", "stable rank / Gaussian's (median over layers)",
         geo["stable_rank_ratio_median"]),
        ("zero_shot_above_chance_points", "zero-shot minus chance (points)",
         {k: 100 * v for k, v in acc["zero_shot_above_chance"].items()}),
        ("zero_shot_chance_corrected", "zero-shot average, chance-corrected",
         acc["zero_shot_chance_corrected"]),
        ("expert_gain_points", "expert gain over zero-shot (points)",
         {k: 100 * v for k, v in acc["expert_gain"].items()}),
        ("expert_average_min", "expert average", acc["expert_average"]),
        ("other_tasks_kept_min", "expert on other tasks / zero-shot",
         acc["expert_on_other_tasks_vs_zero_shot"]),
        # the real figure is an aggregate over tasks (the 8-way average keeps 0.42 of the gap)
        ("single_gain_kept_min",
         f"one task vector at α={acc['single_alpha']}: own gain kept (mean over tasks)",
         sum(kept) / len(kept) if kept else None),
        ("simple_average_gap_closed", "simple average: gap closed",
         acc["simple_average_gap_closed"]),
        ("simple_average_of_expert", "simple average / expert average",
         _ratio(acc, "simple_average")),
        ("task_arithmetic_of_expert", "task arithmetic / expert average",
         _ratio(acc, "task_arithmetic")),
    ]
    for key, name, values in checks:
        if key not in t:  # not every statistic has a real reference for every track
            continue
        bound = t[key]
        if isinstance(bound, list):
            add(name, values, *bound)
        elif key.endswith("_max"):
            add(name, values, None, bound)
        else:
            add(name, values, bound, None)
    return rows


def _ratio(acc: dict, row: str) -> Optional[float]:
    tasks = list(acc["expert"])
    if not acc["expert_average"]:
        return None
    return (sum(acc[row][t] for t in tasks) / len(tasks)) / acc["expert_average"]


# --- the command ----------------------------------------------------------------------------------


def regime_statistics(models: TrackModels, settings: dict, progress: bool = True) -> dict:
    vectors = task_vectors(models)
    alphas = {"single": settings["single_alpha"],
              "task_arithmetic": settings["task_arithmetic_lambda"]}
    table = accuracies(models, vectors, alphas, progress)
    stats = {
        "tasks": models.tasks,
        "chance": models.chance,
        "info": models.info,
        "accuracy_table": table,
        "accuracy": summarize(models, table, alphas),
        "geometry": geometry(models, vectors),
    }
    stats["targets"] = check_targets(stats, settings["targets"])
    return stats


def markdown(stats: dict, title: str) -> str:
    tasks = stats["tasks"]
    acc, geo = stats["accuracy"], stats["geometry"]
    pct = lambda v: "" if v is None else f"{100 * v:.1f}"  # noqa: E731
    lines = [f"# {title}", ""]
    if "provenance" in stats:
        from ..provenance import markdown_lines

        lines += [*markdown_lines(stats["provenance"]),
                  f"- track content hash: `{stats['info'].get('content_hash')}`", ""]
    lines += ["## Against the real regime", "",
             "| statistic | measured (worst) | allowed | ok |", "|---|---|---|---|"]
    for row in stats["targets"]:
        allowed = ("≥ " + _fmt(row["min"]) if row["max"] is None else
                   "≤ " + _fmt(row["max"]) if row["min"] is None else
                   f"{_fmt(row['min'])} … {_fmt(row['max'])}")
        lines.append(f"| {row['target']} | {_fmt(row['worst'])} | {allowed} | "
                     f"{'yes' if row['ok'] else '**no**'} |")
    lines += ["", "## Accuracy (%)", "", "| model | " + " | ".join(tasks) + " | avg |",
              "|" + "---|" * (len(tasks) + 2)]
    rows = [("chance", stats["chance"]), ("zero-shot", acc["zero_shot"]),
            ("expert (own task)", acc["expert"]),
            (f"one τ at α={acc['single_alpha']}", {t: stats["accuracy_table"][f"single/{t}"][t]
                                                   for t in tasks}),
            ("simple average", acc["simple_average"]),
            (f"task arithmetic λ={acc['task_arithmetic_lambda']}", acc["task_arithmetic"])]
    for name, row in rows:
        cells = " | ".join(pct(row[t]) for t in tasks)
        lines.append(f"| {name} | {cells} | {pct(sum(row[t] for t in tasks) / len(tasks))} |")
    lines += ["", "Experts on every task (row: expert, column: task):", "",
              "| expert | " + " | ".join(tasks) + " |", "|" + "---|" * (len(tasks) + 1)]
    for t in tasks:
        lines.append(f"| {t} | " + " | ".join(pct(stats["accuracy_table"][f"expert/{t}"][s])
                                              for s in tasks) + " |")
    lines += [
        "",
        f"- zero-shot chance-corrected average: {pct(acc['zero_shot_chance_corrected'])} %",
        f"- gap closed: simple average {pct(acc['simple_average_gap_closed'])} %, task arithmetic "
        f"(λ={acc['task_arithmetic_lambda']}) {pct(acc['task_arithmetic_gap_closed'])} %",
        "",
        "## Task vectors",
        "",
        "| task | ‖τ‖/‖θ₀‖ (%) | block max (%) | share in biases/norms (%) | own gain kept at α |",
        "|---|---|---|---|---|",
    ]
    for t in tasks:
        block_max = max(b[t] for b in geo["relative_norm_per_block"].values())
        lines.append(f"| {t} | {100 * geo['relative_norm'][t]:.2f} | {100 * block_max:.2f} | "
                     f"{pct(geo['one_d_share_of_task_vector'][t])} | "
                     f"{pct(acc['single_gain_kept'][t])} |")
    lines += [
        "",
        f"- per block: median {100 * geo['relative_norm_block_median']:.2f} %, max "
        f"{100 * geo['relative_norm_block_max']:.2f} %; biases and norms hold "
        f"{pct(geo['one_d_share_of_pretrained'])} % of ‖θ₀‖²",
        f"- norm spread across tasks (max/min): whole model {geo['norm_spread']:.2f}, per layer "
        f"(median) {geo['layer_norm_spread_median']:.2f}",
        f"- pairwise cosine, whole model: mean {geo['cosine_mean']:.3f}, max "
        f"{geo['cosine_max']:.3f}; per layer: mean {geo['layer_cosine_mean']:.3f}, max "
        f"{geo['layer_cosine_max']:.3f}",
        f"- task matrices: stable rank / a Gaussian's (median over layers) "
        f"{geo['stable_rank_ratio_median']:.2f}; energy in the top 10 % singular values "
        f"{pct(geo['top10_energy_median'])} % "
        f"(Gaussian {pct(geo['gaussian_top10_energy_median'])} %)",
        "",
        "| block | " + " | ".join(tasks) + " |", "|" + "---|" * (len(tasks) + 1),
    ]
    for block, values in geo["relative_norm_per_block"].items():
        lines.append(f"| {block} | " + " | ".join(f"{100 * values[t]:.2f}" for t in tasks) + " |")
    return "\n".join(lines) + "\n"


def _fmt(value) -> str:
    if value is None:
        return "–"
    return f"{value:.3g}"


def _mean(values) -> Optional[float]:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def _median(values) -> Optional[float]:
    values = sorted(v for v in values if v is not None)
    if not values:
        return None
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else 0.5 * (values[mid - 1] + values[mid])


def write_report(stats: dict, out_dir: Path, title: str) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "regime.json").write_text(json.dumps(stats, indent=1))
    (out_dir / "regime.md").write_text(markdown(stats, title))
