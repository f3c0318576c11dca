"""``python -m fusion_bench_ace.bench [--quick|--full|--tiny]``: run, print and save the report."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import List, Optional, Tuple

import torch

from .. import provenance
from ..paths import config_dir
from .layers import IMPLS, bench_model
from .memory import memory_curve, memory_worker
from .report import render
from .tracks import track_precision


def load_settings(path: Optional[str | Path] = None) -> Tuple[Path, dict]:
    """``(settings file, its contents)``; default: ``bench/ace.yaml`` of the package's configs."""
    from omegaconf import OmegaConf

    path = Path(path) if path else config_dir() / "bench" / "ace.yaml"
    return path, OmegaConf.to_container(OmegaConf.load(path), resolve=True)


def main(argv: Optional[List[str]] = None) -> dict:
    parser = argparse.ArgumentParser(
        prog="python -m fusion_bench_ace.bench",
        description="Speed and memory benchmark of ACE-Merging",
    )
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "--quick",
        dest="mode",
        action="store_const",
        const="quick",
        help="default: ViT-B/32 x 8 all implementations, larger models ours+floor",
    )
    group.add_argument(
        "--full",
        dest="mode",
        action="store_const",
        const="full",
        help="8, 14, 20 tasks everywhere (long)",
    )
    group.add_argument(
        "--memory",
        dest="mode",
        action="store_const",
        const="memory",
        help="the memory curve alone, with GPT-2-small-sized experts",
    )
    group.add_argument(
        "--tiny", dest="mode", action="store_const", const="tiny", help="tiny shapes, for tests"
    )
    parser.add_argument(
        "--config",
        default=None,
        help="settings file (default: bench/ace.yaml of the package's configs)",
    )
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: config)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: config)")
    parser.add_argument("--repeats", type=int, default=None, help="override every run's repeats")
    parser.add_argument("--out", default=None, help="output folder (default: config's out)")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory-vs-T curve")
    parser.add_argument(
        "--no-tracks", action="store_true", help="skip float32-vs-float64 on the embedded tracks"
    )
    parser.add_argument(
        "--memory-worker", nargs=3, metavar=("ROOT", "T", "STREAMING"), help=argparse.SUPPRESS
    )
    args = parser.parse_args(argv)
    config_path, config = load_settings(args.config)
    settings = {k: config[k] for k in ("eps", "tau", "k_frac", "seed", "threads")}
    if args.threads is not None:
        settings["threads"] = args.threads
    torch.set_num_threads(settings["threads"])
    if args.memory_worker:
        root, num_tasks, streaming = args.memory_worker
        print(json.dumps(memory_worker(root, int(num_tasks), streaming, settings)))
        return {}

    mode = args.mode or "quick"
    device = torch.device(args.device or config["device"])
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda asked for but CUDA is not available")
    spec = config["modes"][mode]
    argv_used = sys.argv[1:] if argv is None else list(argv)
    header = {
        "mode": mode,
        **provenance.collect(
            " ".join(["python -m fusion_bench_ace.bench", *argv_used]).strip(), str(device)
        ),
        "config": str(config_path),
        "threads": settings["threads"],
        "device": str(device),
        "load_start": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        **{k: settings[k] for k in ("eps", "tau", "k_frac")},
    }
    print(
        f"ACE benchmark ({mode}) on {header['machine']['cpu']}, threads "
        f"{settings['threads']}, device {device}, load {header['load_start']}",
        flush=True,
    )
    runs = []
    with torch.no_grad():
        for run in spec["runs"]:
            impls = [i for i in run["impls"] if i in IMPLS]
            repeats = args.repeats or run["repeats"]
            excluded = set(run.get("exclude", ()))
            shapes = [s for s in config["models"][run["model"]] if s[0] not in excluded]
            label = run["model"] + (f" (without {', '.join(sorted(excluded))})" if excluded else "")
            for num_tasks in run["tasks"]:
                runs.append(bench_model(label, shapes, num_tasks, impls, repeats, settings, device))
        tracks = [] if args.no_tracks else [
            track_precision(track, preset, device) for track, preset in spec["tracks"].items()
        ]
    memory = [] if args.no_memory else memory_curve(spec["memory"], settings)
    header["load_end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    report = {"header": header, "runs": runs, "tracks": tracks, "memory": memory,
              "memory_spec": spec["memory"]}
    text = render(report)
    print()
    print(text)
    out = Path(args.out or config["out"]).resolve()  # relative to the working directory
    out.mkdir(parents=True, exist_ok=True)
    (out / f"ace_bench_{mode}.md").write_text(text)
    (out / f"ace_bench_{mode}.json").write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {out / f'ace_bench_{mode}.md'} and .json")
    return report
