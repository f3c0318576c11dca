"""The embedded offline benchmark: small CLIP-ViT and GPT-2 pools built from nothing.

``python -m fusion_bench_ace.mini build`` builds both tracks (idempotent); the FusionBench configs
``modelpool=ace_mini_clip taskpool=ace_mini_clip`` and ``modelpool=ace_mini_gpt2
taskpool=ace_mini_gpt2`` then load them through FusionBench's own pool classes from local paths.

Each track is a module exposing ``build(out_dir: Path, settings: dict, progress: bool) -> dict``
(the dict goes into the manifest). Its numbers (sizes, steps, learning rates, seed) live in
``config/mini/<track>.yaml`` under ``full`` and ``reduced``; the built directory's name carries the
track version and a hash of those settings, so changing either rebuilds.
"""

from __future__ import annotations

import hashlib
import importlib
import json
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
    default_size,
    is_built,
)


@dataclass(frozen=True)
class Track:
    module: str
    version: int
    """Bump when the builder's code changes what it writes."""
    description: str


TRACKS: Dict[str, Track] = {
    "clip": Track("fusion_bench_ace.mini.clip", 1, "CLIP ViT image classification (8 tasks)"),
    "gpt2": Track("fusion_bench_ace.mini.gpt2", 1, "GPT-2 text classification (GLUE-like tasks)"),
}


class NotBuiltError(FileNotFoundError):
    pass


def settings(track: str, size: Optional[str] = None) -> dict:
    """The build settings of ``track`` at ``size`` (``full``/``reduced``), from config/mini/."""
    _check_track(track)
    size = size or default_size()
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}: expected one of {SIZES}")
    import yaml

    data = yaml.safe_load((config_dir() / "mini" / f"{track}.yaml").read_text())
    return {"seed": data["seed"], **data[size]}


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
) -> List[Path]:
    """Build the given tracks (default: all) unless already built; return their directories."""
    size = size or default_size()
    built = []
    for name in tracks or TRACKS:
        _check_track(name)
        module = importlib.import_module(TRACKS[name].module)
        config = settings(name, size)
        directory = track_dir(name, size)
        print(f"[fusion_bench_ace.mini] track '{name}' ({size}) -> {directory}")

        def run(out_dir: Path, module=module, config=config, name=name) -> dict:
            extra = module.build(out_dir, config, progress=progress)
            return {"track": name, "size": size, "version": TRACKS[name].version,
                    "settings": config, **extra}

        built.append(build_atomically(directory, run, force=force))
    return built


def _check_track(track: str) -> None:
    if track not in TRACKS:
        raise ValueError(f"unknown track {track!r}: expected one of {sorted(TRACKS)}")


__all__ = [
    "SIZE_ENV", "TRACKS", "NotBuiltError", "build", "cache_root", "settings", "track_dir",
    "track_path",
]
