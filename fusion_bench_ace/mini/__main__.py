"""``python -m fusion_bench_ace.mini {build,status}``: build or inspect the embedded benchmark."""

from __future__ import annotations

import argparse
import json
import sys

from . import TRACKS, build, track_dir
from .cache import SIZES, is_built, read_manifest


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fusion_bench_ace.mini", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (("build", "build tracks that are not built yet"),
                            ("status", "show where each track is and whether it is built")):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--track", choices=[*TRACKS, "all"], default="all")
        p.add_argument("--size", choices=SIZES, default=None,
                       help="default: $FUSION_BENCH_ACE_MINI_SIZE or 'full'")
        if name == "build":
            p.add_argument("--force", action="store_true", help="rebuild even if built")
    args = parser.parse_args(argv)
    tracks = list(TRACKS) if args.track == "all" else [args.track]
    if args.command == "build":
        build(tracks, args.size, force=args.force)
        return 0
    for name in tracks:
        directory = track_dir(name, args.size)
        if is_built(directory):
            manifest = read_manifest(directory)
            summary = {k: manifest[k] for k in ("build_seconds", "metrics") if k in manifest}
            print(f"{name}: built at {directory}\n  {json.dumps(summary)}")
        else:
            print(f"{name}: not built ({directory})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
