"""ACE-Merging, the per-layer math (arXiv 2603.02945 v2, Eqs. 5-19, Algorithm 1).

Pure functions on tensors: the task vectors ``ΔW_t`` of one 2-D weight in, the merged task
vector out. No FusionBench import; the FusionBench algorithm lives in
``fusion_bench_ace.algorithms.ace``.

Notation (one layer, ``T`` tasks, each ``ΔW_t`` of shape ``m x n`` = ``d_out x d_in``):

- energies ``e_t = ||ΔW_t||_F^2`` (uncentred), heterogeneity
  ``γ = Var_t[log e_t] / (Mean_t[log e_t])^2`` (unbiased variance), heterogeneous iff ``γ > τ``;
- centred task vectors ``W̃_t = ΔW_t - 1 μ_tᵀ`` (mean over rows, dim 0), ``Σ̂_t = W̃_tᵀ W̃_t``
  with trace ``s_t``;
- homogeneous: ``Σ̃_t = Σ̂_t``, ``Σ_t,reg = Σ̂_t + ε I``; heterogeneous: ``Σ̃_t = Σ̂_t / s_t``,
  ``Σ_t,reg = Σ̃_t + (ε / s_t) I`` (Eqs. 8-10);
- collective prior ``C_agg = 1 cᵀ`` with ``c`` the mean row of ``Σ_t Σ̃_t``, divided by the mean
  uncentred energy ``τ̄`` in the heterogeneous branch (Eqs. 11-13);
- ``W_pre = (Σ_t W̃_t Σ_t,reg)(Σ_t Σ_t,reg + C_agg)^-1`` (Eq. 14);
- heterogeneous only: ``Δ_res = Σ_t ΔW_t (Σ̃_t - mean_t Σ_t,reg)`` with the *uncentred* ``ΔW_t``,
  SVD of ``W_pre + Δ_res``, ``k = floor(k_frac * min(m, n))`` and
  ``W = W_pre + σ̄_k U_k V_kᵀ`` (Eqs. 17-19).

Choices where the paper is silent or the authors' code (``unravel-xu/ACE-Merging``,
``src/merge/strategy.py``) breaks — each is tested:

- **Zero task vectors.** A task whose ``ΔW_t`` is all zeros for this layer (an expert that did not
  train it) has ``log e_t = -inf`` and an undefined trace normalisation; the authors' ``+1e-12``
  guards turn it into an infinitely strong ridge that pulls the merge to zero and wipes the layer.
  Such tasks are left out of this layer's merge (γ, system and residual); ``T`` counts the others.
  If every task vector is zero the merged task vector is zero.
- **No fudge terms.** The authors add ``1e-12`` to traces and to ``mean(log e)^2``. With zero
  tasks excluded these guards are not needed, and they bias layers whose energies are tiny, so they
  are dropped; on real checkpoints (energies >> 1e-12) the difference is below float precision.
- **γ edge cases.** Fewer than two non-zero tasks (T = 1 included) or equal energies give γ = 0;
  a zero mean log-energy with non-zero variance gives γ = +inf (heterogeneous).
- **Single-row weights** (``d_out = 1``): centring over rows removes everything (``W̃_t ≡ 0``), so
  the merge would be identically zero (homogeneous) or undefined (heterogeneous). Such weights are
  merged like 1-D parameters, by averaging their task vectors.
- **Rows all equal** (``W̃_t = 0`` but ``ΔW_t ≠ 0``, ``d_out > 1``): in the heterogeneous branch the
  trace normalisation of that task is undefined (``s_t = 0``); the task is left out of the system
  and the residual. If no task has centred energy left, the layer is averaged.
- **k = 0** (tiny layers or ``k_frac`` small): the refinement is skipped (the authors' code takes
  the mean of an empty set and returns NaN).
- **The solve.** ``Σ_t Σ_t,reg`` is symmetric positive definite (ε > 0) and ``C_agg`` is rank one,
  so the system is solved by a Cholesky factorisation and the Sherman-Morrison identity instead of
  the authors' explicit ``inv``; algebraically identical. If the factorisation fails in the compute
  dtype (ε below the precision of the Gram scale), the solve falls back to a float64
  eigendecomposition with a pseudo-inverse, which is the ε → 0 limit of the same formula.
- **Dtypes.** float64 inputs are computed in float64, float32/float16/bfloat16 in float32; the
  result is cast back to the input dtype.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from .tensors import TaskVectors, compute_dtype_for, stack_task_vectors

__all__ = [
    "ACELayerResult",
    "ace_merge_layer",
    "ace_merge_layer_with_info",
    "check_ace_hyperparameters",
    "heterogeneity",
]


@dataclass(frozen=True)
class ACELayerResult:
    """What one layer's merge produced, for diagnostics (γ per layer, branch, spectra)."""

    merged: Tensor
    """The merged task vector, in the input dtype."""
    gamma: float
    """Heterogeneity score γ of the tasks used."""
    heterogeneous: bool
    """Whether the heterogeneous branch (trace normalisation + refinement) ran."""
    rank_k: int
    """Number of singular directions refined (0 when the refinement was skipped or not run)."""
    tasks_used: int
    """Tasks that entered the system (zero task vectors are left out)."""
    fallback: Optional[str] = None
    """Why the layer was not merged by the closed form, if it was not (e.g. ``"average"``)."""
    preliminary: Optional[Tensor] = None
    """``W_pre`` (compute dtype), kept only when asked for."""


def check_ace_hyperparameters(eps: float, tau: float, k_frac: float) -> None:
    """Reject hyperparameters outside the ranges the method is defined on."""
    if not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps <= 0:
        raise ValueError(f"eps must be a finite number > 0 (Tikhonov strength); got {eps!r}")
    if not isinstance(tau, (int, float)) or math.isnan(tau) or tau < 0:
        raise ValueError(f"tau must be >= 0 (heterogeneity threshold); got {tau!r}")
    if not isinstance(k_frac, (int, float)) or not (0.0 <= k_frac <= 1.0):
        raise ValueError(f"k_frac must lie in [0, 1] (spectral rank fraction); got {k_frac!r}")


def heterogeneity(task_vectors: TaskVectors) -> float:
    """The heterogeneity score γ (Eq. 7) of one layer's task vectors.

    Unbiased variance of ``log ||ΔW_t||_F^2`` over the squared mean, over the tasks whose task
    vector is not all zeros. Fewer than two such tasks or equal energies give 0.
    """
    stacked = stack_task_vectors(task_vectors, ndim=None)
    energies = _energies(stacked.to(compute_dtype_for(stacked.dtype)))
    return _gamma(energies[energies > 0])


def ace_merge_layer(
    task_vectors: TaskVectors, eps: float, tau: float = 0.3, k_frac: float = 0.3
) -> Tensor:
    """Merge the task vectors of one 2-D weight with ACE-Merging (Algorithm 1).

    Args:
        task_vectors: ``T`` tensors of shape ``(d_out, d_in)`` (as ``torch.nn.Linear`` stores its
            weight), or one tensor of shape ``(T, d_out, d_in)``.
        eps: Tikhonov strength ε > 0.
        tau: heterogeneity threshold τ >= 0; the heterogeneous branch runs when γ > τ.
        k_frac: spectral rank fraction in [0, 1]; ``k = floor(k_frac * min(d_out, d_in))``.

    Returns:
        The merged task vector, same shape and dtype as the inputs (add it, scaled, to the
        pretrained weight).

    Raises:
        ValueError: empty input, mismatched or non-2-D shapes, NaN/Inf values, or
            hyperparameters out of range.
    """
    return ace_merge_layer_with_info(task_vectors, eps, tau, k_frac).merged


def ace_merge_layer_with_info(
    task_vectors: TaskVectors,
    eps: float,
    tau: float = 0.3,
    k_frac: float = 0.3,
    *,
    keep_preliminary: bool = False,
) -> ACELayerResult:
    """:func:`ace_merge_layer`, also returning γ, the branch taken and (optionally) ``W_pre``."""
    check_ace_hyperparameters(eps, tau, k_frac)
    stacked = stack_task_vectors(task_vectors, ndim=2)
    result = _ace_merge_stacked(
        stacked.to(compute_dtype_for(stacked.dtype)),
        eps=float(eps),
        tau=float(tau),
        k_frac=float(k_frac),
        keep_preliminary=keep_preliminary,
    )
    return _cast_result(result, stacked.dtype)


def _cast_result(result: ACELayerResult, dtype: torch.dtype) -> ACELayerResult:
    if result.merged.dtype == dtype:
        return result
    return ACELayerResult(
        merged=result.merged.to(dtype),
        gamma=result.gamma,
        heterogeneous=result.heterogeneous,
        rank_k=result.rank_k,
        tasks_used=result.tasks_used,
        fallback=result.fallback,
        preliminary=result.preliminary,
    )


def _energies(stacked: Tensor) -> Tensor:
    """Uncentred energies ``||ΔW_t||_F^2`` in float64 (they feed logs and ratios)."""
    return stacked.reshape(stacked.shape[0], -1).square().sum(dim=1).to(torch.float64)


def _gamma(nonzero_energies: Tensor) -> float:
    if nonzero_energies.numel() < 2:
        return 0.0
    log_e = nonzero_energies.log()
    if bool((log_e == log_e[0]).all()):  # exact 0; var() of equal values can round to 1e-32
        return 0.0
    variance = float(log_e.var(correction=1))
    mean_sq = float(log_e.mean()) ** 2
    if mean_sq == 0.0:
        return math.inf
    return variance / mean_sq


def _ace_merge_stacked(
    stacked: Tensor, *, eps: float, tau: float, k_frac: float, keep_preliminary: bool
) -> ACELayerResult:
    """The merge on validated ``(T, m, n)`` task vectors already in the compute dtype."""
    _, m, n = stacked.shape
    energies = _energies(stacked)
    nonzero = energies > 0
    if not bool(nonzero.any()):
        return ACELayerResult(torch.zeros_like(stacked[0]), 0.0, False, 0, 0, fallback="all-zero")
    if not bool(nonzero.all()):
        stacked, energies = stacked[nonzero], energies[nonzero]
    gamma = _gamma(energies)
    heterogeneous = gamma > tau
    tasks = stacked.shape[0]

    if m == 1:  # centring over one row leaves nothing: average, like a 1-D parameter
        return ACELayerResult(stacked.mean(dim=0), gamma, heterogeneous, 0, tasks, "average")

    row_means = stacked.mean(dim=1, keepdim=True)  # μ_tᵀ, shape (T, 1, n)
    centred = stacked - row_means  # W̃_t
    centred_energy = centred.reshape(tasks, -1).square().sum(dim=1).to(torch.float64)  # s_t

    if heterogeneous:
        usable = centred_energy > 0
        if not bool(usable.any()):
            return ACELayerResult(stacked.mean(dim=0), gamma, True, 0, tasks, "average")
        if not bool(usable.all()):
            stacked, row_means, centred = stacked[usable], row_means[usable], centred[usable]
            centred_energy, energies = centred_energy[usable], energies[usable]
            tasks = stacked.shape[0]
        weights = 1.0 / centred_energy  # Σ̃_t = Σ̂_t / s_t
        prior_scale = 1.0 / float(energies.mean())  # C_agg / τ̄
    else:
        weights = torch.ones(tasks, dtype=torch.float64, device=stacked.device)
        prior_scale = 1.0

    # The system and numerator are homogeneous of degree one in the task weights, so they are
    # accumulated with weights scaled to max 1 (keeps float32 in range when energies span decades)
    # and the residual, which is not, is rescaled by `weight_scale` afterwards.
    weight_scale = float(weights.max())
    relative_weights = (weights / weight_scale).tolist()

    dtype, device = stacked.dtype, stacked.device
    sigma_sum = torch.zeros(n, n, dtype=dtype, device=device)  # Σ_t w_t Σ̂_t  (pre-regularisation)
    numerator = torch.zeros(m, n, dtype=dtype, device=device)  # Σ_t w_t W̃_t Σ̂_t
    mean_term = torch.zeros(n, dtype=dtype, device=device)  # Σ_t w_t Σ̂_t μ_t (residual, 1 μᵀ part)
    use_row_gram = 2 * m < n  # W̃ (W̃ᵀ W̃) = (W̃ W̃ᵀ) W̃: cheaper association when d_out << d_in
    for t in range(tasks):
        w_t = relative_weights[t]
        x = centred[t]
        gram = x.T @ x
        sigma_sum.add_(gram, alpha=w_t)
        if use_row_gram:
            numerator.add_((x @ x.T) @ x, alpha=w_t)
        else:
            numerator.add_(x @ gram, alpha=w_t)
        if heterogeneous:
            mean_term.add_(gram @ row_means[t, 0], alpha=w_t)

    ridge = eps * sum(relative_weights)  # Σ_t w_t ε
    regularised_sum = sigma_sum + ridge * torch.eye(n, dtype=dtype, device=device)  # Σ_t Σ_t,reg
    centred_sum = _weighted_sum(centred, relative_weights)  # Σ_t w_t W̃_t
    gram_term = numerator.clone() if heterogeneous else None  # Σ_t w_t W̃_t Σ̂_t, reused below
    numerator.add_(centred_sum, alpha=eps)  # Σ_t W̃_t Σ_t,reg
    prior_row = sigma_sum.mean(dim=0) * prior_scale  # c
    preliminary = _solve_with_rank_one_prior(numerator, regularised_sum, prior_row)

    if not heterogeneous:
        return ACELayerResult(
            preliminary, gamma, False, 0, tasks, None, preliminary if keep_preliminary else None
        )

    # Δ_res = Σ_t ΔW_t Σ̃_t - (Σ_t ΔW_t) mean_t Σ_t,reg, with ΔW_t Σ̂_t = W̃_t Σ̂_t + 1 (Σ̂_t μ_t)ᵀ.
    task_sum = stacked.sum(dim=0)
    residual = gram_term
    residual.add_(mean_term.unsqueeze(0))
    residual.sub_(task_sum @ regularised_sum, alpha=1.0 / tasks)
    residual.mul_(weight_scale)
    fused = preliminary + residual

    rank_k = int(min(m, n) * k_frac)
    merged = preliminary
    if rank_k > 0:
        u, s, vh = torch.linalg.svd(fused, full_matrices=False)
        sigma_iso = s[:rank_k].mean()
        merged = preliminary + sigma_iso * (u[:, :rank_k] @ vh[:rank_k])
    return ACELayerResult(
        merged, gamma, True, rank_k, tasks, None, preliminary if keep_preliminary else None
    )


def _weighted_sum(stacked: Tensor, weights: list[float]) -> Tensor:
    w = torch.tensor(weights, dtype=stacked.dtype, device=stacked.device)
    return torch.einsum("t,tmn->mn", w, stacked)


def _solve_with_rank_one_prior(numerator: Tensor, spd: Tensor, prior_row: Tensor) -> Tensor:
    """``numerator @ (spd + 1 prior_rowᵀ)^-1`` for symmetric positive definite ``spd``.

    Sherman-Morrison: ``N (S + 1 cᵀ)^-1 = Y - (Y 1)(S^-1 c)ᵀ / (1 + cᵀ S^-1 1)`` with ``Y = N S^-1``.
    ``cᵀ S^-1 1 >= 0`` here (c is a mean row of a PSD matrix that ``S`` dominates), so the
    denominator is >= 1 and the update is stable.
    """
    rhs = torch.cat([numerator, prior_row.unsqueeze(0)], dim=0).T  # (n, m + 1)
    factor, info = torch.linalg.cholesky_ex(spd)
    if int(info) == 0:
        solved = torch.cholesky_solve(rhs, factor)
        if not bool(torch.isfinite(solved).all()):
            solved = _pinv_solve(spd, rhs)
    else:
        solved = _pinv_solve(spd, rhs)
    y = solved[:, :-1].T  # N S^-1, (m, n)
    s_inv_c = solved[:, -1]  # S^-1 c, (n,)
    denominator = 1.0 + s_inv_c.sum()
    return y - torch.outer(y.sum(dim=1), s_inv_c) / denominator


def _pinv_solve(spd: Tensor, rhs: Tensor) -> Tensor:
    """``spd^+ rhs`` via a float64 eigendecomposition, dropping eigenvalues below precision."""
    eigenvalues, eigenvectors = torch.linalg.eigh(spd.to(torch.float64))
    cutoff = eigenvalues.abs().max() * spd.shape[0] * torch.finfo(torch.float64).eps
    inverse = torch.where(eigenvalues > cutoff, 1.0 / eigenvalues, torch.zeros_like(eigenvalues))
    solved = eigenvectors @ (inverse.unsqueeze(1) * (eigenvectors.T @ rhs.to(torch.float64)))
    return solved.to(rhs.dtype)
