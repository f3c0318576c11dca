"""A deliberately naive float64 ACE-Merging, written from the paper's equations.

Independent of ``fusion_bench_ace.ace``: Python loops, explicit per-task matrices, the explicit
inverse of the full system matrix (Eq. 14 as printed), the residual of Eq. 17 with the uncentred
task vectors, the SVD refinement of Eqs. 18-19. It carries the same documented edge-case choices
(zero task vectors left out, single-row weights averaged, k = 0 skips the refinement, tasks with
no centred energy left out of the heterogeneous system), so it can be compared everywhere.
"""

from __future__ import annotations

import math

import torch


def naive_gamma(task_vectors):
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
    if mean == 0:
        return math.inf
    return variance / mean**2


def naive_ace(task_vectors, eps, tau=0.3, k_frac=0.3):
    """Returns (merged float64 tensor, heterogeneous flag)."""
    tvs = [w.double() for w in task_vectors]
    m, n = tvs[0].shape
    tvs = [w for w in tvs if float((w * w).sum()) > 0]
    if not tvs:
        return torch.zeros(m, n, dtype=torch.float64), False
    gamma = naive_gamma(tvs)
    het = gamma > tau
    if m == 1:
        return sum(tvs) / len(tvs), het

    centred = [w - w.mean(dim=0, keepdim=True) for w in tvs]
    if het:
        pairs = [(w, c) for w, c in zip(tvs, centred) if float(torch.trace(c.T @ c)) > 0]
        if not pairs:
            return sum(tvs) / len(tvs), het
        tvs = [w for w, _ in pairs]
        centred = [c for _, c in pairs]
    T = len(tvs)
    eye = torch.eye(n, dtype=torch.float64)

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
        c_agg = c_agg / tau_bar

    numerator = sum(c @ s for c, s in zip(centred, sigma_reg))
    system = sum(sigma_reg) + c_agg
    w_pre = numerator @ torch.linalg.inv(system)
    if not het:
        return w_pre, het

    sigma_bar = sum(sigma_reg) / T
    residual = sum(w @ (s - sigma_bar) for w, s in zip(tvs, sigma_tilde))
    fused = w_pre + residual
    u, s, vh = torch.linalg.svd(fused, full_matrices=False)
    k = int(min(m, n) * k_frac)
    if k == 0:
        return w_pre, het
    sigma_iso = s[:k].mean()
    return w_pre + sigma_iso * u[:, :k] @ vh[:k, :], het
