"""``python -m fusion_bench_ace.mini {build,status,stats}``: build, inspect or measure the embedded
benchmark."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from . import TRACKS, build, build_here, load_for_stats, settings, track_dir, track_path
from .cache import SEED_ENV, SIZES, is_built, read_manifest


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fusion_bench_ace.mini", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (("build", "build tracks that are not built yet"),
                            ("status", "show where each track is and whether it is built"),
                            ("stats", "regime statistics of built tracks (regime.md/.json)")):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--track", choices=[*TRACKS, "all"], default="all")
        p.add_argument("--size", choices=SIZES, default=None,
                       help="default: $FUSION_BENCH_ACE_MINI_SIZE or 'full'")
        p.add_argument("--seed", type=int, default=None,
                       help="default: $FUSION_BENCH_ACE_MINI_SEED or the config's seed")
        if name == "build":
            p.add_argument("--force", action="store_true", help="rebuild even if built")
            p.add_argument("--jobs", type=int, default=None,
                           help="tracks built at once (default: one per CPU core)")
        if name == "stats":
            p.add_argument("--out", type=Path, default=None,
                           help="where to write regime.md/.json (default: the track's directory)")
    # what `build` runs in a child process with the pinned instruction sets
    here = sub.add_parser("build-here", help=argparse.SUPPRESS)
    here.add_argument("--track", choices=list(TRACKS), required=True)
    here.add_argument("--size", choices=SIZES, required=True)
    here.add_argument("--out", type=Path, required=True)
    here.add_argument("--report", type=Path, required=True)
    here.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)

    if args.command == "build-here":
        extra = build_here(args.track, args.size, args.out, progress=not args.quiet)
        args.report.write_text(json.dumps(extra))
        return 0
    if args.seed is not None:  # read by settings(), here and in the build's child process
        os.environ[SEED_ENV] = str(args.seed)
    tracks = list(TRACKS) if args.track == "all" else [args.track]
    if args.command == "build":
        build(tracks, args.size, force=args.force, jobs=args.jobs)
        return 0
    if args.command == "stats":
        command = " ".join(["python -m fusion_bench_ace.mini", *(argv or sys.argv[1:])])
        return stats(tracks, args.size, args.out, command)
    for name in tracks:
        directory = track_dir(name, args.size)
        if is_built(directory):
            manifest = read_manifest(directory)
            summary = {k: manifest[k] for k in ("build_seconds", "content_hash", "metrics")
                       if k in manifest}
            print(f"{name}: built at {directory}\n  {json.dumps(summary)}")
        else:
            print(f"{name}: not built ({directory})")
    return 0


def stats(tracks, size, out, command: str) -> int:
    import yaml

    from .. import provenance
    from ..paths import config_dir
    from .stats import regime_statistics, write_report

    regime = yaml.safe_load((config_dir() / "mini" / "regime.yaml").read_text())
    for name in tracks:
        if name not in regime["targets"]:
            raise SystemExit(f"no regime statistics for track {name!r}: config/mini/regime.yaml "
                             f"has no reference ranges for it")
    failed = []
    for name in tracks:
        directory = Path(track_path(name, size=size))
        manifest = read_manifest(directory)
        result = regime_statistics(load_for_stats(name, size),
                                   {**regime, "targets": regime["targets"][name]})
        result["info"] = {"track": name, "directory": str(directory),
                          "content_hash": manifest.get("content_hash"),
                          "settings": settings(name, size)}
        result["provenance"] = provenance.collect(command)
        target = out / name if out and len(tracks) > 1 else (out or directory)
        write_report(result, Path(target), f"Regime statistics: track '{name}' "
                     f"({manifest.get('size')}, v{manifest.get('version')})")
        print((Path(target) / "regime.md").read_text())
        failed += [f"{name}: {row['target']}" for row in result["targets"] if not row["ok"]]
    if failed:
        print("outside the real regime:\n  " + "\n  ".join(failed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
