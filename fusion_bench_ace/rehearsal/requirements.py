"""What a benchmark's configs resolve to: the hub ids and open_clip files its pools will read.

The benchmark's model- and task-pool configs (``config/compare/<name>.yaml`` names them) are
resolved with ``${ace_hf:...}`` replaced by a recorder, so the list is exactly what
``fusion_bench`` would ask ``FUSION_BENCH_ACE_HF_ROOT`` for - nested interpolations included
(the RoBERTa experts' ``${ace_hf:${...expert_prefix}cola}``).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterator, List, Tuple

from omegaconf import OmegaConf

from ..environ import patched_environ
from ..paths import config_dir
from .facts import DATASETS

OPENCLIP_ENV = "FUSION_BENCH_ACE_OPENCLIP_DIR"
LM_EVAL_POOLS = ("fusion_bench_ace.taskpools.lm_eval.", "fusion_bench.taskpool.lm_eval_harness")
"""Task pools that evaluate through lm-eval, which fetches its own task data: no stand-ins."""


class NotRehearsable(ValueError):
    """The benchmark reads data the rehearsal cannot stand in for."""


@dataclass
class Requirements:
    models: List[str] = field(default_factory=list)
    datasets: List[str] = field(default_factory=list)
    openclip_encoders: Dict[str, str] = field(default_factory=dict)
    """pickle path -> open_clip model name"""
    openclip_heads: Dict[str, Tuple[str, str]] = field(default_factory=dict)
    """head path -> (open_clip model name, task)"""


def pool_overrides(spec: dict) -> List[str]:
    """``modelpool=...``/``taskpool=...`` options of the benchmark and of its methods."""
    options = [o for o in spec["overrides"] if o.split("=")[0] in ("modelpool", "taskpool")]
    for method in spec["default_methods"]:  # (tuned methods add no pool of their own)
        options += [o for o in spec["methods"].get(method, [])
                    if o.split("=")[0] in ("modelpool", "taskpool") and o not in options]
    return options


@contextlib.contextmanager
def _recording_ace_hf(ids: List[str]) -> Iterator[None]:
    from ..resolvers import hf_repo

    def record(repo_id: str) -> str:
        if repo_id not in ids:
            ids.append(repo_id)
        return repo_id

    OmegaConf.register_new_resolver("ace_hf", record, replace=True)
    try:
        yield
    finally:
        OmegaConf.register_new_resolver("ace_hf", hf_repo, replace=True)


def requirements(benchmark: str, openclip_dir: Path) -> Requirements:
    from ..compare import load_benchmark

    spec = load_benchmark(benchmark)
    configs = config_dir()
    ids: List[str] = []
    found = Requirements()
    with patched_environ({OPENCLIP_ENV: str(openclip_dir)}), _recording_ace_hf(ids):
        for option in pool_overrides(spec):
            group, _, name = option.partition("=")
            config = OmegaConf.create({"fast_dev_run": False,
                                       group: OmegaConf.load(configs / group / f"{name}.yaml")})
            resolved = OmegaConf.to_container(config, resolve=True)[group]
            if str(resolved.get("_target_", "")).startswith(LM_EVAL_POOLS):
                raise NotRehearsable(
                    f"benchmark {benchmark!r} evaluates through lm-eval ({option}), which "
                    "downloads its own task data; the rehearsal has stand-ins for hub models and "
                    "image/GLUE datasets only"
                )
            _collect_openclip(resolved, found)
    found.datasets = [i for i in ids if i in DATASETS]
    found.models = [i for i in ids if i not in DATASETS]
    return found


def _collect_openclip(pool: dict, found: Requirements) -> None:
    names = {entry["model_name"] for entry in (pool.get("models") or {}).values()
             if isinstance(entry, dict) and "pickle_path" in entry}
    for entry in (pool.get("models") or {}).values():
        if isinstance(entry, dict) and "pickle_path" in entry:
            found.openclip_encoders[entry["pickle_path"]] = entry["model_name"]
    if pool.get("model_name"):
        names.add(pool["model_name"])
    heads = pool.get("classification_heads") or {}
    if heads and len(names) != 1:
        raise ValueError(f"open_clip heads with model names {sorted(names)}: expected one")
    for task, path in heads.items():
        found.openclip_heads[path] = (next(iter(names)), task)

