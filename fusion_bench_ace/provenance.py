"""What produced a result: the machine, the code's git state, package versions, the date.

One helper for every tool that writes results (the comparison runner's ``provenance.json``, the
speed benchmark's report, the program's ``merge_stats.json``).
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from .paths import PACKAGE_DIR

PACKAGES = ("fusion-bench-ace", "fusion-bench", "torch", "transformers", "hydra-core")
ENVIRONMENT_PREFIXES = ("FUSION_BENCH", "HF_", "OMP_NUM_THREADS", "CUDA_VISIBLE")


def machine(device: Optional[str] = None) -> dict:
    """CPU model, core count, memory, platform; the GPU of ``device`` (or the first one, if any)."""
    cpu = platform.processor() or None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = None
    try:
        kib = int(Path("/proc/meminfo").read_text().split("MemTotal:")[1].split()[0])
        memory = f"{kib / 2**20:.1f} GiB"
    except (OSError, IndexError, ValueError):
        pass
    import torch

    gpu = None
    if torch.cuda.is_available():
        chosen = torch.device(device) if device is not None else None
        gpu = torch.cuda.get_device_name(
            chosen if chosen is not None and chosen.type == "cuda" else 0
        )
    return {
        "platform": platform.platform(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "memory": memory,
        "gpu": gpu,
        "python": platform.python_version(),
    }


def source_checkout() -> Optional[Path]:
    """The git checkout the package runs from, or ``None`` (an installed wheel)."""
    root = PACKAGE_DIR.parent
    return root if (root / ".git").exists() else None


def _git(root: Path, *args: str) -> Optional[str]:
    try:
        return subprocess.run(
            ["git", *args], capture_output=True, text=True, check=True, cwd=root
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def git_state() -> Dict[str, object]:
    """``{"git_commit", "git_dirty"}`` of the source checkout (``None`` for an installed wheel).

    Dirty = tracked code or configuration changed; ``results/`` (where tools write) does not count.
    """
    root = source_checkout()
    if root is None:
        return {"git_commit": None, "git_dirty": None}
    status = _git(
        root, "status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)results"
    )
    return {
        "git_commit": _git(root, "rev-parse", "HEAD"),
        "git_dirty": bool(status) if status is not None else None,
    }


def versions(packages: Sequence[str] = PACKAGES) -> Dict[str, Optional[str]]:
    def installed(package: str) -> Optional[str]:
        try:
            return version(package)
        except PackageNotFoundError:
            return None

    return {p: installed(p) for p in packages} | {"python": sys.version.split()[0]}


def utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def collect(command: str, device: Optional[str] = None) -> dict:
    """Everything above, for a result produced by ``command``."""
    return {
        "command": command,
        "date_utc": utc_now(),
        **git_state(),
        "machine": machine(device),
        "versions": versions(),
        "environment": {k: v for k, v in os.environ.items() if k.startswith(ENVIRONMENT_PREFIXES)},
    }


def markdown_lines(info: dict) -> List[str]:
    """The command, date, commit and machine of :func:`collect`'s ``info``: Markdown list items."""
    machine = info["machine"]
    gpu = f", GPU {machine['gpu']}" if machine["gpu"] else ", no GPU"
    return [
        f"- command: `{info['command']}`",
        f"- date (UTC): {info['date_utc']}; git commit: "
        f"{info['git_commit'] or 'unknown (not a git checkout)'}"
        + (" (with uncommitted changes)" if info["git_dirty"] else ""),
        f"- machine: {machine['cpu']} ({machine['cpu_count']} cores, {machine['memory']}), torch "
        f"{info['versions']['torch']}{gpu}",
    ]
