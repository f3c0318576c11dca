"""A deliberately naive float64 ACE-Merging, written from the paper's equations.

Independent of ``fusion_bench_ace.methods.ace``: Python loops, explicit per-task matrices, the
explicit inverse of the full system matrix (Eq. 14 as printed), the residual of Eq. 17 with the
uncentred task vectors, the SVD refinement of Eqs. 18-19. It carries the same documented edge-case
choices (zero task vectors left out, single-row weights averaged, k = 0 skips the refinement, tasks
with no centred energy left out of the heterogeneous system), so it can be compared everywhere.

The options beyond the paper (``docs/ace_scale_free.md``) are written from their definitions:
``eps_mode="relative"`` sets ``ε = eps_rel · mean_t tr(W̃_tᵀ W̃_t) / d_in`` over the tasks in the
system and, heterogeneous, divides the prior by ``τ̄ / mean_t tr(W̃_tᵀ W̃_t)``;
``gamma_mode="scale_free"`` compares the sample variance of the log energies with
``tau_scale_free``.
"""

from __future__ import annotations

import math

import torch


def naive_gamma(task_vectors, gamma_mode="paper"):
    logs = []
    for w in task_vectors:
        energy = float(torch.trace(w.double().T @ w.double()))
        if energy > 0:
            logs.append(math.log(energy))
    if len(logs) < 2:
        return 0.0
    mean = sum(logs) / len(logs)
    variance = sum((x - mean) ** 2 for x in logs) / (len(logs) - 1)
    if variance == 0:
        return 0.0
    if gamma_mode == "scale_free":
        return variance
    if mean == 0:
        return math.inf
    return variance / mean**2


def naive_ace(task_vectors, eps, tau=0.3, k_frac=0.3, *, eps_mode="absolute", eps_rel=None,
              gamma_mode="paper", tau_scale_free=None, with_spectrum=False):
    """Returns (merged float64 tensor, heterogeneous flag).

    ``with_spectrum=True`` adds a third item: the singular values of ``W_pre + Δ_res`` when the
    refinement ran (its top-``k`` singular vectors are unique only if ``σ_k > σ_(k+1)``), else
    ``None``.
    """
    merged, het, spectrum = _naive_ace(task_vectors, eps, tau, k_frac, eps_mode, eps_rel,
                                       gamma_mode, tau_scale_free)
    return (merged, het, spectrum) if with_spectrum else (merged, het)


def _naive_ace(task_vectors, eps, tau, k_frac, eps_mode, eps_rel, gamma_mode, tau_scale_free):
    tvs = [w.double() for w in task_vectors]
    m, n = tvs[0].shape
    tvs = [w for w in tvs if float((w * w).sum()) > 0]
    if not tvs:
        return torch.zeros(m, n, dtype=torch.float64), False, None
    gamma = naive_gamma(tvs, gamma_mode)
    het = gamma > (tau_scale_free if gamma_mode == "scale_free" else tau)
    if m == 1:
        return sum(tvs) / len(tvs), het, None

    centred = [w - w.mean(dim=0, keepdim=True) for w in tvs]
    # rows equal up to the rounding of the mean have no centred energy
    resolution = (m * torch.finfo(torch.float64).eps) ** 2
    traces = [float(torch.trace(c.T @ c)) for c in centred]
    traces = [0.0 if s <= resolution * float(torch.trace(w.T @ w)) else s
              for w, s in zip(tvs, traces)]
    if het:
        pairs = [(w, c) for w, c, s in zip(tvs, centred, traces) if s > 0]
        if not pairs:
            return sum(tvs) / len(tvs), het, None
        tvs = [w for w, _ in pairs]
        centred = [c for _, c in pairs]
    T = len(tvs)
    eye = torch.eye(n, dtype=torch.float64)
    # the energy unit of the relative mode: the mean centred trace of the tasks in the system
    # (the tasks left out of the heterogeneous system have trace 0)
    unit = sum(traces) / T
    if eps_mode == "relative":
        eps = eps_rel * unit / n if unit > 0 else eps_rel  # unit 0: every W̃_t = 0, W_pre = 0

    sigma_tilde, sigma_reg = [], []
    for c in centred:
        sigma_hat = c.T @ c
        trace = torch.trace(sigma_hat)
        if het:
            sigma_tilde.append(sigma_hat / trace)
            sigma_reg.append(sigma_hat / trace + (eps / trace) * eye)
        else:
            sigma_tilde.append(sigma_hat)
            sigma_reg.append(sigma_hat + eps * eye)

    total_tilde = sum(sigma_tilde)
    c_row = torch.ones(1, n, dtype=torch.float64) @ total_tilde / n  # mean row
    c_agg = torch.ones(n, 1, dtype=torch.float64) @ c_row  # replicated on every row
    if het:
        tau_bar = sum(float(torch.trace(w.T @ w)) for w in tvs) / T
        c_agg = c_agg / (tau_bar / unit if eps_mode == "relative" else tau_bar)

    numerator = sum(c @ s for c, s in zip(centred, sigma_reg))
    system = sum(sigma_reg) + c_agg
    w_pre = numerator @ torch.linalg.inv(system)
    if not het:
        return w_pre, het, None

    sigma_bar = sum(sigma_reg) / T
    residual = sum(w @ (s - sigma_bar) for w, s in zip(tvs, sigma_tilde))
    fused = w_pre + residual
    u, s, vh = torch.linalg.svd(fused, full_matrices=False)
    k = int(min(m, n) * k_frac)
    if k == 0:
        return w_pre, het, None
    sigma_iso = s[:k].mean()
    return w_pre + sigma_iso * u[:, :k] @ vh[:k, :], het, s
