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

Options beyond the paper (defaults are the paper's formulas, bit for bit; derivation and the
thresholds' meaning in ``docs/ace_scale_free.md``):

- ``eps_mode="relative"``: ``ε = eps_rel s̄ / d_in`` with ``s̄`` the mean centred trace of the
  tasks in the system, and in the heterogeneous branch the prior divided by ``τ̄ / s̄`` instead of
  ``τ̄``. This is the paper's merge of the layer rescaled to ``s̄ = 1``, scaled back: a common
  rescaling of the task vectors rescales the merged task vector by the same factor.
- ``gamma_mode="scale_free"``: the statistic is ``Var_t[log e_t]`` (γ's numerator), compared with
  ``tau_scale_free``; unchanged by a common rescaling.

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
  and the residual. If no task has centred energy left, the layer is averaged. Rows equal up to
  the rounding of the centring count as equal (``s_t <= (d_out u)² e_t``, ``u`` the compute
  dtype's epsilon: the mean of equal values is not always exact); otherwise that rounding noise
  would get the weight ``1 / s_t`` and swamp the other tasks.
- **k = 0** (tiny layers or ``k_frac`` small): the refinement is skipped (the authors' code takes
  the mean of an empty set and returns NaN).
- **The solve.** ``Σ_t Σ_t,reg`` is symmetric positive definite (ε > 0) and ``C_agg`` is rank one,
  so the system is solved by a Cholesky factorisation and the Sherman-Morrison identity instead of
  the authors' explicit ``inv``; algebraically identical. If the factorisation fails in the compute
  dtype (ε below the precision of the Gram scale), the solve falls back to a float64
  eigendecomposition with a pseudo-inverse, which is the ε → 0 limit of the same formula.
- **Dtypes.** float64 inputs are computed in float64, float32/float16/bfloat16 in float32 (or
  float64 with ``precision="float64"``); the result is cast back to the input dtype. In float32 the
  energies, γ and the task weights are float64 scalars, and the refinement's top-``k`` singular
  triplets come from an eigendecomposition of the smaller Gram matrix of ``W_pre + Δ_res``
  (``F Fᵀ`` or ``Fᵀ F``): the same triplets as an SVD, 2-4x cheaper on rectangular layers; in
  float32 when ``σ_k² >= 1e-3 σ_1²``, else in float64, because a float32 Gram loses the small
  singular values of fast-decaying spectra (measured: relative error 0.5 against 2e-4). If ``σ_k``
  is numerically zero (rank-deficient ``F``, singular vectors not unique) the refinement uses
  ``torch.linalg.svd``. float64 inputs keep the SVD.
- **Short layers** (``T d_out <= d_in``, e.g. ViT's 50 x 768 position embedding with 8 tasks, or a
  Llama's 2048 x 8192 ``down_proj`` with 3): the summed Gram is singular but for ε, and float32
  rounding in its null space is amplified by ~1/ε (measured: relative error 16 on the position
  embedding). They are solved in the ``T d_out``-dimensional row space (:class:`_RowSums`), the
  same merge by the push-through identity, which never meets those directions and costs less.
- **Precision is a choice** (``precision``). ``"float32"`` (default): one pass in float32 whatever
  the layer. Its rounding is amplified by the condition number κ of the system (real task vectors
  have fast-decaying spectra and ε = 1e-5 is tiny next to their Grams) and, heterogeneous, by the
  refinement's sensitivity to ``F``; each result carries the predicted relative distance to the
  float64 merge of the same inputs, ``3 u (κ_est + √d_in)(1 + amplification)`` (``u = 2^-24``,
  ``κ_est`` from 10 power and inverse iterations on the Cholesky factor,
  :func:`_refinement_amplification`), as ``float32_error_estimate``: an upper estimate
  (measured up to 3 decades above the error on random and decaying layers). ``"float64"``: every
  layer accumulated and solved in float64 (about twice the float32 time on a CPU), the float64
  merge of the inputs. No layer is ever computed twice. If
  the float32 Cholesky factorisation fails (ε below float32 precision of the Gram scale), the
  float32 sums are solved through the float64 eigendecomposition below.

How it is computed (performance; none of it changes the formulas above):

- **One pass over the tasks, nothing per task kept.** Energies first (sums of squares, O(mn) per
  task; γ and the branch follow), then each task is centred into one scratch buffer and
  accumulated into ``Σ_t w_t Σ̂_t`` (n x n), ``Σ_t w_t W̃_t Σ̂_t`` (m x n; shared by the numerator
  and the residual), ``Σ_t w_t W̃_t`` and, heterogeneous only, ``Σ_t ΔW_t`` and ``Σ_t w_t Σ̂_t μ_t``.
  Extra memory is O(mn + n²) whatever ``T``; :func:`ace_merge_layer_stream` takes the task
  vectors one at a time from a callable (e.g. straight from checkpoint files), with the same
  arithmetic as the stacked entry points, so both give bit-identical results.
- **Traces are sums of squares**, never ``trace(WᵀW)``.
- **NaN/Inf of a stacked input are decided by the energies** (NaN and Inf survive squaring and
  summing); only non-finite energies trigger the element-wise check that names the tasks. A full
  ``isfinite`` over the ``(T, m, n)`` stack cost 20-35% of a tall layer's merge on one CPU thread.
- **Gram blocks**: at one thread (MKL, AVX2) the blocked Gram below takes 0.72-0.82x the time of
  one ``x.T @ x``; with two OpenMP threads on two busy cores its small block copies were 3-7x
  slower (``python -m fusion_bench_ace.bench`` runs at one thread by default).
- **Gram matrices compute their upper blocks only** (recursive 2 x 2 blocking down to ~192-wide
  blocks, mirrored): ~55-65% of the flops of ``WᵀW``; when the row Gram is the cheaper
  association (``d_out < d_in / 2``) the column Gram goes straight into the accumulator with
  in-place ``addmm``. ``W̃_t Σ̂_t`` is ``W̃_t (W̃_tᵀ W̃_t)`` or ``(W̃_t W̃_tᵀ) W̃_t``, whichever is cheaper,
  accumulated in place (no per-task product tensor).
- **Task weights** ``w_t = 1 / s_t`` (heterogeneous) make every weighted Gram trace one, so the
  float32 accumulators stay in range whatever the energies; a running rescale guards vanishing
  task vectors (``w_t > 1e30``). The residual, the only quantity not homogeneous in the weights,
  is divided by that scale.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Callable, List, Optional

import torch
from torch import Tensor

from .base import AVERAGE, KEEP, MERGE, TensorMergeMethod, register
from .tensors import TaskVectors, check_finite, compute_dtype_for, stack_task_vectors

__all__ = [
    "ACE",
    "EPS_MODES",
    "GAMMA_MODES",
    "PRECISIONS",
    "ACELayerResult",
    "ACEOptions",
    "ace_merge_layer",
    "ace_merge_layer_stream",
    "ace_merge_layer_with_info",
    "check_ace_hyperparameters",
    "heterogeneity",
    "merge_layer",
    "merge_layer_stream",
]

TaskSource = Callable[[int], Tensor]
"""``task_vector(t) -> Tensor (d_out, d_in)`` for ``t in range(num_tasks)``; called twice per
task."""

_GRAM_LEAF = 192  # Gram blocks narrower than 2 * this are computed whole
_MAX_WEIGHT = 1e30  # float32 accumulators stay far from overflow below this task weight
_ENERGY_CHUNK = 1 << 20  # elements squared at a time for the energies (bounded temporaries)
# Predicted float32 error of W_pre: _FLOAT32_ERROR_PER_CONDITION u κ_est (u = 2^-24, κ_est the
# estimated condition number of the system). Measured on every 2-D layer of the CLIP and GPT-2
# tracks at ε = 1e-5 ... 1, both branches: relative error <= 2.5 u κ_est (median 0.2-2).
_FLOAT32_ERROR_PER_CONDITION = 3.0
_CONDITION_ITERATIONS = 10
# the refinement's float32 Gram is used when σ_k² / σ_1² is at least this: its float32 rounding
# (~√d u σ_1²) then stays three decades below σ_k²
_FLOAT32_GRAM_FLOOR = 1e-3
_FLOAT32_EPS = torch.finfo(torch.float32).eps / 2  # u = 2^-24, the unit roundoff

EPS_MODES = ("absolute", "relative")
"""``absolute``: the ridge is ``eps`` (the paper). ``relative``: ``eps_rel`` times the mean
eigenvalue of the layer's mean centred Gram matrix, and the heterogeneous branch's prior in the
same units (``docs/ace_scale_free.md``): the merge scales with a common rescaling of the inputs."""
GAMMA_MODES = ("paper", "scale_free")
"""``paper``: ``γ = Var[log e] / Mean[log e]²`` against ``tau``. ``scale_free``: ``Var[log e]``
against ``tau_scale_free``, unchanged by a common rescaling of the task vectors."""
PRECISIONS = ("float32", "float64")
"""What non-float64 inputs are computed in: ``float32`` (one float32 pass, the default, with its
predicted error reported) or ``float64`` (the exact merge of the inputs, about 2x the time)."""


@dataclass(frozen=True)
class ACELayerResult:
    """What one layer's merge produced, for diagnostics (γ per layer, branch, spectra)."""

    merged: Tensor
    """The merged task vector, in the input dtype."""
    gamma: float
    """Heterogeneity statistic of the tasks used: γ (``gamma_mode="paper"``) or ``Var[log e]``
    (``"scale_free"``), the value compared with the mode's threshold."""
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
    eps: Optional[float] = None
    """The ridge ε the closed form used (``eps``, or ``eps_rel`` × the layer's mean Gram
    eigenvalue in ``relative`` mode); ``None`` when the layer was not solved (a fallback)."""
    compute_dtype: Optional[torch.dtype] = None
    """What the layer was computed in: float32, or float64 (``precision="float64"``, float64
    inputs, short layers)."""
    float32_error_estimate: Optional[float] = None
    """Predicted ``‖W_32 - W_64‖_F / ‖W_64‖_F`` of a layer solved in float32 (``None`` when it
    was computed in float64 or not solved)."""
    solved_in: Optional[str] = None
    """``"columns"`` (the ``d_in x d_in`` system) or ``"rows"`` (the ``T d_out`` row space);
    ``None`` when the layer was not solved."""


@dataclass(frozen=True)
class ACEOptions:
    """The hyperparameters of a merge, validated once when built (every layer then reuses them).

    ``eps_rel`` is required when ``eps_mode="relative"``, ``tau_scale_free`` when
    ``gamma_mode="scale_free"``; either is checked whenever it is given. Numbers are stored as
    Python floats.
    """

    eps: float = 1e-5
    tau: float = 0.3
    k_frac: float = 0.3
    eps_mode: str = "absolute"
    eps_rel: Optional[float] = None
    gamma_mode: str = "paper"
    tau_scale_free: Optional[float] = None
    precision: str = "float32"

    def __post_init__(self):
        eps, tau, k_frac = self.eps, self.tau, self.k_frac
        if not _is_number(eps) or not math.isfinite(eps) or eps <= 0:
            raise ValueError(f"eps must be a finite number > 0 (Tikhonov strength); got {eps!r}")
        if not _is_number(tau) or math.isnan(tau) or tau < 0:
            raise ValueError(f"tau must be >= 0 (heterogeneity threshold); got {tau!r}")
        if not _is_number(k_frac) or not (0.0 <= k_frac <= 1.0):
            raise ValueError(f"k_frac must lie in [0, 1] (spectral rank fraction); got {k_frac!r}")
        _check_choice("eps_mode", self.eps_mode, EPS_MODES)
        _check_choice("gamma_mode", self.gamma_mode, GAMMA_MODES)
        _check_choice("precision", self.precision, PRECISIONS)
        eps_rel, tau_scale_free = self.eps_rel, self.tau_scale_free
        if eps_rel is None and self.eps_mode == "relative":
            raise ValueError("eps_mode='relative' needs eps_rel (the ridge / mean Gram eigenvalue)")
        if eps_rel is not None and (not _is_number(eps_rel) or not math.isfinite(eps_rel)
                                    or eps_rel <= 0):
            raise ValueError(
                f"eps_rel must be a finite number > 0 (relative ridge); got {eps_rel!r}"
            )
        if tau_scale_free is None and self.gamma_mode == "scale_free":
            raise ValueError(
                "gamma_mode='scale_free' needs tau_scale_free (threshold on Var[log e])"
            )
        if tau_scale_free is not None and (not _is_number(tau_scale_free)
                                           or math.isnan(tau_scale_free) or tau_scale_free < 0):
            raise ValueError(
                f"tau_scale_free must be >= 0 (threshold on Var[log e]); got {tau_scale_free!r}"
            )
        for name in ("eps", "tau", "k_frac", "eps_rel", "tau_scale_free"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, float(value))

    def heterogeneity(self, nonzero_energies: Tensor) -> float:
        return _heterogeneity(nonzero_energies, self.gamma_mode)

    @property
    def threshold(self) -> float:
        return self.tau_scale_free if self.gamma_mode == "scale_free" else self.tau

    def describe(self) -> str:
        """The options that decide the merge, as a log line fragment."""
        ridge = (f"eps={self.eps:g}" if self.eps_mode == "absolute"
                 else f"eps_mode=relative, eps_rel={self.eps_rel:g}")
        branch = (f"tau={self.tau:g}" if self.gamma_mode == "paper"
                  else f"gamma_mode=scale_free, tau_scale_free={self.tau_scale_free:g}")
        return f"{ridge}, {branch}, k_frac={self.k_frac:g}, precision={self.precision}"


def check_ace_hyperparameters(
    eps: float,
    tau: float,
    k_frac: float,
    *,
    eps_mode: str = "absolute",
    eps_rel: Optional[float] = None,
    gamma_mode: str = "paper",
    tau_scale_free: Optional[float] = None,
    precision: str = "float32",
) -> None:
    """Reject hyperparameters outside the ranges the method is defined on (see
    :class:`ACEOptions`)."""
    ACEOptions(eps, tau, k_frac, eps_mode, eps_rel, gamma_mode, tau_scale_free, precision)


def _check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}; got {value!r}")


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def heterogeneity(task_vectors: TaskVectors, gamma_mode: str = "paper") -> float:
    """The heterogeneity statistic of one layer's task vectors, over the non-zero ones.

    ``gamma_mode="paper"``: γ (Eq. 7), the unbiased variance of ``log ||ΔW_t||_F^2`` over its
    squared mean. ``"scale_free"``: the unbiased variance alone. Fewer than two non-zero tasks or
    equal energies give 0.
    """
    if gamma_mode not in GAMMA_MODES:
        raise ValueError(f"gamma_mode must be one of {', '.join(GAMMA_MODES)}; got {gamma_mode!r}")
    stacked = stack_task_vectors(task_vectors, ndim=None)
    dtype = compute_dtype_for(stacked.dtype)
    energies = torch.tensor(
        [_energy(stacked[t].to(dtype)) for t in range(stacked.shape[0])], dtype=torch.float64
    )
    return _heterogeneity(energies[energies > 0], gamma_mode)


def ace_merge_layer(
    task_vectors: TaskVectors,
    eps: float,
    tau: float = 0.3,
    k_frac: float = 0.3,
    *,
    eps_mode: str = "absolute",
    eps_rel: Optional[float] = None,
    gamma_mode: str = "paper",
    tau_scale_free: Optional[float] = None,
    precision: str = "float32",
) -> Tensor:
    """Merge the task vectors of one 2-D weight with ACE-Merging (Algorithm 1).

    Args:
        task_vectors: ``T`` tensors of shape ``(d_out, d_in)`` (as ``torch.nn.Linear`` stores its
            weight), or one tensor of shape ``(T, d_out, d_in)``.
        eps: Tikhonov strength ε > 0.
        tau: heterogeneity threshold τ >= 0; the heterogeneous branch runs when γ > τ.
        k_frac: spectral rank fraction in [0, 1]; ``k = floor(k_frac * min(d_out, d_in))``.
        eps_mode: ``"absolute"`` (the paper: the ridge is ``eps``) or ``"relative"`` (the ridge
            is ``eps_rel`` times the mean eigenvalue of the layer's mean centred Gram matrix, the
            heterogeneous prior in the same units: the merge scales with the inputs).
        eps_rel: relative ridge > 0, required by ``eps_mode="relative"``.
        gamma_mode: ``"paper"`` (γ against ``tau``) or ``"scale_free"`` (``Var[log e]`` against
            ``tau_scale_free``).
        tau_scale_free: threshold >= 0 on ``Var[log e]``, required by ``gamma_mode="scale_free"``.
        precision: ``"float32"`` (one float32 pass for non-float64 inputs, its predicted error
            reported) or ``"float64"`` (computed in float64).

    Returns:
        The merged task vector, same shape and dtype as the inputs (add it, scaled, to the
        pretrained weight).

    Raises:
        ValueError: empty input, mismatched or non-2-D shapes, NaN/Inf values, or
            hyperparameters out of range.
    """
    options = ACEOptions(eps, tau, k_frac, eps_mode, eps_rel, gamma_mode, tau_scale_free,
                         precision)
    return merge_layer(task_vectors, options).merged


def ace_merge_layer_with_info(
    task_vectors: TaskVectors,
    eps: float,
    tau: float = 0.3,
    k_frac: float = 0.3,
    *,
    eps_mode: str = "absolute",
    eps_rel: Optional[float] = None,
    gamma_mode: str = "paper",
    tau_scale_free: Optional[float] = None,
    precision: str = "float32",
    keep_preliminary: bool = False,
) -> ACELayerResult:
    """:func:`ace_merge_layer`, also returning γ, the branch taken and (optionally) ``W_pre``."""
    options = ACEOptions(eps, tau, k_frac, eps_mode, eps_rel, gamma_mode, tau_scale_free,
                         precision)
    return merge_layer(task_vectors, options, keep_preliminary=keep_preliminary)


def merge_layer(
    task_vectors: TaskVectors, options: ACEOptions, *, keep_preliminary: bool = False
) -> ACELayerResult:
    """:func:`ace_merge_layer_with_info` with options validated beforehand (:class:`ACEOptions`)."""
    if isinstance(task_vectors, Tensor):  # NaN/Inf: checked through the energies (pass 1)
        stacked, unchecked = _validate_stack(task_vectors), task_vectors
    else:
        stacked, unchecked = stack_task_vectors(task_vectors, ndim=2), None
    result, _ = _merge(
        lambda t: stacked[t],
        stacked.shape[0],
        options,
        keep_preliminary=keep_preliminary,
        device=stacked.device,
        validated=(tuple(stacked.shape[1:]), stacked.dtype),
        finite_unchecked=unchecked,
    )
    return _cast_result(result, stacked.dtype)


def ace_merge_layer_stream(
    task_vector: TaskSource,
    num_tasks: int,
    eps: float,
    tau: float = 0.3,
    k_frac: float = 0.3,
    *,
    eps_mode: str = "absolute",
    eps_rel: Optional[float] = None,
    gamma_mode: str = "paper",
    tau_scale_free: Optional[float] = None,
    precision: str = "float32",
    device: str | torch.device | None = None,
    keep_preliminary: bool = False,
) -> ACELayerResult:
    """:func:`ace_merge_layer_with_info` on task vectors produced one at a time
    (:func:`merge_layer_stream`)."""
    options = ACEOptions(eps, tau, k_frac, eps_mode, eps_rel, gamma_mode, tau_scale_free,
                         precision)
    return merge_layer_stream(task_vector, num_tasks, options, device=device,
                              keep_preliminary=keep_preliminary)


def merge_layer_stream(
    task_vector: TaskSource,
    num_tasks: int,
    options: ACEOptions,
    *,
    device: str | torch.device | None = None,
    keep_preliminary: bool = False,
) -> ACELayerResult:
    """:func:`merge_layer` on task vectors produced one at a time.

    ``task_vector(t)`` must return task ``t``'s ``(d_out, d_in)`` task vector (any float dtype,
    any device; the same tensor each time it is asked): it is called twice per task, once for
    the energies and once for the accumulation, and nothing per task is kept, so the extra memory
    is O(d_out d_in + d_in²) whatever ``num_tasks``. The result equals, bit for bit, the stacked
    entry points on the same values and device. ``device`` is where the math runs (default: the
    first task vector's device). Inputs are validated as :func:`ace_merge_layer` does (shape,
    float dtype, NaN/Inf, naming the task).
    """
    if isinstance(num_tasks, bool) or not isinstance(num_tasks, int) or num_tasks < 1:
        raise ValueError(f"num_tasks must be a positive int; got {num_tasks!r}")
    result, input_dtype = _merge(
        task_vector,
        num_tasks,
        options,
        keep_preliminary=keep_preliminary,
        device=None if device is None else torch.device(device),
        validated=None,
    )
    return _cast_result(result, input_dtype)


def _cast_result(result: ACELayerResult, dtype: torch.dtype) -> ACELayerResult:
    if result.merged.dtype == dtype:
        return replace(result, compute_dtype=dtype)
    merged = result.merged.to(dtype)
    if not bool(torch.isfinite(merged).all()):
        # The merge is finite in the compute dtype (inputs were); only the narrower dtype fails.
        largest = float(result.merged.abs().max())
        raise ValueError(
            f"the merged task vector (max |value| {largest:.3g}) does not fit in {dtype}; "
            f"merge in float32 (cast the experts up) or lower the scaling"
        )
    return replace(result, merged=merged, compute_dtype=result.merged.dtype)


def _energy(x: Tensor) -> float:
    """``||x||_F^2`` as a Python float: float32 partial sums of bounded chunks, added in float64.

    torch's own reduction (not BLAS ``dot``), so the value does not depend on the buffer's
    alignment: a task vector gives the same energy as a view into a stack or as its own tensor.
    """
    flat = x.reshape(-1)
    total = 0.0
    for start in range(0, flat.numel(), _ENERGY_CHUNK):
        chunk = flat[start : start + _ENERGY_CHUNK]
        total += float(torch.sum(chunk * chunk))
    return total


def _heterogeneity(nonzero_energies: Tensor, gamma_mode: str) -> float:
    if gamma_mode == "scale_free":
        return _log_energy_variance(nonzero_energies)
    return _gamma(nonzero_energies)


def _log_energy_variance(nonzero_energies: Tensor) -> float:
    """Unbiased ``Var_t[log e_t]``; 0 for fewer than two tasks or equal energies."""
    if nonzero_energies.numel() < 2:
        return 0.0
    log_e = nonzero_energies.log()
    if bool((log_e == log_e[0]).all()):  # exact 0; var() of equal values can round to 1e-32
        return 0.0
    return float(log_e.var(correction=1))


def _gamma(nonzero_energies: Tensor) -> float:
    variance = _log_energy_variance(nonzero_energies)
    if variance == 0.0:
        return 0.0
    mean_sq = float(nonzero_energies.log().mean()) ** 2
    if mean_sq == 0.0:
        return math.inf
    return variance / mean_sq


def _merge(
    source: TaskSource,
    num_tasks: int,
    options: ACEOptions,
    *,
    keep_preliminary: bool,
    device: Optional[torch.device],
    validated: Optional[tuple],
    finite_unchecked: Optional[Tensor] = None,
) -> tuple[ACELayerResult, torch.dtype]:
    """Both passes over ``source``; returns the result in the compute dtype and the input dtype.

    ``validated``: ``(shape, dtype)`` when the caller already checked the inputs (a stack);
    ``None`` makes pass 1 check every task vector (shape, float dtype, NaN/Inf).
    ``finite_unchecked``: a validated stack not yet checked for NaN/Inf: finite energies prove
    every value finite (NaN and Inf propagate through squares and sums); otherwise the stack is
    checked element-wise, raising the usual error naming the tasks.
    """
    # Pass 1: energies (and, for a stream, validation and the common dtype).
    energies = []
    shape, dtype = validated if validated is not None else (None, None)
    for t in range(num_tasks):
        x = source(t)
        if validated is None:
            shape, dtype, device = _check_streamed(x, t, shape, dtype, device)
        elif device is None:
            device = x.device
        energies.append(_energy(x.to(device=device, dtype=_compute_dtype(x.dtype, options))))
        del x
    if finite_unchecked is not None and not all(map(math.isfinite, energies)):
        check_finite(finite_unchecked, what="task vector")  # raises, unless a square overflowed
    compute = _compute_dtype(dtype, options)
    m, n = shape
    energy = torch.tensor(energies, dtype=torch.float64)
    nonzero = [t for t in range(num_tasks) if energies[t] > 0]
    if not nonzero:
        zeros = torch.zeros(m, n, dtype=compute, device=device)
        return ACELayerResult(zeros, 0.0, False, 0, 0, fallback="all-zero"), dtype
    gamma = options.heterogeneity(energy[energy > 0])
    heterogeneous = gamma > options.threshold

    def task(t: int) -> Tensor:
        return source(t).to(device=device, dtype=compute)

    if m == 1:  # centring over one row leaves nothing: average, like a 1-D parameter
        total = torch.zeros(m, n, dtype=compute, device=device)
        for t in nonzero:
            total.add_(task(t))
        average = total.div_(len(nonzero))
        return ACELayerResult(average, gamma, heterogeneous, 0, len(nonzero), "average"), dtype

    relative = options.eps_mode == "relative"
    if _solves_in_row_space(len(nonzero), m, n):
        acc = _RowSums(m, n, len(nonzero), compute, device, heterogeneous, relative)
    else:
        acc = _ColumnSums(m, n, compute, device, heterogeneous, relative)
    for t in nonzero:  # Pass 2
        acc.add(task(t), energies[t])
    return acc.finish(options, gamma, len(nonzero), keep_preliminary), dtype


def _solves_in_row_space(num_tasks: int, m: int, n: int) -> bool:
    """``T d_out <= d_in``: ``Σ_t Σ̂_t`` has rank ``<= T (d_out - 1) < d_in`` and the row-space
    system (:class:`_RowSums`) is the smaller one."""
    return num_tasks * m <= n


def _compute_dtype(dtype: torch.dtype, options: ACEOptions) -> torch.dtype:
    return torch.float64 if options.precision == "float64" else compute_dtype_for(dtype)


def _validate_stack(stacked: Tensor) -> Tensor:
    """The checks of :func:`stack_task_vectors` on a ``(T, d_out, d_in)`` tensor but NaN/Inf.

    An element-wise ``isfinite`` over the whole stack measured 20-35% of a tall layer's merge on
    one CPU thread; the energies of pass 1 decide it for free (see :func:`_merge`).
    """
    if stacked.dim() < 1 or stacked.shape[0] == 0:
        raise ValueError("task_vectors is empty: expected at least one task vector")
    if stacked.dim() != 3:
        raise ValueError(
            f"expected 2-D task vectors (d_out x d_in), got shape {tuple(stacked.shape[1:])}"
        )
    if not stacked.is_floating_point():
        raise ValueError(f"task vectors have dtype {stacked.dtype}; expected a float dtype")
    return stacked


def _check_streamed(x, t, shape, dtype, device):
    if not isinstance(x, Tensor):
        raise ValueError(f"task vector {t} is a {type(x).__name__}, expected a torch.Tensor")
    if x.dim() != 2:
        raise ValueError(f"expected 2-D task vectors (d_out x d_in), got shape {tuple(x.shape)}")
    if shape is not None and tuple(x.shape) != shape:
        raise ValueError(
            f"task vectors must all have the same shape; task vector {t} has "
            f"{tuple(x.shape)}, task vector 0 has {shape}"
        )
    if not x.is_floating_point():
        raise ValueError(f"task vector {t} has dtype {x.dtype}; expected a float dtype")
    check_finite(x.unsqueeze(0), what="task vector", names=[str(t)])
    dtype = x.dtype if dtype is None else torch.promote_types(dtype, x.dtype)
    return tuple(x.shape), dtype, x.device if device is None else device


class _LayerSums:
    """What both ways of solving a layer share: centring each task vector, its centred trace and
    weight, ε and the prior's scale, and the heterogeneous refinement (pass 2)."""

    def __init__(self, m: int, n: int, dtype: torch.dtype, device, heterogeneous: bool,
                 track_centred_energy: bool):
        self.m, self.n, self.heterogeneous = m, n, heterogeneous
        self.dtype, self.device = dtype, device
        self.track_centred_energy = track_centred_energy or heterogeneous
        # s_t at or below this multiple of e_t is the rounding of centring rows that are equal
        self.noise_ratio = (m * torch.finfo(dtype).eps) ** 2
        if heterogeneous:
            self.unusable_means = self._zeros(n)  # Σ μ_t over tasks with W̃_t = 0 (ΔW_t = 1 μ_tᵀ)
        self.used = 0
        self.energy_used = 0.0  # Σ e_t (uncentred energies) of the tasks used
        self.centred_energy = 0.0  # Σ s_t (centred traces) of the tasks used, when tracked

    def _zeros(self, *size) -> Tensor:
        return torch.zeros(*size, dtype=self.dtype, device=self.device)

    def _centre(self, x: Tensor, energy: float, out: Tensor) -> tuple[Tensor, float]:
        """``(μ_t, s_t)`` with ``W̃_t`` written into ``out``; ``s_t = 0`` for a task the
        heterogeneous branch leaves out (rows all equal), which is then recorded as such."""
        mu = x.mean(dim=0)
        flat = torch.sub(x, mu, out=out).reshape(-1)
        s = 0.0
        if self.track_centred_energy:
            # float32: a float32 dot over d_out d_in terms errs by up to ~1e-6 relative, which the
            # weights 1 / s_t pass on to the merge; the chunked float64 sum does not
            s = float(torch.dot(flat, flat)) if flat.dtype == torch.float64 else _energy(flat)
            if s <= self.noise_ratio * energy:
                s = 0.0
            if s == 0.0 and self.heterogeneous:  # no trace normalisation: left out of the system
                self.unusable_means.add_(mu)
                return mu, s
            self.centred_energy += s
        self.used += 1
        self.energy_used += energy
        return mu, s

    def _average_of_unusable(self, gamma: float, nonzero: int) -> ACELayerResult:
        """Heterogeneous and no task has centred energy left: the average (rows all equal)."""
        average = self.unusable_means.div(nonzero).expand(self.m, self.n).clone()
        return ACELayerResult(average, gamma, True, 0, nonzero, "average")

    def _ridge_and_prior_scale(self, options: ACEOptions) -> tuple[float, float]:
        """ε and the factor on the prior row ``c`` (1, or ``1 / τ̄`` heterogeneous; Eq. 13).

        ``relative`` (docs/ace_scale_free.md) is the paper's formulas on the layer rescaled to
        unit mean centred trace ``s̄``: ``ε = eps_rel s̄ / d_in`` and, heterogeneous, the prior over
        ``τ̄ / s̄`` instead of ``τ̄``; both then scale like the Grams, so the merge is equivariant.
        """
        if options.eps_mode == "absolute":
            prior_scale = self.used / self.energy_used if self.heterogeneous else 1.0
            return options.eps, prior_scale
        mean_centred = self.centred_energy / self.used  # s̄
        if mean_centred == 0.0:  # homogeneous, every W̃_t = 0: W_pre = 0 for any ε > 0
            return options.eps_rel, 1.0
        prior_scale = self.centred_energy / self.energy_used if self.heterogeneous else 1.0
        return options.eps_rel * mean_centred / self.n, prior_scale

    def _result(self, options: ACEOptions, gamma: float, eps: float, preliminary: Tensor,
                residual: Optional[Tensor], predicted_error: Optional[float],
                keep_preliminary: bool) -> ACELayerResult:
        """``W_pre`` (homogeneous), or ``W_pre`` refined by ``W_pre + Δ_res`` (Eqs. 17-19)."""
        kept = preliminary if keep_preliminary else None
        if not self.heterogeneous:
            return ACELayerResult(preliminary, gamma, False, 0, self.used, None, kept, eps,
                                  float32_error_estimate=predicted_error,
                                  solved_in=self.solved_in)
        fused = residual.add_(preliminary)
        rank_k = int(min(self.m, self.n) * options.k_frac)
        merged = preliminary
        if rank_k > 0:
            refinement, amplification = _isotropic_top_k(fused, rank_k)
            merged = preliminary + refinement
            if predicted_error is not None and math.isfinite(predicted_error):
                # the refinement passes W_pre's error on, amplified (Daleckii-Krein)
                merged_norm = float(torch.linalg.norm(merged))
                ratio = float(torch.linalg.norm(preliminary)) / merged_norm if merged_norm else 1.0
                predicted_error *= (1.0 + amplification) * ratio
        return ACELayerResult(merged, gamma, True, rank_k, self.used, None, kept, eps,
                              float32_error_estimate=predicted_error, solved_in=self.solved_in)


class _ColumnSums(_LayerSums):
    """The ``d_in x d_in`` system ``Σ_t w_t Σ_t,reg`` accumulated one task vector at a time:
    nothing per task is kept (extra memory O(d_out d_in + d_in²) whatever ``T``)."""

    solved_in = "columns"

    def __init__(self, m, n, dtype, device, heterogeneous, track_centred_energy):
        super().__init__(m, n, dtype, device, heterogeneous, track_centred_energy)
        # W̃_t (W̃_tᵀ W̃_t) or (W̃_t W̃_tᵀ) W̃_t: the cheaper association when d_out << d_in
        self.row_gram = 2 * m < n
        self.sigma = self._zeros(n, n)  # Σ_t w_t Σ̂_t (upper blocks only while row_gram adds)
        self.gram_term = self._zeros(m, n)  # Σ_t w_t W̃_t Σ̂_t
        self.centred_sum = self._zeros(m, n)  # Σ_t w_t W̃_t
        self.centred = torch.empty(m, n, dtype=dtype, device=device)  # scratch: W̃_t
        if heterogeneous:
            self.task_sum = self._zeros(m, n)  # Σ_t ΔW_t (tasks used)
            self.mean_term = self._zeros(n)  # Σ_t w_t Σ̂_t μ_t
        self.scale = 1.0  # every weight is scale / s_t (heterogeneous)
        self.weight_total = 0.0

    def add(self, x: Tensor, energy: float) -> None:
        used = self.used
        mu, s = self._centre(x, energy, self.centred)
        if self.used == used:  # left out
            return
        centred = self.centred
        if self.heterogeneous:
            w = self.scale / s
            if w > _MAX_WEIGHT:  # a vanishing task vector: rescale what is accumulated
                self._rescale(_MAX_WEIGHT / w)
                w = self.scale / s
            self.task_sum.add_(x)
        else:
            w = 1.0
        self.weight_total += w
        if self.row_gram:
            _add_gram_upper(self.sigma, centred, w, 0, self.n)
            rows = _gram(centred.T)  # W̃_t W̃_tᵀ, (m, m)
            self.gram_term.addmm_(rows, centred, alpha=w)
            if self.heterogeneous:  # Σ̂_t μ_t = W̃_tᵀ (W̃_t μ_t)
                self.mean_term.add_(centred.T @ (centred @ mu), alpha=w)
        else:
            gram = _gram(centred)  # Σ̂_t, (n, n)
            self.sigma.add_(gram, alpha=w)
            self.gram_term.addmm_(centred, gram, alpha=w)
            if self.heterogeneous:
                self.mean_term.add_(gram @ mu, alpha=w)
        self.centred_sum.add_(centred, alpha=w)

    def _rescale(self, factor: float) -> None:
        for tensor in (self.sigma, self.gram_term, self.centred_sum, self.mean_term):
            tensor.mul_(factor)
        self.weight_total *= factor
        self.scale *= factor

    def finish(
        self, options: ACEOptions, gamma: float, nonzero: int, keep_preliminary: bool
    ) -> ACELayerResult:
        """The merge from the sums (float32 sums: with the predicted error of float32)."""
        if self.used == 0:
            return self._average_of_unusable(gamma, nonzero)
        del self.centred
        sigma = self.sigma
        if self.row_gram:  # only the upper blocks were accumulated
            _mirror_upper(sigma)
        eps, prior_scale = self._ridge_and_prior_scale(options)
        prior_row = sigma.mean(dim=0).mul_(prior_scale)  # c
        regularised = sigma  # Σ_t w_t Σ_t,reg = Σ_t w_t Σ̂_t + ε Σ_t w_t I
        regularised.diagonal().add_(eps * self.weight_total)
        residual = None
        if self.heterogeneous:
            # Δ_res = Σ_t ΔW_t Σ̃_t - (Σ_t ΔW_t) mean_t Σ_t,reg, with ΔW_t Σ̂_t = W̃_t Σ̂_t +
            # 1 (Σ̂_t μ_t)ᵀ, divided by the running weight scale (the only term that is not
            # homogeneous in it). Taken before the numerator reuses gram_term's memory.
            residual = torch.add(self.gram_term, self.mean_term.unsqueeze(0))
            residual.addmm_(self.task_sum, regularised, alpha=-1.0 / self.used)
            residual.div_(self.scale)
            del self.task_sum
        factor, predicted_error = None, None
        if regularised.dtype != torch.float64:
            # float32 rounding of the sums is amplified by the system's condition number κ
            factor, info = torch.linalg.cholesky_ex(regularised)
            if int(info) == 0:
                predicted_error = _float32_error(self.n, _condition_estimate(regularised, factor))
            else:  # not positive definite in float32: the float64 pseudo-inverse solve below
                factor, predicted_error = None, math.inf
        numerator = self.gram_term.add_(self.centred_sum, alpha=eps)
        del self.centred_sum, self.gram_term
        preliminary = _solve_with_rank_one_prior(numerator, regularised, prior_row, factor)
        del numerator, factor, regularised, sigma, self.sigma
        return self._result(options, gamma, eps, preliminary, residual, predicted_error,
                            keep_preliminary)


class _RowSums(_LayerSums):
    """The same merge solved in the ``T d_out``-dimensional row space, for layers with
    ``T d_out <= d_in`` (short and wide: the ``d_in x d_in`` system has rank ``<= T (d_out - 1)``).

    With ``A`` the stacked ``√w_t W̃_t`` (``T d_out x d_in``), ``Σ_t w_t Σ_t,reg = AᵀA + λI``
    (``λ = ε Σ_t w_t``), ``K = A Aᵀ``, the numerator is ``M A`` with ``M_t = (K_tt + ε w_t I) /
    √w_t``, and the push-through identity ``A (AᵀA + λI)^-1 = (K + λI)^-1 A`` turns every solve
    with the ``d_in x d_in`` system into one with ``K + λI``; the prior ``c = Aᵀ a`` (``a`` the
    scaled row sums of ``A``) stays a Sherman-Morrison update. Algebraically the same merge. The
    ``d_in``-space null directions of the system, which only ε holds and where float32 rounding
    of the column form is amplified by ~1/ε, never enter; ``K``'s own near-null directions (the
    centred rows' ``1``) are met by ``A``'s rows, which are orthogonal to them, so float32 stays
    accurate. Memory: the ``T`` centred task vectors and two ``T d_out`` square matrices, less than
    one ``d_in x d_in`` matrix.
    """

    solved_in = "rows"

    def __init__(self, m, n, num_tasks, dtype, device, heterogeneous, track_centred_energy):
        super().__init__(m, n, dtype, device, heterogeneous, track_centred_energy)
        self.rows = torch.empty(num_tasks * m, n, dtype=dtype, device=device)  # W̃_t, stacked
        self.means: List[Tensor] = []  # μ_t of the tasks used
        self.traces: List[float] = []  # s_t of the tasks used (heterogeneous)

    def add(self, x: Tensor, energy: float) -> None:
        used, m = self.used, self.m
        mu, s = self._centre(x, energy, self.rows[used * m:(used + 1) * m])
        if self.used > used:
            self.means.append(mu)
            self.traces.append(s)

    def finish(
        self, options: ACEOptions, gamma: float, nonzero: int, keep_preliminary: bool
    ) -> ACELayerResult:
        if self.used == 0:
            return self._average_of_unusable(gamma, nonzero)
        m, n, used = self.m, self.n, self.used
        size = used * m
        rows = self.rows[:size]  # becomes A
        if self.heterogeneous:  # w_t = scale / s_t with scale = min s: every w_t <= 1
            scale = min(self.traces)
            weights = [scale / s for s in self.traces]
        else:
            scale, weights = 1.0, [1.0] * used
        roots = [math.sqrt(w) for w in weights]
        for t, root in enumerate(roots):
            if root != 1.0:
                rows[t * m:(t + 1) * m].mul_(root)
        eps, prior_scale = self._ridge_and_prior_scale(options)
        ridge = eps * sum(weights)  # λ
        row_sums = rows.sum(dim=1)  # A 1
        kernel = _gram(rows.T)  # K = A Aᵀ, (T m, T m)
        blocks = [slice(t * m, (t + 1) * m) for t in range(used)]
        rhs = torch.empty(size, m + 1, dtype=rows.dtype, device=rows.device)  # [Mᵀ | a]
        for t, block in enumerate(blocks):
            torch.div(kernel[block, block], roots[t], out=rhs[block, :m])
            rhs[block, :m].diagonal().add_(eps * roots[t])
        torch.mul(row_sums, prior_scale / n, out=rhs[:, m])
        residual_rows = None
        if self.heterogeneous:
            residual_rows, residual_rank_one = self._residual_factors(kernel, rows, blocks,
                                                                      roots, ridge)
        kernel.diagonal().add_(ridge)
        factor, info = torch.linalg.cholesky_ex(kernel)
        predicted_error = None
        if int(info) == 0:
            solved = torch.cholesky_solve(rhs, factor)
            if rows.dtype != torch.float64:
                basis = _centred_rows_basis(used, m, rows.dtype, rows.device)
                predicted_error = _float32_error(n, _condition_estimate(kernel, factor, basis))
        else:  # not positive definite in the compute dtype: the pseudo-inverse (ε -> 0 limit)
            solved = _pinv_solve(kernel, rhs)
            predicted_error = None if rows.dtype == torch.float64 else math.inf
        del factor, kernel, rhs
        # W_pre = Y - (Y 1)(S^-1 c)ᵀ / (1 + 1ᵀ S^-1 c), Y = N S^-1 = M (K + λI)^-1 A,
        # S^-1 c = Aᵀ (K + λI)^-1 a
        preliminary = solved[:, :m].T @ rows  # Y
        s_inv_c = rows.T @ solved[:, m]
        denominator = 1.0 + s_inv_c.sum()
        preliminary.sub_(torch.outer(preliminary.sum(dim=1), s_inv_c).div_(denominator))
        residual = None
        if residual_rows is not None:
            residual = residual_rows @ rows
            residual.add_(residual_rank_one.unsqueeze(0)).div_(scale)
        return self._result(options, gamma, eps, preliminary, residual, predicted_error,
                            keep_preliminary)

    def _residual_factors(self, kernel: Tensor, rows: Tensor, blocks, roots, ridge: float):
        """``Q`` (``d_out x T d_out``) and ``v`` with ``Δ_res · scale = Q A + 1 vᵀ``.

        ``Σ_t w_t ΔW_t Σ̂_t = Σ_t (K_tt / √w_t) A_t + 1 (Σ_t A_tᵀ A_t μ_t)ᵀ`` and
        ``(Σ_t ΔW_t)(AᵀA + λI) = (Σ_s K_s,: / √w_s) A + 1 (Aᵀ A μ̄)ᵀ + λ Σ_t ΔW_t`` with
        ``Σ_t ΔW_t = Σ_t A_t / √w_t + 1 μ̄ᵀ`` and ``μ̄ = Σ_t μ_t`` (tasks used).
        """
        used = self.used
        mean_sum = torch.stack(self.means).sum(dim=0)  # μ̄
        factors = torch.zeros(self.m, kernel.shape[0], dtype=rows.dtype, device=rows.device)
        for s, block in enumerate(blocks):  # - (1/T) Σ_s K_s,: / √w_s
            factors.add_(kernel[block], alpha=-1.0 / (used * roots[s]))
        rank_one = rows.T @ (rows @ mean_sum)  # Aᵀ A μ̄
        rank_one.mul_(-1.0 / used).add_(mean_sum, alpha=-ridge / used)
        for t, block in enumerate(blocks):
            factors[:, block].add_(kernel[block, block], alpha=1.0 / roots[t])
            factors[:, block].diagonal().sub_(ridge / (used * roots[t]))
            a_t = rows[block]
            rank_one.add_(a_t.T @ (a_t @ self.means[t]))
        return factors, rank_one


def _float32_error(n: int, condition: float) -> float:
    """Predicted relative float32 error of ``W_pre``: ``3 u (κ_est + √d_in)`` (the second term:
    rounding of the length-``d_in`` sums themselves, which κ does not amplify)."""
    return _FLOAT32_ERROR_PER_CONDITION * _FLOAT32_EPS * (condition + math.sqrt(n))


def _mirror_upper(square: Tensor, block: int = 1024) -> None:
    """Copy the strict upper triangle of ``square`` onto its lower one, in place, a block of
    columns at a time (no full-size temporary)."""
    n = square.shape[0]
    for lo in range(0, n, block):
        hi = min(lo + block, n)
        if lo:
            square[lo:hi, :lo] = square[:lo, lo:hi].T
        piece = square[lo:hi, lo:hi]
        piece.copy_(torch.triu(piece) + torch.triu(piece, diagonal=1).T)


def _centred_rows_basis(num_tasks: int, m: int, dtype, device) -> Tensor:
    """An orthonormal basis of the directions of ``K = A Aᵀ`` that centring annihilates (a
    constant vector per task block), ``(T m, T)``."""
    basis = torch.zeros(num_tasks * m, num_tasks, dtype=dtype, device=device)
    for t in range(num_tasks):
        basis[t * m:(t + 1) * m, t] = 1.0 / math.sqrt(m)
    return basis


def _gram(x: Tensor) -> Tensor:
    """``xᵀ x`` from its upper blocks (recursive 2 x 2 split, mirrored): ~5/8 of the flops."""
    n = x.shape[1]
    out = torch.empty(n, n, dtype=x.dtype, device=x.device)
    _gram_blocks(x, out, 0, n)
    return out


def _gram_blocks(x: Tensor, out: Tensor, lo: int, hi: int) -> None:
    width = hi - lo
    if width < 2 * _GRAM_LEAF:
        block = x[:, lo:hi]
        out[lo:hi, lo:hi] = block.T @ block
        return
    mid = lo + width // 2
    cross = x[:, lo:mid].T @ x[:, mid:hi]
    out[lo:mid, mid:hi] = cross
    out[mid:hi, lo:mid] = cross.T
    _gram_blocks(x, out, lo, mid)
    _gram_blocks(x, out, mid, hi)


def _add_gram_upper(acc: Tensor, x: Tensor, alpha: float, lo: int, hi: int) -> None:
    """``acc += alpha xᵀ x`` on the diagonal and upper blocks of ``acc`` only, in place."""
    width = hi - lo
    if width < 2 * _GRAM_LEAF:
        block = x[:, lo:hi]
        acc[lo:hi, lo:hi].addmm_(block.T, block, alpha=alpha)
        return
    mid = lo + width // 2
    acc[lo:mid, mid:hi].addmm_(x[:, lo:mid].T, x[:, mid:hi], alpha=alpha)
    _add_gram_upper(acc, x, alpha, lo, mid)
    _add_gram_upper(acc, x, alpha, mid, hi)


def _isotropic_top_k(fused: Tensor, k: int) -> tuple[Tensor, float]:
    """``σ̄_k U_k V_kᵀ`` of ``fused`` (Eqs. 18-19), in ``fused``'s dtype, and its amplification.

    float32: from an eigendecomposition of the smaller Gram matrix (``F Fᵀ`` or ``Fᵀ F``, the
    same triplets as the SVD, cheaper), in float32 when the spectrum at ``k`` stands well above
    float32 rounding of the Gram (``σ_k² >= 1e-3 σ_1²``), else in float64 (a float32 Gram would
    lose the small singular values of fast-decaying spectra: measured relative error 0.5 against
    2e-4); float64 inputs, or a numerically zero ``σ_k`` (singular vectors not unique):
    ``torch.linalg.svd``. The amplification (:func:`_refinement_amplification`) is computed on the
    float32 path only (0 otherwise).
    """
    m, n = fused.shape
    if fused.dtype != torch.float64:
        wide = m <= n
        gram = _gram(fused.T if wide else fused)
        eigenvalues, eigenvectors = torch.linalg.eigh(gram)
        del gram
        f = fused
        if float(eigenvalues[-k]) < _FLOAT32_GRAM_FLOOR * float(eigenvalues[-1]):
            f = fused.to(torch.float64)
            eigenvalues, eigenvectors = torch.linalg.eigh(f @ f.T if wide else f.T @ f)
        top = eigenvalues[-k:].flip(0)  # descending σ_1² .. σ_k²
        cutoff = (float(eigenvalues[-1]) * min(m, n) * 16
                  * torch.finfo(eigenvalues.dtype).eps)
        if float(top[-1]) > cutoff:
            singular = top.sqrt()
            vectors = eigenvectors[:, -k:].flip(1)
            if wide:  # U_k, and V_kᵀ = Σ_k^-1 U_kᵀ F
                product = vectors @ ((vectors.T @ f) / singular.unsqueeze(1))
            else:  # V_k, and U_k = F V_k Σ_k^-1
                product = ((f @ vectors) / singular) @ vectors.T
            every = eigenvalues.to(torch.float64).clamp(min=0).flip(0).sqrt()  # σ_1 >= ...
            amplification = _refinement_amplification(every, k, m, n)
            return product.mul_(singular.mean()).to(fused.dtype), amplification
    u, s, vh = torch.linalg.svd(fused, full_matrices=False)
    return s[:k].mean() * (u[:, :k] @ vh[:k]), 0.0


def _refinement_amplification(singular: Tensor, k: int, m: int, n: int) -> float:
    """``E‖δR‖_F / ‖δF‖_F`` for ``R = σ̄_k U_k V_kᵀ(F)`` and a random perturbation ``δF``.

    First order, ``δF`` with i.i.d. entries (how rounding errors look), ``singular`` all of
    ``F``'s singular values, descending. The Daleckii-Krein form of the derivative of
    ``U_k V_kᵀ`` in ``F``'s singular bases has entries ``1 / (σ_i - σ_j)`` across the gap
    (``i <= k < j``), ``(g_i + g_j) / (σ_i + σ_j)`` with ``g = 1`` on the top ``k``, and ``1 / σ_i``
    for the ``|m - n|`` directions outside the square part. On the GPT-2 track's layers it gave
    0.9-1.5x the float32 error of the refinement on 12 of 14, 3.7x and 11x on two.
    """
    top, rest = singular[:k], singular[k:]
    gap = top.unsqueeze(1) - rest.unsqueeze(0)  # i <= k < j
    if bool((gap <= 0).any()):
        return math.inf  # σ_k = σ_(k+1): U_k is not unique
    across = (gap.reciprocal() ** 2).sum() + ((top.unsqueeze(1) + rest.unsqueeze(0)).reciprocal()
                                              ** 2).sum()
    pair_sums = top.unsqueeze(1) + top.unsqueeze(0)
    diagonal = (top.reciprocal() ** 2).sum()
    within = ((4.0 * pair_sums.reciprocal() ** 2).sum() + diagonal) / 2.0  # i < j, and i = j
    outside = diagonal * abs(m - n)
    total = float(across + within + outside)
    return float(top.mean()) * math.sqrt(total) / math.sqrt(m * n)


def _condition_estimate(spd: Tensor, factor: Tensor, known_null: Optional[Tensor] = None
                        ) -> float:
    """``λ_max / λ_min`` of ``spd`` (Cholesky ``factor``), from power and inverse iterations.

    Rayleigh quotients after a few iterations from a fixed random start (deterministic): each
    bound moves inward, so the estimate is at most the true condition number (measured 0.6-1.0
    of it on the embedded tracks' layers after 10 iterations). ``known_null``: orthonormal
    columns spanning directions left out of ``λ_min`` (those the solve's right-hand sides do not
    reach; see :class:`_RowSums`).
    """
    n = spd.shape[0]
    generator = torch.Generator(device=spd.device).manual_seed(0)
    top, bottom = torch.randn(2, n, generator=generator, dtype=spd.dtype,
                              device=spd.device).unbind(0)

    def deflate(v: Tensor) -> Tensor:
        return v if known_null is None else v - known_null @ (known_null.T @ v)

    bottom = deflate(bottom)
    for _ in range(_CONDITION_ITERATIONS):
        top = spd @ top
        top /= torch.linalg.vector_norm(top)
        # two triangular solves: cholesky_solve copies the factor on every call (40 ms at 3072)
        half = torch.linalg.solve_triangular(factor, bottom.unsqueeze(1), upper=False)
        bottom = deflate(torch.linalg.solve_triangular(factor.T, half, upper=True).squeeze(1))
        bottom /= torch.linalg.vector_norm(bottom)
    largest = float(torch.dot(top, spd @ top))
    smallest = float(torch.dot(bottom, spd @ bottom))
    return largest / smallest if smallest > 0 else math.inf


def _solve_with_rank_one_prior(
    numerator: Tensor, spd: Tensor, prior_row: Tensor, factor: Optional[Tensor] = None
) -> Tensor:
    """``numerator @ (spd + 1 prior_rowᵀ)^-1`` for symmetric positive definite ``spd``.

    Sherman-Morrison: ``N (S + 1 cᵀ)^-1 = Y - (Y 1)(S^-1 c)ᵀ / (1 + cᵀ S^-1 1)`` with
    ``Y = N S^-1``.
    ``cᵀ S^-1 1 >= 0`` here (c is a mean row of a PSD matrix that ``S`` dominates), so the
    denominator is >= 1 and the update is stable. ``factor``: ``spd``'s Cholesky factor, if known.
    """
    rhs = torch.cat([numerator, prior_row.unsqueeze(0)], dim=0).T  # (n, m + 1)
    info = 0
    if factor is None:
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


# --- the per-tensor unit the engine runs ----------------------------------------------------------


@register
class ACE(TensorMergeMethod):
    """ACE-Merging of a model: every 2-D weight by :func:`merge_layer`, the other floating-point
    parameters by the mean of their task vectors, ``θ = θ_0 + scaling_factor · merged``.

    ``exclude`` / ``average`` / ``spectrum``: name selectors (``.matches(name)``) of parameters
    kept at their pretrained value, 2-D parameters averaged instead, and layers whose singular
    values of ``W_pre`` and of the merge go into the diagnostics. ``check_precision``: also merge
    each float32 layer in float64 and record the measured relative difference (about 3x the
    time; the default records the predicted one).
    """

    name = "ace"

    def __init__(self, options: ACEOptions, *, scaling_factor: float = 1.0, exclude=None,
                 average=None, spectrum=None, check_precision: bool = False):
        self.options = options
        self.scaling_factor = float(scaling_factor)
        self._exclude, self._average, self._spectrum = exclude, average, spectrum
        self.check_precision = bool(check_precision)
        self.layers: List[dict] = []

    def treatment(self, name, shape, dtype) -> str:
        if not dtype.is_floating_point or (self._exclude is not None
                                           and self._exclude.matches(name)):
            return KEEP
        if len(shape) == 2 and not (self._average is not None and self._average.matches(name)):
            return MERGE
        return AVERAGE

    def merge(self, name, task_vectors, base):
        spectrum = self._spectrum is not None and self._spectrum.matches(name)
        info = merge_layer(task_vectors, self.options, keep_preliminary=spectrum)
        row = {
            "name": name,
            "shape": list(task_vectors.shape[1:]),
            "gamma": info.gamma,
            "heterogeneous": info.heterogeneous,
            "eps": info.eps,
            "compute_dtype": str(info.compute_dtype).removeprefix("torch."),
            "solved_in": info.solved_in,
            "float32_error_estimate": _json_number(info.float32_error_estimate),
            "rank_k": info.rank_k,
            "tasks_used": info.tasks_used,
            "fallback": info.fallback,
        }
        if self.check_precision and info.compute_dtype == torch.float32:
            exact = merge_layer(task_vectors.to(torch.float64), self.options).merged
            scale = float(torch.linalg.norm(exact))
            error = float(torch.linalg.norm(info.merged.to(torch.float64) - exact))
            row["float32_error"] = error / scale if scale > 0 else error
        if spectrum and info.preliminary is not None:  # None: averaged (fallback) layers
            row["singular_values"] = {
                "preliminary": _singular_values(info.preliminary),
                "merged": _singular_values(info.merged),
            }
        self.layers.append(row)
        return info.merged

    def cost(self, shape, num_tasks) -> float:
        """The ``T`` covariances' ``T d_out d_in²`` multiply-adds of a 2-D weight (timed per
        GPT-2 shape it predicts the CPU time within 15 %; see :mod:`fusion_bench_ace.engine.
        distributed`), or ``T d_out (T d_out + 2 d_in)`` solved in the row space."""
        if len(shape) != 2:
            return super().cost(shape, num_tasks)
        d_out, d_in = shape
        if _solves_in_row_space(num_tasks, d_out, d_in):
            return float(num_tasks * d_out) * d_in * (num_tasks * d_out + 2 * d_out)
        return float(num_tasks) * d_out * d_in ** 2

    def diagnostics(self):
        return {**asdict(self.options), "layers": self.layers}


def _json_number(value: Optional[float]):
    """JSON has no infinity: an unbounded estimate is written as the string ``"inf"``."""
    if value is None or math.isfinite(value):
        return value
    return "inf"


def _singular_values(matrix: Tensor) -> List[float]:
    """Singular values, largest first, computed in float64 (a diagnostic, not the merge)."""
    return torch.linalg.svdvals(matrix.detach().to(torch.float64)).tolist()
