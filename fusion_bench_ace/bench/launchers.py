"""Wall time of a comparison sweep through different launchers, on this machine.

``python -m fusion_bench_ace.bench.launchers [--benchmark mini_gpt2] [--launchers local
local_parallel] [--grid key=v1,v2 ...] [--out results/perf/launchers] [--scratch DIR]`` runs
``compare sweep <benchmark>`` (its default grid unless ``--grid``) once per launcher, each into a
fresh output directory (so no job is reused), and writes ``<out>/<benchmark>_sweep.md`` and
``.json``: per launcher the wall time, the CPU time its jobs used (their processes' user + system
time), the load average before and after (other users of a shared machine slow every job down),
and whether its table has the same scores, cell for cell, as the first launcher's.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import List, Optional, Sequence

from .. import provenance


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _score_cells(run_dir: Path) -> List[dict]:
    """Every column of the table but the cost ones (merge time, memory: they vary run to run)."""
    with open(run_dir / "table.csv") as handle:
        rows = list(csv.DictReader(handle))
    cost = {"merge_seconds", "peak_rss_mib", "peak_cuda_mib"}
    return [{k: v for k, v in row.items() if k not in cost} for row in rows]


def measure(benchmark: str, launchers: Sequence[str], scratch: Path, grid: Optional[dict] = None,
            log=print) -> List[dict]:
    from ..compare import run_sweep
    from ..compare.launchers import load_launcher

    runs = []
    for spec in launchers:
        name, *options = spec.split(":")
        launcher = load_launcher(name, options)
        out = scratch / f"{benchmark}_sweep_{name}"
        if out.exists():
            raise FileExistsError(f"{out} exists: pass an empty --scratch")
        log(f"[bench] compare sweep {benchmark} --launcher {' '.join([name, *options])}")
        load_before = os.getloadavg()
        cpu_before = _children_cpu_s()
        start = time.perf_counter()
        argv = ["sweep", benchmark, *(["--grid", *(f"{k}={','.join(v)}" for k, v in grid.items())]
                                      if grid else []), "--launcher", name, *options]
        run_dir = run_sweep(benchmark, grid or {}, out, argv, launcher=launcher, log=log)
        wall = time.perf_counter() - start
        runs.append({
            "launcher": launcher.config, "wall_s": wall, "jobs_cpu_s": _children_cpu_s() -
            cpu_before, "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
            "table": str(run_dir), "cells": _score_cells(run_dir),
            "jobs": len(json.loads((run_dir / "provenance.json").read_text())["jobs"]),
        })
        log(f"[bench]   {wall:.0f} s")
    return runs


def render(benchmark: str, runs: List[dict], info: dict) -> str:
    first = runs[0]
    lines = [
        f"# `compare sweep {benchmark}`: wall time per launcher",
        "",
        *provenance.markdown_lines(info),
        "- environment: " + (", ".join(f"`{k}={v}`" for k, v in info["environment"].items()
                                       if k.startswith("FUSION_BENCH_ACE_")) or "none set"),
        "- the machine is shared with other users: the load average (1, 5, 15 min) before and "
        "after each run says how busy it was; every job ran under that contention",
        "",
        "| launcher | jobs | wall s | speed-up | jobs' CPU s | CPU s / wall s | load before | "
        "load after | same scores as first |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        options = {k: v for k, v in run["launcher"].items() if k not in ("name", "_target_")}
        label = f"{run['launcher']['name']} ({', '.join(f'{k}={v}' for k, v in options.items())})"
        lines.append(
            f"| {label} | {run['jobs']} | {run['wall_s']:.0f} | "
            f"{first['wall_s'] / run['wall_s']:.2f}x | {run['jobs_cpu_s']:.0f} | "
            f"{run['jobs_cpu_s'] / run['wall_s']:.2f} | "
            + " / ".join(f"{x:.1f}" for x in run["loadavg_before"]) + " | "
            + " / ".join(f"{x:.1f}" for x in run["loadavg_after"]) + " | "
            + ("yes" if run["cells"] == first["cells"] else "**no**") + " |"
        )
    lines += [
        "",
        "`jobs' CPU s`: user + system time of the `fusion_bench` processes; `CPU s / wall s`: how "
        "many cores the jobs kept busy on average. `same scores`: every cell of `table.csv` but "
        "merge time and memory equal to the first launcher's.",
        "",
    ]
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fusion_bench_ace.bench.launchers",
                                     description=__doc__)
    parser.add_argument("--benchmark", default="mini_gpt2")
    parser.add_argument("--launchers", nargs="+", default=["local", "local_parallel"],
                        help="NAME or NAME:key=value:... (config/launcher/NAME.yaml)")
    parser.add_argument("--out", type=Path, default=Path("results/perf/launchers"))
    parser.add_argument("--scratch", type=Path, help="where the sweeps write (default: a temp dir)")
    parser.add_argument("--grid", nargs="*", help="key=v1,v2 ... (default: the benchmark's grid)")
    args = parser.parse_args(argv)
    command = " ".join(["python -m fusion_bench_ace.bench.launchers", *(argv or sys.argv[1:])])
    info = provenance.collect(command)
    with tempfile.TemporaryDirectory() as temporary:
        grid = {k: v.split(",") for k, _, v in (item.partition("=") for item in args.grid or [])}
        runs = measure(args.benchmark, args.launchers, args.scratch or Path(temporary), grid)
    args.out.mkdir(parents=True, exist_ok=True)
    report = render(args.benchmark, runs, info)
    (args.out / f"{args.benchmark}_sweep.md").write_text(report)
    (args.out / f"{args.benchmark}_sweep.json").write_text(
        json.dumps({**info, "runs": runs}, indent=1))
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
