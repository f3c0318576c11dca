"""Merge time of ACE-Merging on random task vectors with real layer shapes, against other codes.

Implementations (``IMPLS``), all run interleaved on the same tensors (rotating order, ``repeats``
times, median):

- ``ours``: :func:`fusion_bench_ace.methods.ace.ace_merge_layer` (``precision="float32"``, the
  default: one float32 pass);
- ``ours_float64``: the same with ``precision="float64"`` (the exact merge of the inputs);
- ``reference``: :mod:`fusion_bench_ace.bench.reference`, structured like the authors' code
  (per-task products, explicit inverse, traces via full ``WᵀW``, full SVD);
- ``tsvm``: FusionBench's TSV-M merge math (``TSVM_utils.compute_and_sum_svd_mem_reduction``),
  a different method, timed on the same task vectors;
- ``floor``: the unavoidable operations alone: one ``n x n`` Gram product per task, one
  Cholesky solve of the ``n x n`` system for the ``m x n`` right-hand side, one thin SVD per
  heterogeneous layer;
- ``floor_wsigma``: ``floor`` plus one ``W_t Σ_t`` product per task, which Eq. 14's numerator
  ``Σ_t W̃_t Σ_t,reg`` needs and no algebra removes (``W̃_t Σ̂_t = W̃_t W̃_tᵀ W̃_t`` is cubic per task).

Each unique shape is merged once homogeneous (equal task scales) and once heterogeneous (scales
spread over three decades, γ > τ); a model's time is ``Σ count × mean(homogeneous,
heterogeneous)`` over its unique shapes. Also reported: peak extra memory during one layer's merge
and the max over layers of ``‖X - ours‖_F / ‖ours‖_F``.
"""

from __future__ import annotations

import contextlib
import io
import statistics
from typing import Callable, Dict, List

import torch
from torch import Tensor

from .measure import measure

IMPLS = ("ours", "ours_float64", "reference", "tsvm", "floor", "floor_wsigma")


def _ours(stacked: Tensor, eps: float, tau: float, k_frac: float) -> Tensor:
    from ..methods.ace import ace_merge_layer

    return ace_merge_layer(stacked, eps, tau, k_frac)


def _ours_float64(stacked: Tensor, eps: float, tau: float, k_frac: float) -> Tensor:
    from ..methods.ace import ace_merge_layer

    return ace_merge_layer(stacked, eps, tau, k_frac, precision="float64")


def _reference(stacked: Tensor, eps: float, tau: float, k_frac: float) -> Tensor:
    from .reference import reference_ace_layer

    return reference_ace_layer(list(stacked.unbind(0)), eps, tau, k_frac, stacked.device)


def _tsvm(stacked: Tensor, eps: float, tau: float, k_frac: float) -> Tensor:
    from fusion_bench.method.task_singular_vector.utils.TSVM_utils import (
        compute_and_sum_svd_mem_reduction,
    )

    task_vectors = [{"weight": tv} for tv in stacked.unbind(0)]
    with contextlib.redirect_stdout(io.StringIO()):  # it prints one line per layer
        merged = compute_and_sum_svd_mem_reduction(task_vectors, accelerator=stacked.device)
    return merged["weight"]


def _floor(stacked: Tensor, eps: float, tau: float, k_frac: float, *, wsigma=False,
           heterogeneous=False) -> Tensor:
    _, m, n = stacked.shape
    sigma = torch.zeros(n, n, dtype=stacked.dtype, device=stacked.device)
    numerator = torch.zeros(m, n, dtype=stacked.dtype, device=stacked.device) if wsigma else None
    for x in stacked.unbind(0):
        if not wsigma:
            sigma.addmm_(x.T, x)  # the Gram product, accumulated
        elif 2 * m < n:  # as ours: column Gram into the sum, W Σ as (W Wᵀ) W
            sigma.addmm_(x.T, x)
            numerator.addmm_(x @ x.T, x)
        else:
            gram = x.T @ x
            sigma.add_(gram)
            numerator.addmm_(x, gram)
    sigma.diagonal().add_(eps * stacked.shape[0])
    rhs = numerator if wsigma else stacked[0]  # any m x n right-hand side: same cost
    factor, _ = torch.linalg.cholesky_ex(sigma)
    solved = torch.cholesky_solve(rhs.T, factor).T
    if heterogeneous:
        u, s, vh = torch.linalg.svd(solved, full_matrices=False)
        k = int(min(m, n) * k_frac)
        solved = solved + s[:k].mean() * (u[:, :k] @ vh[:k])
    return solved


IMPL_FUNCS: Dict[str, Callable] = {"ours": _ours, "ours_float64": _ours_float64,
                                   "reference": _reference, "tsvm": _tsvm}
def _task_vectors(shape, num_tasks, heterogeneous, seed, device) -> Tensor:
    generator = torch.Generator(device=device).manual_seed(seed)
    if heterogeneous:  # three decades of scale: gamma ~ 2-7 >> tau = 0.3 on these shapes
        scales = torch.logspace(-4, -1, num_tasks)
    else:
        scales = torch.full((num_tasks,), 1e-2)
    stacked = torch.randn(num_tasks, *shape, generator=generator, device=device)
    return stacked.mul_(scales.to(device).view(-1, 1, 1))


def _relative_difference(x: Tensor, ours: Tensor) -> float:
    x, ours = x.double(), ours.double()
    return float(torch.linalg.norm(x - ours) / torch.linalg.norm(ours))


def bench_model(model: str, shapes, num_tasks: int, impls: List[str], repeats: int,
                settings: dict, device: torch.device, log=print) -> dict:
    """Interleaved timings of ``impls`` on every unique shape of ``model``, both branches."""
    from ..methods.ace import heterogeneity

    eps, tau, k_frac = settings["eps"], settings["tau"], settings["k_frac"]
    warm = _task_vectors((8, 6), 3, True, 0, device)  # imports and first-call set-up, untimed
    for impl in impls:
        IMPL_FUNCS.get(impl, _floor)(warm, eps, tau, k_frac)
    per_impl = {impl: {"seconds": 0.0, "peak_bytes": 0, "rel_diff": 0.0, "rel_diff_by_shape": {},
                       "rel_err_f64": 0.0} for impl in impls}
    with_truth = "reference" in impls  # float64 ours (checked against the naive float64 tests)
    branches = {"homogeneous": 0, "heterogeneous": 0}
    for index, (label, shape, count) in enumerate(shapes):
        for het in (False, True):
            seed = settings["seed"] * 1000 + index * 2 + int(het)
            stacked = _task_vectors(tuple(shape), num_tasks, het, seed, device)
            gamma = heterogeneity(stacked)
            branch_het = gamma > tau
            branches["heterogeneous" if branch_het else "homogeneous"] += count
            funcs = {
                impl: (lambda impl=impl, x=stacked: IMPL_FUNCS[impl](x, eps, tau, k_frac))
                if impl in IMPL_FUNCS
                else (lambda impl=impl, x=stacked: _floor(x, eps, tau, k_frac,
                                                          wsigma=impl == "floor_wsigma",
                                                          heterogeneous=branch_het))
                for impl in impls
            }
            times = {impl: [] for impl in impls}
            results = {}
            for repeat in range(repeats):
                order = impls[repeat % len(impls):] + impls[: repeat % len(impls)]
                for impl in order:
                    result, seconds, peak = measure(funcs[impl], device)
                    times[impl].append(seconds)
                    per_impl[impl]["peak_bytes"] = max(per_impl[impl]["peak_bytes"], peak)
                    if repeat == 0:
                        results[impl] = result
                    del result
            truth = _ours(stacked.double(), eps, tau, k_frac) if with_truth else None
            for impl in impls:
                median = statistics.median(times[impl])
                row = per_impl[impl]
                row["seconds"] += count * median / 2  # mean of the two branches
                if impl in IMPL_FUNCS and impl != "ours":
                    diff = _relative_difference(results[impl], results["ours"])
                    row["rel_diff"] = max(row["rel_diff"], diff)
                    by_shape = row["rel_diff_by_shape"]
                    by_shape[label] = max(by_shape.get(label, 0), diff)
                if truth is not None and impl in IMPL_FUNCS:
                    row["rel_err_f64"] = max(
                        row["rel_err_f64"], _relative_difference(results[impl], truth)
                    )
            log(
                f"  {model} T={num_tasks} {label} {tuple(shape)} "
                f"{'het' if branch_het else 'hom'} (gamma={gamma:.3g}): "
                + ", ".join(f"{i} {statistics.median(times[i]):.3f}s" for i in impls)
            )
            del stacked, results, truth
    return {
        "model": model,
        "tasks": num_tasks,
        "impls": per_impl,
        "branches": branches,
        "repeats": repeats,
    }
