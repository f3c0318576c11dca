"""Where built tracks of the embedded benchmark live, and building them atomically.

Layout: one directory per built track (named by :func:`fusion_bench_ace.mini.track_dir`: track,
builder version, size, hash of the settings) under the cache root, holding the track's files and
a ``manifest.json`` written last. The cache root is ``$FUSION_BENCH_ACE_CACHE`` if set, else
``$XDG_CACHE_HOME/fusion_bench_ace`` (``~/.cache/fusion_bench_ace``). A track is rebuilt only
when its directory is missing, i.e. when absent or when the builder's version or settings
changed.

A build writes into a temporary sibling directory under an exclusive lock and is renamed into
place only when complete, so an interrupted build (Ctrl-C, crash) never leaves a half-built pool
that looks finished; leftovers are removed by the next build. Standard library only.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

CACHE_ENV = "FUSION_BENCH_ACE_CACHE"
SIZE_ENV = "FUSION_BENCH_ACE_MINI_SIZE"
SIZES = ("full", "reduced")
SEED_ENV = "FUSION_BENCH_ACE_MINI_SEED"
"""Builds a track from another seed than its config's (for the spread across seeds)."""
MANIFEST = "manifest.json"
BUILD_COMMAND = "python -m fusion_bench_ace.mini build"


def cache_root() -> Path:
    explicit = os.environ.get(CACHE_ENV)
    if explicit:
        return Path(explicit).expanduser().resolve()
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(xdg).resolve() / "fusion_bench_ace"


def default_size() -> str:
    size = os.environ.get(SIZE_ENV, "full")
    if size not in SIZES:
        raise ValueError(f"{SIZE_ENV}={size!r}: expected one of {SIZES}")
    return size


def seed_override() -> int | None:
    seed = os.environ.get(SEED_ENV)
    if seed is None or seed == "":
        return None
    try:
        return int(seed)
    except ValueError:
        raise ValueError(f"{SEED_ENV}={seed!r}: expected an integer") from None


def is_built(directory: Path) -> bool:
    return (directory / MANIFEST).is_file()


def read_manifest(directory: Path) -> dict:
    return json.loads((directory / MANIFEST).read_text())


NOT_CONTENT = (MANIFEST, "regime.json", "regime.md", ".build_report.json")
"""Files of a track directory that describe it rather than being it."""


def content_hash(directory: Path) -> str:
    """SHA-256 over every file of a built track (relative path and bytes), but the manifest and
    reports: two builds are the same track exactly when their hashes are equal."""
    directory = Path(directory)
    digest = hashlib.sha256()
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        relative = path.relative_to(directory).as_posix()
        if relative in NOT_CONTENT:
            continue
        digest.update(relative.encode() + b"\0")
        with open(path, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


@contextmanager
def _exclusive_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def build_atomically(
    directory: Path,
    build: Callable[[Path], dict],
    *,
    force: bool = False,
    log: Callable[[str], None] = print,
) -> Path:
    """Run ``build(tmp_dir) -> manifest`` unless ``directory`` is already built; rename into place.

    ``force`` rebuilds and replaces an existing build (the old one is removed only after the new
    one is complete).
    """
    with _exclusive_lock(directory.parent / f".{directory.name}.lock"):
        if is_built(directory) and not force:
            return directory
        for stale in directory.parent.glob(f".{directory.name}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = directory.parent / f".{directory.name}.tmp-{os.getpid()}"
        tmp.mkdir(parents=True)
        started = time.time()
        try:
            manifest = dict(build(tmp))
            manifest["build_seconds"] = round(time.time() - started, 1)
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
            if directory.exists():
                retired = directory.parent / f".{directory.name}.tmp-old-{os.getpid()}"
                directory.rename(retired)
                tmp.rename(directory)
                shutil.rmtree(retired, ignore_errors=True)
            else:
                tmp.rename(directory)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        log(f"built {directory} in {manifest['build_seconds']} s")
        return directory
