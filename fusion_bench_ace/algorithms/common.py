"""Glue shared by the FusionBench adapters: loading a pool, devices, progress, side outputs."""

from __future__ import annotations

import json
import logging
import os
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Tuple

import torch
from fusion_bench import BaseModelPool
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..merging import check_experts_match
from ..streaming import SafetensorsStateDict, open_expert, safetensors_files

log = logging.getLogger(__name__)


def resolve_device(device: str) -> torch.device:
    """``auto`` picks CUDA when available; CUDA asked for without one is an error, no fallback."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"device={device!r} was asked for but CUDA is not available; use cpu or auto"
        )
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


STREAMING_MODES = ("auto", "true", "false")


def streaming_mode(value) -> str:
    """``streaming`` option: ``auto``, ``true`` or ``false`` (YAML booleans accepted)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    mode = str(value).lower()
    if mode not in STREAMING_MODES:
        raise ValueError(f"streaming must be one of {STREAMING_MODES}; got {value!r}")
    return mode


def model_checkpoint_path(modelpool: BaseModelPool, name: str) -> Tuple[Optional[str], str]:
    """The local checkpoint a pool model is loaded from, or ``(None, why not)``.

    A model config that is a path string, or a ``{_target_: ...from_pretrained,
    pretrained_model_name_or_path: path}`` mapping (FusionBench's usual forms), names a
    checkpoint when the path exists locally; anything else (models built in memory, custom
    loaders, hub ids not on disk) does not.
    """
    config = modelpool._models.get(name) if hasattr(modelpool, "_models") else None
    if config is None or isinstance(config, nn.Module):
        return None, "the model is built in memory"
    if isinstance(config, str):
        path = config
    else:
        try:
            target = config.get("_target_")
            path = config.get("pretrained_model_name_or_path")
        except Exception:  # noqa: BLE001 - any other object: not a checkpoint we can read
            return None, f"model config of type {type(config).__name__}"
        if target is not None and not str(target).endswith("from_pretrained"):
            return None, f"loaded by {target}, not from_pretrained"
        if not isinstance(path, str):
            return None, "no pretrained_model_name_or_path"
    if not os.path.exists(path):
        return None, f"{path!r} is not a local path"
    return path, ""


def load_pool_experts(
    modelpool: BaseModelPool, streaming="auto"
) -> Tuple[nn.Module, Mapping[str, Mapping[str, Tensor]], bool]:
    """The pretrained model and the experts' state dicts, streamed from safetensors if possible.

    ``streaming``: ``false`` loads every expert as a model (:func:`load_pool_state_dicts`);
    ``true`` reads every expert lazily from its safetensors checkpoint
    (:class:`fusion_bench_ace.streaming.SafetensorsStateDict`: one tensor at a time, so the merge
    holds about one model whatever the number of experts) and raises if one cannot be;
    ``auto`` streams when every expert can be, else loads in memory. Returns
    ``(pretrained model, experts, streamed)``.
    """
    mode = streaming_mode(streaming)
    if mode == "false":
        pretrained_model, experts = load_pool_state_dicts(modelpool)
        return pretrained_model, experts, False
    if not modelpool.has_pretrained:
        return (*load_pool_state_dicts(modelpool), False)  # raises the usual error
    names = list(modelpool.model_names)
    paths, reasons = {}, []
    for name in names:
        path, why = model_checkpoint_path(modelpool, name)
        if path is not None and safetensors_files(path) is None:
            path, why = None, f"{path!r} holds no safetensors weights"
        if path is None:
            reasons.append(f"expert '{name}': {why}")
        paths[name] = path
    if reasons:
        if mode == "true":
            raise ValueError(
                "streaming=true, but not every expert is a local safetensors "
                "checkpoint:\n  " + "\n  ".join(reasons)
            )
        log.info("streaming=auto: loading the experts in memory (%s)", "; ".join(reasons))
        pretrained_model, experts = load_pool_state_dicts(modelpool)
        return pretrained_model, experts, False

    pretrained_model = modelpool.load_pretrained_model()
    pretrained = pretrained_model.state_dict()
    experts: Dict[str, SafetensorsStateDict] = {}
    unmatched_any = []
    for name in names:
        experts[name], unmatched = open_expert(paths[name], pretrained)
        if unmatched:
            unmatched_any.append(f"expert '{name}': {len(unmatched)} names, e.g. {unmatched[:3]}")
    if unmatched_any and mode == "auto":
        log.info(
            "streaming=auto: checkpoint keys do not match the model's (%s); loading the "
            "experts in memory",
            "; ".join(unmatched_any),
        )
        del pretrained_model, pretrained, experts
        pretrained_model, experts = load_pool_state_dicts(modelpool)
        return pretrained_model, experts, False
    check_experts_match(pretrained, {name: state.meta() for name, state in experts.items()})
    log.info("streaming %d experts tensor by tensor from safetensors checkpoints", len(experts))
    return pretrained_model, experts, True


def conv1d_weight_names(model: nn.Module) -> List[str]:
    """Names of weights stored ``d_in x d_out`` by ``transformers``' Conv1D (GPT-2)."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is a FusionBench dependency
        return []
    return [
        f"{name}.weight" for name, module in model.named_modules() if isinstance(module, Conv1D)
    ]


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
