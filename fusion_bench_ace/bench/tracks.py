"""float32 against float64 ACE merges on the embedded tracks' real weights, layer by layer.

Random task vectors are well conditioned; real ones (fast-decaying spectra, ε tiny next to their
Gram matrices) are not, and that is where float32 rounding is amplified. For every built track
this merges each 2-D weight the track's ACE preset merges (``config/bench/ace.yaml``: ``tracks``)
three ways from the same float32 task vectors: the default (``precision=float32``: one float32
pass and its error estimate), the float32 pass alone (the estimate switched off), and
``precision=float64``; it reports ``‖W_32 − W_64‖_F / ‖W_64‖_F`` per layer with the default's
predicted error, and the three times. Tracks that are not built are listed as such
(``python -m fusion_bench_ace.mini build``).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Dict, List

import torch
from safetensors import safe_open
from torch import Tensor

from ..engine.driver import plan_parameters, stacked_task_vectors
from ..engine.io.reader import safetensors_files
from ..engine.selection import NamePatterns
from ..methods import ace as ace_math
from ..methods.ace import ACE, ACEOptions, merge_layer
from ..paths import config_dir

OPTION_KEYS = ("eps", "tau", "k_frac", "eps_mode", "eps_rel", "gamma_mode", "tau_scale_free")


def method_settings(preset: str) -> dict:
    """The ACE method config ``config/method/<preset>.yaml`` over its ``ace.yaml`` defaults."""
    from omegaconf import OmegaConf

    method = config_dir() / "method"
    base = OmegaConf.load(method / "ace.yaml")
    override = OmegaConf.load(method / f"{preset}.yaml")
    merged = OmegaConf.merge(base, {k: v for k, v in override.items() if k != "defaults"})
    return OmegaConf.to_container(merged, resolve=True)


def load_checkpoint(path: Path) -> Dict[str, Tensor]:
    files = safetensors_files(path)
    if files is None:
        raise ValueError(f"{path} is not a safetensors checkpoint")
    state = {}
    for key, file in files.items():
        with safe_open(file, framework="pt") as handle:
            state[key] = handle.get_tensor(key)
    return state


def _timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def track_precision(track: str, preset: str, device: torch.device, log=print) -> dict:
    """Per-layer float32-vs-float64 error of the ``preset`` ACE merge of ``track``'s experts."""
    from ..mini import track_dir
    from ..mini.cache import is_built

    directory = track_dir(track)
    row = {"track": track, "method": preset, "directory": str(directory)}
    if not is_built(directory):
        return {**row, "built": False}
    settings = method_settings(preset)
    if settings["transpose_conv1d"]:
        raise ValueError(f"method {preset}: transpose_conv1d is not supported here")
    options = {k: settings[k] for k in OPTION_KEYS}
    pretrained = load_checkpoint(directory / "pretrained")
    experts = {p.name: load_checkpoint(p) for p in sorted((directory / "experts").iterdir())}
    unit = ACE(ACEOptions(**options),
               exclude=NamePatterns.compile(settings["exclude_keys"], "exclude_keys"),
               average=NamePatterns.compile(settings["average_keys"], "average_keys"))
    plan = plan_parameters(pretrained, unit)
    exact = ACEOptions(**{**options, "precision": "float64"})
    layers: List[dict] = []
    for name in plan.merge:
        stacked = stacked_task_vectors(name, pretrained[name], experts, device=device,
                                       dtype=torch.float32)
        single, seconds_32 = _timed(lambda: merge_layer(stacked, unit.options))
        _, seconds_pass = _timed(lambda: _without_estimate(stacked, unit.options))
        double, seconds_64 = _timed(lambda: merge_layer(stacked, exact))
        reference = merge_layer(stacked.double(), unit.options).merged
        scale = float(torch.linalg.norm(reference))
        error = float(torch.linalg.norm(single.merged.double() - reference))
        layers.append({
            "name": name,
            "shape": list(stacked.shape[1:]),
            "heterogeneous": single.heterogeneous,
            "computed_in": str(single.compute_dtype).removeprefix("torch."),
            "solved_in": single.solved_in,
            "rel_err": error / scale if scale > 0 else error,
            "estimate": single.float32_error_estimate,
            "seconds_float32": seconds_32,
            "seconds_float32_pass": seconds_pass,
            "seconds_float64": seconds_64,
            "float64_option_equal": bool(torch.equal(double.merged, reference.float())),
        })
    errors = [layer["rel_err"] for layer in layers]
    summary = {
        "built": True,
        "tasks": len(experts),
        "options": options,
        "layers": layers,
        "max_rel_err": max(errors),
        "median_rel_err": sorted(errors)[len(errors) // 2],
        "float64_layers": sum(layer["computed_in"] == "float64" for layer in layers),
        "seconds_float32": sum(layer["seconds_float32"] for layer in layers),
        "seconds_float32_pass": sum(layer["seconds_float32_pass"] for layer in layers),
        "seconds_float64": sum(layer["seconds_float64"] for layer in layers),
    }
    log(f"  track {track} ({preset}): {len(layers)} layers, float32 vs float64 max "
        f"{summary['max_rel_err']:.1e}, {summary['float64_layers']} merged in float64")
    return {**row, **summary}


def _without_estimate(stacked: Tensor, options: ACEOptions):
    """The float32 pass alone: the merge with its condition estimate switched off."""
    estimate = ace_math._condition_estimate
    ace_math._condition_estimate = lambda *args: 1.0
    try:
        return merge_layer(stacked, options)
    finally:
        ace_math._condition_estimate = estimate
