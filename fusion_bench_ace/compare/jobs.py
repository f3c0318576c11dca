"""A comparison's entries as jobs: one directory per entry, resumable, run through a launcher.

Every entry of a table (a method, a tuned method, a method over its seeds, a sweep's grid point)
is one job: :func:`entry_job` runs it (:func:`~.variants.run_entry`: one or a few ``fusion_bench``
runs) in a directory named after what decides its result (:func:`job_dir`), and on success
writes the entry's row there (``entry.json``). :func:`run_entries` hands the jobs to a launcher
(:mod:`.launchers`), reuses every job whose ``entry.json`` exists, and turns a job the launcher
lost into a failed result, so that the other rows stay.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from .launchers import JobFailure, Launcher, LocalLauncher
from .tables import Row
from .variants import VariantResult, run_entry

ENTRY_FILE = "entry.json"


def track_env() -> Dict[str, str]:
    """This process's ``FUSION_BENCH_ACE_*`` settings (cache, track size, track seed), passed to
    every job so that a job on another node or Ray worker runs on the same track."""
    return {k: v for k, v in os.environ.items() if k.startswith("FUSION_BENCH_ACE_")}


def entry_key(name: str, spec: dict, metric: str) -> dict:
    """Everything of ``spec`` that decides entry ``name``'s row."""
    tuned = spec.get("tuned", {}).get(name)
    return {
        "overrides": spec["overrides"], "method": spec["methods"].get(name), "tuned": tuned,
        "tuned_method": spec["methods"].get(tuned["method"]) if tuned else None,
        "validation": spec.get("validation") if tuned else None,
        "seeds": spec.get("method_seeds", {}).get(name), "tasks": spec["tasks"], "metric": metric,
    }


def job_dir(root: Path, label: str, key: object, fingerprint: object = None) -> Path:
    """``root/<label>-<hash>``, the hash over ``key`` and ``fingerprint`` (the embedded track's
    content hash): the same job maps to the same directory, a changed one to another."""
    text = json.dumps({"key": key, "fingerprint": fingerprint}, sort_keys=True, default=str)
    # only characters Hydra's override grammar takes unquoted (the path is path.log_dir=<dir>)
    slug = re.sub(r"[^A-Za-z0-9.+-]+", "_", label).strip("_")[:80] or "job"
    return root / f"{slug}-{hashlib.sha1(text.encode()).hexdigest()[:10]}"


def entry_job(name: str, spec: dict, log_dir: Path, metric: str, env: Dict[str, str]
              ) -> VariantResult:
    """One entry, run where the launcher put it; its row saved in ``log_dir/entry.json``."""
    os.environ.update(env)  # a Ray worker or a SLURM node starts without this process's settings
    start = time.perf_counter()
    result = run_entry(name, spec, log_dir, metric)
    result.seconds = time.perf_counter() - start
    if result.ok:
        record = {"row": dataclasses.asdict(result.row), "seconds": result.seconds,
                  "log_dir": str(result.log_dir)}
        partial = log_dir / f".{ENTRY_FILE}.tmp"
        partial.write_text(json.dumps(record, indent=1))
        os.replace(partial, log_dir / ENTRY_FILE)
    return result


def finished_entry(name: str, log_dir: Path) -> Optional[VariantResult]:
    """The entry whose row an earlier job saved in ``log_dir``, or ``None``."""
    path = log_dir / ENTRY_FILE
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    report_path = log_dir / "program_report.json"  # a single or tuned run's test report
    report = json.loads(report_path.read_text()) if report_path.is_file() else None
    return VariantResult(name, ok=True, row=Row(**record["row"]), report=report, log_dir=log_dir,
                         seconds=record["seconds"], reused=True)


def run_entries(
    entries: Sequence[str],
    spec: dict,
    root: Path,
    *,
    launcher: Optional[Launcher] = None,
    fingerprint: object = None,
    rerun: bool = False,
    engine_folder: Path,
    log: Callable[[str], None] = print,
) -> List[VariantResult]:
    """Every entry of ``spec`` named in ``entries`` as one job in its own directory under ``root``
    (:func:`job_dir`), through ``launcher`` (default: one after another here); results in the
    order of ``entries``.

    An entry whose directory holds its ``entry.json`` is not run again (``reused``) unless
    ``rerun``; then its directory is emptied first, as is one of an attempt that did not finish.
    A job that fails - ``fusion_bench`` exits with an error, or the launcher loses it - is a
    result with ``ok`` false; the others still run. ``engine_folder``: where the launcher keeps
    its own files (submitit's logs).
    """
    launcher = launcher or LocalLauncher()
    metric = spec.get("metric", "accuracy")
    directories = [job_dir(root, name, entry_key(name, spec, metric), fingerprint)
                   for name in entries]
    results: List[Optional[VariantResult]] = [None] * len(entries)
    pending = []
    for index, (name, directory) in enumerate(zip(entries, directories)):
        previous = None if rerun else finished_entry(name, directory)
        if previous is not None:
            results[index] = previous
            log(f"[compare]   {name:<22} reused ({directory}; --rerun runs it again)")
            continue
        if directory.exists():
            log(f"[compare]   {name:<22} replacing the earlier run in {directory}")
            shutil.rmtree(directory)
        pending.append(index)
    if pending:
        how = launcher.config.get("name", type(launcher).__name__)
        reused = len(entries) - len(pending)
        log(f"[compare] {len(pending)} job(s) on launcher '{how}'"
            + (f", {reused} reused" if reused else ""))
    env = track_env()
    calls: List[Tuple] = [(entries[i], spec, directories[i], metric, env) for i in pending]

    def result_of(position: int, outcome) -> VariantResult:
        if isinstance(outcome, JobFailure):
            index = pending[position]
            return VariantResult(entries[index], ok=False, log_dir=directories[index],
                                 error=outcome.error, engine_logs=outcome.logs)
        return outcome

    def done(position: int, outcome) -> None:
        outcome = result_of(position, outcome)
        status = "ok" if outcome.ok else f"FAILED ({outcome.failure_note()})"
        took = "" if outcome.error else f" in {outcome.seconds:.0f} s"
        log(f"[compare]   {outcome.method:<22} {status}{took}")

    for position, outcome in enumerate(launcher.map(entry_job, calls, engine_folder, done)):
        results[pending[position]] = result_of(position, outcome)
    return results
