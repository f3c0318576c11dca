"""Glue shared by the FusionBench adapters: loading a pool, devices, progress, side outputs."""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import torch
from fusion_bench import BaseModelPool
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..engine.driver import check_experts_match
from ..engine.io.reader import SafetensorsStateDict, open_checkpoint, open_expert, safetensors_files
from ..engine.io.writer import TensorSpec
from ..engine.selection import NamePatterns

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
    modelpool: BaseModelPool, keep_pretrained: NamePatterns | Sequence[str] = ()
) -> Tuple[nn.Module, Dict[str, Dict[str, Tensor]]]:
    """The pool's pretrained model and each expert's state dict, checked against each other.

    ``keep_pretrained``: the patterns (:mod:`fusion_bench_ace.engine.selection`) of the parameters
    the method keeps at their pretrained value; the experts' copies of those are not compared (they
    may be missing or have another shape).
    """
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
    check_experts_match(pretrained, experts, ignore=_kept(pretrained, keep_pretrained))
    return pretrained_model, experts


def _kept(names, keep_pretrained) -> List[str]:
    return NamePatterns.compile(keep_pretrained, "parameters kept pretrained").select(names)


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
    modelpool: BaseModelPool, streaming="auto",
    keep_pretrained: NamePatterns | Sequence[str] = (),
) -> Tuple[nn.Module, Mapping[str, Mapping[str, Tensor]], bool]:
    """The pretrained model and the experts' state dicts, streamed from safetensors if possible.

    ``streaming``: ``false`` loads every expert as a model (:func:`load_pool_state_dicts`);
    ``true`` reads every expert lazily from its safetensors checkpoint
    (:class:`fusion_bench_ace.engine.io.reader.SafetensorsStateDict`: one tensor at a time, so the
    merge holds about one model whatever the number of experts) and raises if one cannot be;
    ``auto`` streams when every expert can be, else loads in memory. ``keep_pretrained``: as
    for :func:`load_pool_state_dicts`. Returns ``(pretrained model, experts, streamed)``.
    """
    mode = streaming_mode(streaming)
    if mode == "false":
        pretrained_model, experts = load_pool_state_dicts(modelpool, keep_pretrained)
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
        pretrained_model, experts = load_pool_state_dicts(modelpool, keep_pretrained)
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
        pretrained_model, experts = load_pool_state_dicts(modelpool, keep_pretrained)
        return pretrained_model, experts, False
    check_experts_match(pretrained, {name: state.meta() for name, state in experts.items()},
                        ignore=_kept(pretrained, keep_pretrained))
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


# --- merging straight into a checkpoint directory -----------------------------------------------


@dataclass
class PoolCheckpoints:
    """The pool's models as lazy state dicts over their safetensors checkpoints."""

    pretrained_path: str
    pretrained: SafetensorsStateDict
    """Under the pretrained checkpoint's own keys, floating tensors read in ``dtype``."""
    experts: Dict[str, SafetensorsStateDict]
    """Named like ``pretrained``, read in its dtypes."""
    dtype: torch.dtype
    """What the pool's loader would give (``torch_dtype``), hence the merged model's dtype."""


def pool_torch_dtype(modelpool: BaseModelPool, name: str, path: str) -> torch.dtype:
    """The dtype the pool's ``from_pretrained`` loads model ``name`` in.

    The model entry's or the pool's ``model_kwargs`` ``torch_dtype`` (``dtype``); ``"auto"`` is
    the checkpoint's ``config.json`` dtype; none given is torch's default dtype (float32), as
    ``from_pretrained`` does.
    """
    config = modelpool._models.get(name) if hasattr(modelpool, "_models") else None
    value = None
    for source in (config if not isinstance(config, str) else None,
                   getattr(modelpool, "model_kwargs", None)):
        if source is not None:
            value = source.get("torch_dtype", source.get("dtype"))
            if value is not None:
                break
    if value is None:
        return torch.get_default_dtype()
    if isinstance(value, torch.dtype):
        return value
    if str(value) == "auto":
        config_file = os.path.join(path, "config.json")
        stored = None
        if os.path.isfile(config_file):
            with open(config_file) as handle:
                data = json.load(handle)
            stored = data.get("dtype", data.get("torch_dtype"))
        if stored is None:
            raise ValueError(f"torch_dtype=auto, but {config_file} names no dtype")
        value = stored
    resolved = getattr(torch, str(value).replace("torch.", ""), None)
    if not isinstance(resolved, torch.dtype):
        raise ValueError(f"model '{name}': unknown torch_dtype {value!r}")
    return resolved


def open_pool_checkpoints(modelpool: BaseModelPool, streaming) -> Optional[PoolCheckpoints]:
    """Every model of the pool as a lazy state dict, or ``None`` when they cannot all be.

    ``streaming``: ``false`` returns ``None``; ``auto`` returns ``None`` (and logs why) unless the
    pretrained model and every expert are local safetensors checkpoints loaded with
    ``from_pretrained`` whose keys match; ``true`` raises instead of returning ``None``.
    """
    mode = streaming_mode(streaming)
    if mode == "false":
        return None
    if not modelpool.has_pretrained:
        load_pool_state_dicts(modelpool)  # raises the usual error
    paths, reasons = {}, []
    for name in ["_pretrained_", *modelpool.model_names]:
        path, why = model_checkpoint_path(modelpool, name)
        if path is not None and safetensors_files(path) is None:
            path, why = None, f"{path!r} holds no safetensors weights"
        if path is None:
            reasons.append(f"'{name}': {why}")
        paths[name] = path
    pretrained = experts = None
    if not reasons:
        dtype = pool_torch_dtype(modelpool, "_pretrained_", paths["_pretrained_"])
        pretrained = open_checkpoint(paths["_pretrained_"], dtype)
        reference = pretrained.meta()
        experts = {}
        for name in modelpool.model_names:
            experts[name], unmatched = open_expert(paths[name], reference)
            if unmatched:
                reasons.append(f"'{name}': the checkpoint lacks {len(unmatched)} of the pretrained "
                               f"checkpoint's tensors, e.g. {unmatched[:3]}")
    if reasons:
        if mode == "true":
            raise ValueError("streaming=true, but not every model of the pool can be read "
                             "tensor by tensor:\n  " + "\n  ".join(reasons))
        log.info("streaming=auto: not streaming (%s)", "; ".join(reasons))
        return None
    return PoolCheckpoints(paths["_pretrained_"], pretrained, experts, dtype)


def tensor_specs(state: Mapping[str, Tensor]) -> List[TensorSpec]:
    """Name, shape and dtype of every tensor of a (meta) state dict, in its order."""
    return [TensorSpec(name, tuple(t.shape), t.dtype) for name, t in state.items()]


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def write_model_files(directory: Path, modelpool: BaseModelPool, checkpoints: PoolCheckpoints
                      ) -> None:
    """What ``save_pretrained`` writes beside the weights: the tokenizer (the pool's, else the
    pretrained checkpoint's, if it has one), ``generation_config.json``, and ``config.json``
    (the pretrained model's, with the merged model's dtype) written last, so a directory cut
    short never looks like a complete checkpoint to ``from_pretrained``."""
    from transformers import AutoConfig, AutoTokenizer

    tokenizer = None
    pretrained = Path(checkpoints.pretrained_path)
    if getattr(modelpool, "tokenizer", None) is not None and hasattr(modelpool, "load_tokenizer"):
        tokenizer = modelpool.load_tokenizer()
    elif any((pretrained / name).is_file() for name in TOKENIZER_FILES):
        tokenizer = AutoTokenizer.from_pretrained(str(pretrained))
    else:
        log.info("no tokenizer written: the pool names none and %s has none", pretrained)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(directory))
    generation = pretrained / "generation_config.json"
    if generation.is_file():
        shutil.copyfile(generation, directory / generation.name)
    config = AutoConfig.from_pretrained(checkpoints.pretrained_path)
    # transformers >= 4.56 calls it `dtype` (`torch_dtype`: a deprecated alias); older ones don't
    setattr(config, "dtype" if "dtype" in vars(config) else "torch_dtype", checkpoints.dtype)
    config.save_pretrained(str(directory))
