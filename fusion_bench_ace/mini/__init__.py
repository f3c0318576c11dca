"""The embedded offline benchmark: small CLIP-ViT, GPT-2 and Llama pools built from nothing.

``python -m fusion_bench_ace.mini build`` builds every track (idempotent); the FusionBench configs
``modelpool=ace_mini_<track> taskpool=ace_mini_<track>`` (``clip``, ``gpt2``, ``llm``) then load
them through FusionBench's own pool classes from local paths.

Each track is a module exposing ``build(out_dir: Path, settings: dict, progress: bool) -> dict``
(the dict goes into the manifest). Its numbers (sizes, steps, learning rates, seed) live in
``config/mini/<track>.yaml`` under ``full`` and ``reduced``; the built directory's name carries the
track version and a hash of those settings, so changing either rebuilds.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Optional

from ..paths import config_dir
from .cache import (
    BUILD_COMMAND,
    SIZE_ENV,
    SIZES,
    build_atomically,
    cache_root,
    content_hash,
    default_size,
    is_built,
    seed_override,
)
from .determinism import PINNED_INSTRUCTION_SETS


@dataclass(frozen=True)
class Track:
    module: str
    version: int
    """Bump when the builder's code changes what it writes."""
    description: str


TRACKS: Dict[str, Track] = {
    "clip": Track("fusion_bench_ace.mini.clip", 2, "CLIP ViT image classification (8 tasks)"),
    "gpt2": Track("fusion_bench_ace.mini.gpt2", 2, "GPT-2 text classification (GLUE-like tasks)"),
    "llm": Track("fusion_bench_ace.mini.llm", 2,
                 "Llama causal LM, 3 experts (multilingual, math, coding), greedy exact match"),
}


class NotBuiltError(FileNotFoundError):
    pass


def settings(track: str, size: Optional[str] = None) -> dict:
    """The build settings of ``track`` at ``size`` (``full``/``reduced``), from config/mini/;
    the seed is ``$FUSION_BENCH_ACE_MINI_SEED`` when set."""
    _check_track(track)
    size = size or default_size()
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}: expected one of {SIZES}")
    import yaml

    data = yaml.safe_load((config_dir() / "mini" / f"{track}.yaml").read_text())
    seed = seed_override()
    return {"seed": data["seed"] if seed is None else seed, **data[size]}


def track_dir(track: str, size: Optional[str] = None) -> Path:
    """Where ``track`` at ``size`` is (or will be) built."""
    size = size or default_size()
    config = settings(track, size)
    digest = hashlib.sha1(json.dumps(config, sort_keys=True).encode()).hexdigest()[:8]
    return cache_root() / f"{track}-v{TRACKS[track].version}-{size}-{digest}"


def track_path(track: str, relative: str = "", size: Optional[str] = None) -> str:
    """Absolute path of ``relative`` inside the built ``track``; a clear error if not built."""
    directory = track_dir(track, size)
    if not is_built(directory):
        size = size or default_size()
        flag = " --size reduced" if size == "reduced" else ""
        raise NotBuiltError(
            f"the embedded benchmark track '{track}' ({size}) is not built yet. Build it with\n"
            f"    {BUILD_COMMAND} --track {track}{flag}\n"
            f"(it is cached under {directory.parent}; set FUSION_BENCH_ACE_CACHE to move it)"
        )
    return str(directory / relative) if relative else str(directory)


def build(
    tracks: Optional[Iterable[str]] = None,
    size: Optional[str] = None,
    *,
    force: bool = False,
    progress: bool = True,
    jobs: Optional[int] = None,
) -> List[Path]:
    """Build the given tracks (default: all) unless already built; return their directories.

    Each track is built in a child process whose environment pins the instruction sets
    (:data:`~fusion_bench_ace.mini.determinism.PINNED_INSTRUCTION_SETS`) and which trains on one
    thread, so the bytes do not depend on the machine; up to ``jobs`` tracks (default: one per
    CPU core) build at once. The manifest records a content hash of what was built.
    """
    size = size or default_size()
    names = list(tracks or TRACKS)
    for name in names:
        _check_track(name)
    jobs = max(1, min(jobs or os.cpu_count() or 1, len(names)))

    def build_one(name: str) -> Path:
        config = settings(name, size)
        directory = track_dir(name, size)

        def run(out_dir: Path) -> dict:
            print(f"[fusion_bench_ace.mini] building track '{name}' ({size}) -> {directory}")
            extra = build_in_child(name, size, out_dir, progress)
            return {"track": name, "size": size, "version": TRACKS[name].version,
                    "settings": config, **extra, "content_hash": content_hash(out_dir)}

        return build_atomically(directory, run, force=force)

    with ThreadPoolExecutor(max_workers=jobs) as pool:  # each thread waits on a child process
        return list(pool.map(build_one, names))


def build_in_child(track: str, size: str, out_dir: Path, progress: bool) -> dict:
    """Run ``TRACKS[track]``'s builder in a fresh interpreter with the pinned instruction sets;
    return what it reports for the manifest."""
    report = out_dir / ".build_report.json"
    command = [sys.executable, "-m", "fusion_bench_ace.mini", "build-here", "--track", track,
               "--size", size, "--out", str(out_dir), "--report", str(report)]
    if not progress:
        command.append("--quiet")
    env = {**os.environ, **PINNED_INSTRUCTION_SETS, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    completed = subprocess.run(command, env=env)
    if completed.returncode != 0:
        raise RuntimeError(
            f"building track '{track}' ({size}) failed (exit {completed.returncode})")
    extra = json.loads(report.read_text())
    report.unlink()
    return extra


def build_here(track: str, size: str, out_dir: Path, progress: bool) -> dict:
    """The track's builder in this process (what :func:`build_in_child` runs)."""
    module = importlib.import_module(TRACKS[track].module)
    return module.build(Path(out_dir), settings(track, size), progress=progress)


def load_for_stats(track: str, size: Optional[str] = None):
    """The built ``track`` as :class:`fusion_bench_ace.mini.stats.TrackModels`."""
    module = importlib.import_module(TRACKS[track].module)
    return module.load_for_stats(Path(track_path(track, size=size)))


def _check_track(track: str) -> None:
    if track not in TRACKS:
        raise ValueError(f"unknown track {track!r}: expected one of {sorted(TRACKS)}")


__all__ = [
    "SIZE_ENV", "TRACKS", "NotBuiltError", "build", "cache_root", "settings", "track_dir",
    "track_path",
]
