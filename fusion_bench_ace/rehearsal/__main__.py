"""``python -m fusion_bench_ace.rehearsal <benchmark> [--methods a,b] [--root DIR] [--out DIR]``.

Builds the benchmark's stand-ins (under ``--root``, default a temporary directory) and runs
``python -m fusion_bench_ace.compare run <benchmark>`` on them: a check, before a paper-scale run,
that this installation runs the benchmark end to end. The numbers mean nothing.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fusion_bench_ace.rehearsal",
                                     description=__doc__)
    parser.add_argument("benchmark")
    parser.add_argument("--methods",
                        help="comma-separated; default: the benchmark's default_methods")
    parser.add_argument("--root", type=Path, help="where the stand-ins go (kept); default: a "
                        "temporary directory, removed afterwards")
    parser.add_argument("--out", type=Path, help="default: outputs/rehearsal/<benchmark>")
    args = parser.parse_args(argv)

    from ..compare.__main__ import main as compare
    from ..environ import patched_environ
    from . import NotRehearsable, build_standins

    with tempfile.TemporaryDirectory(prefix="fusion_bench_ace_standins_") as temporary, \
            patched_environ(OFFLINE):
        root = args.root or Path(temporary)
        try:
            environment = build_standins(args.benchmark, root)
        except NotRehearsable as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        with patched_environ(environment):
            out = args.out or Path("outputs/rehearsal") / args.benchmark
            return compare(["run", args.benchmark, "--out", str(out),
                            *(["--methods", args.methods] if args.methods else [])])


if __name__ == "__main__":
    sys.exit(main())
