"""Running ``fusion_bench`` once per method and collecting what each run wrote.

Every method runs through the real ``fusion_bench`` CLI in its own process (FusionBench's own
Task Arithmetic, TIES, TSV-M and ours alike), under :class:`fusion_bench_ace.program.FusionProgram`
so the run also records its merge time and peak memory. Each run writes into its own directory,
so no report overwrites another.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

PROGRAM = "fusion_bench_ace.program.FusionProgram"
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def fusion_bench_executable() -> str:
    """The ``fusion_bench`` script of this interpreter's environment (or the one on PATH)."""
    beside = Path(sys.executable).with_name("fusion_bench")
    if beside.exists():
        return str(beside)
    found = shutil.which("fusion_bench")
    if found is None:
        raise FileNotFoundError(
            "the fusion_bench command was not found; is fusion-bench installed?"
        )
    return found


@dataclass
class RunResult:
    method: str
    log_dir: Path
    returncode: int
    seconds: float
    report: Optional[dict]
    merge_stats: Optional[dict]

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and self.report is not None


def run_fusion_bench(
    overrides: Sequence[str],
    log_dir: Path,
    *,
    env: Optional[Dict[str, str]] = None,
    multirun: bool = False,
    timeout: Optional[float] = None,
) -> subprocess.CompletedProcess:
    """Run ``fusion_bench`` with ``overrides``; stdout and stderr go to
    ``log_dir/fusion_bench.log``."""
    log_dir.mkdir(parents=True, exist_ok=True)
    command = [
        fusion_bench_executable(),
        *(["-m"] if multirun else []),
        f"_target_={PROGRAM}",
        "print_config=false",
        *overrides,
    ]
    (log_dir / "command.txt").write_text(" ".join(command) + "\n")
    with open(log_dir / "fusion_bench.log", "w") as log:
        return subprocess.run(
            command,
            stdout=log,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=timeout,
            env={**os.environ, **OFFLINE_ENV, **(env or {})},
        )


def run_method(
    method: str, overrides: Sequence[str], log_dir: Path, *, env: Optional[Dict[str, str]] = None
) -> RunResult:
    """One comparison entry: ``fusion_bench`` with its log directory pinned to ``log_dir``."""
    start = time.perf_counter()
    completed = run_fusion_bench([*overrides, f"path.log_dir={log_dir}"], log_dir, env=env)
    return RunResult(
        method=method,
        log_dir=log_dir,
        returncode=completed.returncode,
        seconds=time.perf_counter() - start,
        report=_read_json(log_dir / "program_report.json"),
        merge_stats=_read_json(log_dir / "merge_stats.json"),
    )


def _read_json(path: Path) -> Optional[dict]:
    return json.loads(path.read_text()) if path.is_file() else None


def log_tail(log_dir: Path, lines: int = 25) -> str:
    path = log_dir / "fusion_bench.log"
    if not path.is_file():
        return ""
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def sweep_jobs(sweep_dir: Path) -> List[Path]:
    """Job directories of a Hydra multirun (each holds ``.hydra``-style ``overrides.yaml``)."""
    return sorted(
        (p for p in sweep_dir.iterdir() if p.is_dir() and (p / "program_report.json").is_file()),
        key=lambda p: int(p.name) if p.name.isdigit() else p.name,
    )
