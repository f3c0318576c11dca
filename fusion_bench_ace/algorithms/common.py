"""Glue shared by the FusionBench adapters: loading a pool, devices, progress, side outputs."""

from __future__ import annotations

import json
import logging
import os
from typing import Callable, Dict, Iterable, List, Tuple

import torch
from fusion_bench import BaseModelPool
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..merging import check_experts_match

log = logging.getLogger(__name__)


def resolve_device(device: str) -> torch.device:
    """``auto`` picks CUDA when available; asking for CUDA without one is an error, not a fallback."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} was asked for but CUDA is not available; use cpu or auto")
    return resolved


def load_pool_state_dicts(
    modelpool: BaseModelPool,
) -> Tuple[nn.Module, Dict[str, Dict[str, Tensor]]]:
    """The pool's pretrained model and each expert's state dict, checked against each other."""
    if not modelpool.has_pretrained:
        raise ValueError(
            "this method merges task vectors and needs the pool's pretrained model: add a "
            f"'_pretrained_' entry to the model pool (models: {modelpool.all_model_names})"
        )
    pretrained_model = modelpool.load_pretrained_model()
    pretrained = pretrained_model.state_dict()
    experts = {}
    for name in tqdm(modelpool.model_names, desc="Loading experts", leave=False):
        experts[name] = modelpool.load_model(name).state_dict()
    check_experts_match(pretrained, experts)
    return pretrained_model, experts


def conv1d_weight_names(model: nn.Module) -> List[str]:
    """Names of weights stored ``d_in x d_out`` by ``transformers``' Conv1D (GPT-2)."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is a FusionBench dependency
        return []
    return [f"{name}.weight" for name, module in model.named_modules() if isinstance(module, Conv1D)]


def layer_progress(description: str) -> Callable[[Iterable[str]], Iterable[str]]:
    """A progress bar over parameter names for the merge driver."""

    def wrap(names: Iterable[str]) -> Iterable[str]:
        names = list(names)
        return tqdm(names, desc=description, unit="param", total=len(names), leave=False)

    return wrap


def run_log_dir(algorithm) -> str | None:
    """The FusionBench run's log directory, if the algorithm runs inside a program that has one."""
    program = getattr(algorithm, "_program", None)
    return getattr(program, "log_dir", None) if program is not None else None


def write_json_beside_report(algorithm, filename: str, data: dict) -> str | None:
    """Write ``data`` into the run's log directory without overwriting an earlier file."""
    log_dir = run_log_dir(algorithm)
    if log_dir is None:
        log.info("no run log directory; %s not written", filename)
        return None
    os.makedirs(log_dir, exist_ok=True)
    stem, ext = os.path.splitext(filename)
    path = os.path.join(log_dir, filename)
    version = 1
    while os.path.exists(path):
        path = os.path.join(log_dir, f"{stem}_{version}{ext}")
        version += 1
    with open(path, "w") as handle:
        json.dump(data, handle, indent=1)
    log.info("wrote %s", path)
    return path
