"""``python -m fusion_bench_ace.compare {run,sweep,spread,summarize-sweep,diagnostics,list}``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .benchmarks import available_benchmarks, load_benchmark
from .launchers import available_launchers, load_launcher
from .runner import new_run_dir, point_latest, run_comparison, run_sweep, summarize_sweep

JOBS_HELP = (
    "Every method (grid point) is a job in its own directory under <out>/jobs/; running the same "
    "command again reuses the jobs that finished."
)


def _add_job_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--launcher", nargs="+", metavar=("NAME", "KEY=VALUE"), default=["local"],
        help="where the jobs run: " + ", ".join(available_launchers())
        + " (config/launcher/NAME.yaml), then any of its options as key=value; default: local",
    )
    parser.add_argument("--rerun", action="store_true",
                        help="run every job again, even those that finished")


def _grid(items):
    grid = {}
    for item in items or []:
        key, _, values = item.partition("=")
        if not values:
            raise SystemExit(f"--grid expects key=v1,v2,...; got {item!r}")
        grid[key] = values.split(",")
    return grid


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m fusion_bench_ace.compare", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run methods on a benchmark and write its comparison table",
                         description=JOBS_HELP)
    run.add_argument("benchmark")
    run.add_argument("--methods", help="comma-separated; default: the benchmark's default_methods")
    run.add_argument("--out", type=Path, help="default: outputs/compare/<benchmark>")
    run.add_argument("--seeds", help="comma-separated track seeds (embedded tracks): one "
                     "comparison per seed and a table of mean ± std")
    _add_job_options(run)
    sweep = sub.add_parser("sweep", help="a grid of one method's settings: table + heatmap",
                           description=JOBS_HELP)
    sweep.add_argument("benchmark")
    sweep.add_argument(
        "--grid", nargs="*", help="key=v1,v2 ... (default: the benchmark's sweep grid)"
    )
    sweep.add_argument("--out", type=Path, help="default: outputs/compare/<benchmark>_sweep")
    sweep.add_argument("--validation", action="store_true", help="evaluate on the benchmark's "
                       "validation data (its `validation:` overrides), not its test data")
    _add_job_options(sweep)
    respread = sub.add_parser("spread", help="rewrite the mean ± std tables of a `run --seeds` "
                              "directory from its seeds' results (runs nothing)")
    respread.add_argument("run_dir", type=Path, help="the directory `run --seeds` wrote "
                          "(<out>/<timestamp> or <out>/latest)")
    summary = sub.add_parser(
        "summarize-sweep", help="table + heatmap of a multirun you ran yourself"
    )
    summary.add_argument("benchmark")
    summary.add_argument("jobs_dir", type=Path, help="the multirun's hydra.sweep.dir")
    summary.add_argument("--params", required=True, help="comma-separated swept override keys")
    summary.add_argument("--out", type=Path, required=True)
    plots = sub.add_parser("diagnostics", help="plot an ACE run's ace_diagnostics.json")
    plots.add_argument("json", type=Path, help="<the run's log_dir>/ace_diagnostics.json")
    plots.add_argument("--out", type=Path, help="default: beside the JSON file")
    sub.add_parser("list", help="list the benchmarks")
    args = parser.parse_args(argv)

    if args.command == "diagnostics":
        from .diagnostics import write_diagnostics

        for path in write_diagnostics(args.json, args.out):
            print(path)
        return 0
    if args.command == "list":
        for name in available_benchmarks():
            print(f"{name:<28} {load_benchmark(name).get('description', '')}")
        return 0
    if args.command in ("run", "sweep"):
        try:
            jobs = {"launcher": load_launcher(args.launcher[0], args.launcher[1:]),
                    "rerun": args.rerun}
        except ValueError as error:
            raise SystemExit(f"--launcher: {error}")
    if args.command == "run":
        methods = args.methods.split(",") if args.methods else None
        out = args.out or Path("outputs/compare") / args.benchmark
        if args.seeds:
            from .seeds import run_over_seeds

            seeds = [int(s) for s in args.seeds.split(",")]
            run_over_seeds(args.benchmark, methods, seeds, out, argv, **jobs)
        else:
            run_comparison(args.benchmark, methods, out, argv, **jobs)
        return 0
    if args.command == "spread":
        from .seeds import rewrite_spread

        print((rewrite_spread(args.run_dir, argv) / "table.md").read_text())
        return 0
    if args.command == "sweep":
        out = args.out or Path("outputs/compare") / f"{args.benchmark}_sweep"
        run_sweep(args.benchmark, _grid(args.grid), out, argv, validation=args.validation,
                  **jobs)
        return 0
    run_dir = new_run_dir(args.out)
    summarize_sweep(
        args.jobs_dir, load_benchmark(args.benchmark), args.params.split(","), run_dir, argv
    )
    point_latest(args.out, run_dir)
    print((run_dir / "table.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
