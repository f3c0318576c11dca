"""``fusion-bench-ace``: the project's entry point.

- ``demo``: build the embedded CLIP and GPT-2 tracks and compare ACE-Merging with the
  pretrained model, the individual experts and FusionBench's Task Arithmetic, TIES and TSV-M;
- ``build`` / ``status``: the embedded benchmark (same as ``python -m fusion_bench_ace.mini``);
- ``compare``: the comparison runner (same as ``python -m fusion_bench_ace.compare``).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

DEMO_BENCHMARKS = ("mini_clip", "mini_gpt2")


def demo(out: Path, benchmarks) -> int:
    from .compare import run_comparison
    from .compare.benchmarks import load_benchmark
    from .mini import build

    start = time.perf_counter()
    tracks = [load_benchmark(b).get("track") for b in benchmarks]
    build([t for t in tracks if t])  # the benchmarks' tracks, each only if not built yet
    for benchmark in benchmarks:
        run_comparison(
            benchmark, None, out / benchmark, ["run", benchmark, "--out", str(out / benchmark)]
        )
    minutes = (time.perf_counter() - start) / 60
    print(
        f"\n[demo] done in {minutes:.1f} min; tables, plots and reports under "
        f"{out}/<benchmark>/latest/"
    )
    return 0


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("build", "status"):
        from .mini.__main__ import main as mini_main

        return mini_main(argv)
    if argv and argv[0] == "compare":
        from .compare.__main__ import main as compare_main

        return compare_main(argv[1:])
    parser = argparse.ArgumentParser(
        prog="fusion-bench-ace",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    run_demo = sub.add_parser("demo", help="build the embedded benchmark and compare the methods")
    run_demo.add_argument("--out", type=Path, default=Path("outputs/demo"))
    run_demo.add_argument("--benchmarks", default=",".join(DEMO_BENCHMARKS))
    sub.add_parser("build", help="build the embedded benchmark (see: fusion-bench-ace build -h)")
    sub.add_parser("status", help="where the embedded benchmark is and whether it is built")
    sub.add_parser("compare", help="the comparison runner (see: fusion-bench-ace compare -h)")
    args = parser.parse_args(argv)
    return demo(args.out, args.benchmarks.split(","))


if __name__ == "__main__":
    sys.exit(main())
