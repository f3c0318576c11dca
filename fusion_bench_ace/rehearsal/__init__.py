"""Rehearse a paper-scale benchmark offline: stand-ins for every repository its configs name.

``build_standins(benchmark, root)`` resolves the benchmark's pool configs
(:mod:`.requirements`), then writes under ``root``

- ``hf/<owner>/<name>``: for every ``${ace_hf:<owner>/<name>}`` id, a tiny random stand-in with the
  real repository's layout - models of the real class and config fields at tiny sizes with their
  tokenizer / processor files (:mod:`.models`), datasets with the real configuration names, split
  names, columns and label counts and a few rows each (:mod:`.data`);
- ``openclip/``: the task-vectors checkpoint directory of the open_clip benchmarks
  (:mod:`.openclip`);

and returns the environment (``FUSION_BENCH_ACE_HF_ROOT`` ...) under which
``python -m fusion_bench_ace.compare run <benchmark>`` runs end to end on them. What each stand-in
looks like, and where that fact comes from, is in :mod:`.facts`.

Adding a model family: a :class:`~.facts.ModelRepo` (id pattern, kind, files, source) and a
builder function in ``MODEL_BUILDERS``; a dataset: a :class:`~.facts.DatasetRepo` entry.
Building is idempotent: a repository already under ``root`` is kept, so benchmarks can share one.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Dict

from .data import write_dataset
from .facts import dataset_repo, model_repo
from .models import MODEL_BUILDERS, Context, stable_seed
from .requirements import OPENCLIP_ENV, NotRehearsable, Requirements, requirements

HF_ROOT_ENV = "FUSION_BENCH_ACE_HF_ROOT"
ROWS = 3
"""Rows per split of every stand-in dataset (a few images per task)."""

__all__ = ["build_standins", "requirements", "NotRehearsable", "Requirements", "MODEL_BUILDERS"]


def build_standins(benchmark: str, root: Path, rows: int = ROWS) -> Dict[str, str]:
    """Write the stand-ins of ``benchmark`` under ``root``; return the environment to run with."""
    root = Path(root).absolute()
    hf_root, openclip_dir = root / "hf", root / "openclip"
    needed = requirements(benchmark, openclip_dir)

    def build_model(repo_id: str) -> Path:
        directory = hf_root / repo_id
        if not directory.is_dir():
            repo, groups = model_repo(repo_id)
            with _atomic_dir(directory) as partial:
                MODEL_BUILDERS[repo.kind](context, partial, **groups)
                missing = [f for f in repo.files if not (partial / f).is_file()]
                if missing:
                    raise AssertionError(f"stand-in {repo_id} lacks {missing} ({repo.kind})")
        return directory

    context = Context(hf_root, build_model)
    for repo_id in needed.datasets:
        directory = hf_root / repo_id
        if not directory.is_dir():
            with _atomic_dir(directory) as partial:
                write_dataset(repo_id, dataset_repo(repo_id), partial, rows, stable_seed(repo_id))
    for repo_id in needed.models:
        build_model(repo_id)
    env = {HF_ROOT_ENV: str(hf_root), OPENCLIP_ENV: str(openclip_dir)}
    if needed.openclip_encoders or needed.openclip_heads:
        from fusion_bench.tasks.clip_classification import get_num_classes

        from .openclip import build_openclip

        extra = build_openclip(needed.openclip_encoders, needed.openclip_heads, root,
                               get_num_classes)
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (extra["PYTHONPATH"], os.environ.get("PYTHONPATH")) if p)
    return env


class _atomic_dir:
    """Build into ``<dir>.partial`` and rename: an interrupted build never looks complete."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.partial = directory.with_name(directory.name + ".partial")

    def __enter__(self) -> Path:
        shutil.rmtree(self.partial, ignore_errors=True)
        self.partial.mkdir(parents=True)
        return self.partial

    def __exit__(self, kind, value, traceback) -> None:
        if kind is None:
            self.partial.rename(self.directory)
        else:
            shutil.rmtree(self.partial, ignore_errors=True)
