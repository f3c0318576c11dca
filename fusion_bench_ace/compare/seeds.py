"""One comparison per build seed of an embedded track, and the table of their spread.

``python -m fusion_bench_ace.compare run mini_clip --seeds 0,1,2`` builds the track from each seed
(``$FUSION_BENCH_ACE_MINI_SEED``: a different pretraining, experts and data draw), runs every
method on each through :func:`~fusion_bench_ace.compare.runner.run_comparison` into
``seed_<s>/``, and writes ``table.md``/``table.csv`` with the mean ± sample standard deviation
per method and task. The seeds move every method together (a track whose zero-shot model happens
to be strong on a task lifts every merge on it), so the table also gives, per seed, each
method's average, its share of the zero-shot→expert gap, and the paired difference to the next
method in the ranking: an ordering is stated only where that difference has the same sign on
every seed and exceeds its own spread. ``python -m fusion_bench_ace.compare spread DIR`` rewrites
the tables of such a run from its seeds' results (no method is run again).
"""

from __future__ import annotations

import csv
import json
import os
import statistics
from contextlib import contextmanager
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence

from .. import provenance
from ..mini.cache import SEED_ENV
from .benchmarks import load_benchmark
from .launchers import Launcher
from .runner import new_run_dir, point_latest, run_comparison


@contextmanager
def track_seed(seed: int) -> Iterator[None]:
    """Builds and ``fusion_bench`` runs started inside use the track built from ``seed``."""
    previous = os.environ.get(SEED_ENV)
    os.environ[SEED_ENV] = str(seed)
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(SEED_ENV, None)
        else:
            os.environ[SEED_ENV] = previous


def run_over_seeds(
    benchmark: str, methods: Optional[Sequence[str]], seeds: Sequence[int], out: Path,
    argv: Sequence[str], *, launcher: Optional[Launcher] = None, rerun: bool = False, log=print,
) -> Path:
    spec = load_benchmark(benchmark)
    if not spec.get("track"):
        raise ValueError(f"--seeds needs an embedded-track benchmark; {benchmark!r} has no track")
    if len(set(seeds)) != len(seeds) or not seeds:
        raise ValueError(f"--seeds must be distinct integers; got {list(seeds)}")
    run_dir = new_run_dir(out)
    info = provenance.collect(" ".join(["python -m fusion_bench_ace.compare", *argv]))
    per_seed = {}
    for seed in seeds:
        log(f"[compare] {benchmark}, track seed {seed}")
        with track_seed(seed):  # the jobs of all seeds in out/jobs: a rerun reuses them
            seed_dir = run_comparison(benchmark, methods, run_dir / f"seed_{seed}", argv,
                                      launcher=launcher, rerun=rerun, jobs_root=out / "jobs",
                                      log=log)
        per_seed[seed] = seed_dir
    write_spread(run_dir, spec, per_seed, info)
    point_latest(out, run_dir)
    log((run_dir / "table.md").read_text())
    return run_dir


def rewrite_spread(run_dir: Path, argv: Sequence[str]) -> Path:
    """The tables of a ``run --seeds`` directory, again, from its ``seed_<s>/latest`` results."""
    run_dir = Path(run_dir)
    path = run_dir / "provenance.json"
    if not path.is_file() or "seeds" not in (info := json.loads(path.read_text())):
        raise ValueError(f"{run_dir} is not a directory written by `compare run --seeds`")
    per_seed = {int(s): run_dir / entry["run"] for s, entry in info["seeds"].items()}
    missing = [str(p) for p in per_seed.values() if not (p / "table.csv").is_file()]
    if missing:
        raise ValueError(f"missing per-seed results: {missing}")
    spec = load_benchmark(info["benchmark"]["name"])
    info["tables_rewritten"] = provenance.collect(
        " ".join(["python -m fusion_bench_ace.compare", *argv]))
    write_spread(run_dir, spec, per_seed, info)
    return run_dir


def read_csv(path: Path) -> Dict[str, Dict[str, str]]:
    """A comparison's rows by method: the raw scores (its normalised rows repeat the names)."""
    with open(path) as handle:
        return {row["method"]: row for row in csv.DictReader(handle)
                if row.get("scale", "raw") == "raw"}


def spread(values: List[float]) -> tuple:
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else 0.0)


def paired_lines(tables: Dict[int, Dict[str, Dict[str, str]]], methods: List[str]) -> List[str]:
    """Averages per seed, gap closed, and the paired difference to the next-ranked method."""
    seeds = list(tables)
    average = {m: [float(tables[s][m]["average"]) for s in seeds] for m in methods
               if all(tables[s].get(m, {}).get("average") not in ("", None) for s in seeds)}
    ranked = sorted(average, key=lambda m: -statistics.fmean(average[m]))
    has_gap = {"pretrained", "individual"} <= set(average) and all(
        a != b for a, b in zip(average["individual"], average["pretrained"]))
    lines = [
        "## Averages per seed, and which differences exceed the spread",
        "",
        "Methods by mean average. `gap closed`: (method − pretrained) / (individual − pretrained) "
        "on the same seed. `− next`: this row's average minus the next row's, seed by seed (the "
        "same track, so what the seeds share cancels), mean ± std; **ordered** when it has one "
        "sign on every seed and its mean exceeds its standard deviation.",
        "",
        "| method | " + " | ".join(f"seed {s}" for s in seeds)
        + " | mean ± std | gap closed | − next | ordered |",
        "|" + "---|" * (len(seeds) + 5),
    ]
    for i, method in enumerate(ranked):
        cells = [f"{v:.1f}" for v in average[method]]
        mean, std = spread(average[method])
        gap = "–"
        if has_gap:
            closed = [(a - p) / (e - p) for a, p, e in
                      zip(average[method], average["pretrained"], average["individual"])]
            gap = "{:.0f} ± {:.0f} %".format(*(100 * x for x in spread(closed)))
        diff, ordered = "–", ""
        if i + 1 < len(ranked):
            deltas = [a - b for a, b in zip(average[method], average[ranked[i + 1]])]
            d_mean, d_std = spread(deltas)
            diff = f"{d_mean:+.1f} ± {d_std:.1f}"
            one_sign = all(d > 0 for d in deltas) or all(d < 0 for d in deltas)
            ordered = "**ordered**" if one_sign and abs(d_mean) > d_std else "no"
        lines.append(f"| {method} | " + " | ".join(cells)
                     + f" | {mean:.1f} ± {std:.1f} | {gap} | {diff} | {ordered} |")
    return lines


def write_spread(run_dir: Path, spec: dict, per_seed: Dict[int, Path], info: dict):
    tasks = spec["tasks"]
    tables = {seed: read_csv(path / "table.csv") for seed, path in per_seed.items()}
    methods = [m for m, row in next(iter(tables.values())).items() if row["source"] == "measured"]
    columns = [*tasks, "average"]
    stats: Dict[str, Dict[str, tuple]] = {}
    for method in methods:
        stats[method] = {}
        for column in columns:
            values = [tables[s].get(method, {}).get(column, "") for s in tables]
            if all(v not in ("", None) for v in values):
                stats[method][column] = spread([float(v) for v in values])
    hashes = {}
    for seed, path in per_seed.items():
        manifest = json.loads((path / "provenance.json").read_text()).get("track_manifest") or {}
        hashes[seed] = manifest.get("content_hash")

    with open(run_dir / "table.csv", "w", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(["method", *(f"{c}_{k}" for c in columns for k in ("mean", "std"))])
        for method in methods:
            writer.writerow([method, *(f"{stats[method][c][i]:.4f}" if c in stats[method] else ""
                                       for c in columns for i in (0, 1))])
    info = {**info, "benchmark": spec,
            "seeds": {str(s): {"run": str(p.relative_to(run_dir)),
                               "track_content_hash": hashes[s]} for s, p in per_seed.items()}}
    (run_dir / "provenance.json").write_text(json.dumps(info, indent=1))
    cell = lambda m, c: (f"{stats[m][c][0]:.1f} ± {stats[m][c][1]:.1f}"  # noqa: E731
                         if c in stats[m] else "–")
    header = ["method", *tasks, "avg"]
    lines = [
        f"# {spec['name']}: {spec.get('description', '')}, over {len(per_seed)} track seeds",
        "",
        f"- command: `{info['command']}`",
        f"- date (UTC): {info['date_utc']}; commit {info['git_commit']}"
        + (" (with uncommitted changes)" if info["git_dirty"] else ""),
        f"- machine: {info['machine']['cpu']} ({info['machine']['cpu_count']} cores, "
        f"{info['machine']['memory']})",
        "- seeds (track content hash): " + ", ".join(
            f"{s} (`{(hashes[s] or '?')[:12]}`)" for s in per_seed),
        *([f"- tables rewritten from the seeds' results by "
           f"`{info['tables_rewritten']['command']}` at commit "
           f"{info['tables_rewritten']['git_commit']}"] if "tables_rewritten" in info else []),
        "",
        "Accuracy in %, mean ± sample standard deviation over the seeds; each seed's own table "
        "(with merge time and memory) is in `seed_<s>/latest/`.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for method in methods:
        lines.append("| " + " | ".join([method, *(cell(method, c) for c in columns)]) + " |")
    lines += ["", *paired_lines(tables, methods)]
    (run_dir / "table.md").write_text("\n".join(lines) + "\n")
