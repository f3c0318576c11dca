"""A reference-style ACE-Merging, structured like the authors' implementation, for the benchmark.

This is *not* the implementation the plugin uses (that is :mod:`fusion_bench_ace.methods.ace`).
It is written here, for ``python -m fusion_bench_ace.bench``, to follow the structure of the
authors' ``MergeStrategy.ace_merging`` (GitHub ``unravel-xu/ACE-Merging``,
``src/merge/strategy.py``) so that the benchmark compares against the way the method is computed
there:
- a Python loop over layers, and inside it over tasks, on a list of per-task tensors;
- energies as ``trace(ΔW_tᵀ ΔW_t)`` (a full ``n x n`` product per task, read back with ``.item()``);
- per task: centre, form ``Σ̂_t = W̃_tᵀ W̃_t`` and ``Σ_t,reg = Σ̃_t + ε_t I`` (an explicit identity),
  keep every ``Σ̃_t`` in a list, accumulate ``W̃_t Σ_t,reg`` with its own product;
- the system ``Σ_t Σ_t,reg + C_agg`` inverted explicitly (``torch.linalg.inv``) and multiplied;
- heterogeneous layers: ``Δ_res = Σ_t ΔW_t (Σ̃_t - mean Σ_t,reg)`` with one product per task, then a
  full (thin) SVD of ``W_pre + Δ_res``.

Same formulas as :mod:`fusion_bench_ace.methods.ace` (and the paper), including the authors'
``1e-12`` guards on traces and on ``mean(log e)^2``, which change nothing measurable on
non-degenerate task vectors (the benchmark's random ones). The edge cases
:mod:`fusion_bench_ace.methods.ace` documents (all-zero task vectors, ``d_out = 1``, ``k = 0``) are
not handled: the benchmark does not produce them. Everything runs in the task vectors' dtype on
``device``. """

from __future__ import annotations

from typing import Dict, List, Sequence

import torch
from torch import Tensor

__all__ = ["reference_ace_layer", "reference_ace_merge"]

_GUARD = 1e-12  # the authors' additive guard on traces and on the squared mean log-energy


def reference_ace_layer(
    task_vectors: Sequence[Tensor],
    eps: float,
    tau: float = 0.3,
    k_frac: float = 0.3,
    device: str | torch.device = "cpu",
) -> Tensor:
    """One 2-D layer, reference-style: ``T`` tensors ``(d_out, d_in)`` in, merged task vector
    out."""
    tvs = [tv.to(device) for tv in task_vectors]
    num_tasks = len(tvs)
    d_in = tvs[0].shape[1]
    dtype = tvs[0].dtype

    energies = torch.tensor([torch.trace(tv.T @ tv).item() for tv in tvs], dtype=dtype)
    logs = torch.log(energies + _GUARD)
    gamma = torch.var(logs) / (torch.mean(logs).pow(2) + _GUARD)
    heterogeneous = bool(gamma > tau)
    mean_energy = energies.mean().item()

    identity = torch.eye(d_in, device=device, dtype=dtype)
    normalised: List[Tensor] = []  # Σ̃_t for every task
    numerator = torch.zeros_like(tvs[0])  # Σ_t W̃_t Σ_t,reg
    system = torch.zeros(d_in, d_in, device=device, dtype=dtype)  # Σ_t Σ_t,reg
    for tv in tvs:
        centred = tv - tv.mean(dim=0, keepdim=True)
        covariance = centred.T @ centred
        trace = torch.trace(covariance) + _GUARD
        if heterogeneous:
            sigma_tilde = covariance / trace
            ridge = eps / trace
        else:
            sigma_tilde = covariance
            ridge = eps
        normalised.append(sigma_tilde)
        regularised = sigma_tilde + ridge * identity
        numerator += centred @ regularised
        system += regularised

    prior = torch.mean(sum(normalised), dim=0, keepdim=True)  # (1, n): every row of C_agg
    if heterogeneous:
        prior = prior / (mean_energy + _GUARD)
    merged = numerator @ torch.linalg.inv(system + prior)
    if not heterogeneous:
        return merged

    mean_regularised = system / num_tasks
    residual = torch.zeros_like(tvs[0])
    for tv, sigma_tilde in zip(tvs, normalised):
        residual += tv @ (sigma_tilde - mean_regularised)
    u, s, vh = torch.linalg.svd(residual + merged, full_matrices=False)
    k = int(s.numel() * k_frac)
    if k == 0:
        return merged
    return merged + s[:k].mean() * (u[:, :k] @ vh[:k, :])


def reference_ace_merge(
    layers: Dict[str, Sequence[Tensor]],
    eps: float,
    tau: float = 0.3,
    k_frac: float = 0.3,
    device: str | torch.device = "cpu",
) -> Dict[str, Tensor]:
    """The per-layer loop: ``{name: [ΔW_1, ..., ΔW_T]}`` in, ``{name: merged}`` out (2-D only)."""
    with torch.no_grad():
        return {
            name: reference_ace_layer(tvs, eps, tau, k_frac, device) for name, tvs in layers.items()
        }
