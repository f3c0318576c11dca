"""NAN (arXiv 2505.16148) as a plug-in to FusionBench's Task Arithmetic and TIES-Merging.

    fusion_bench method=task_arithmetic_nan modelpool=... taskpool=...
    fusion_bench method=ties_merging_nan modelpool=... taskpool=...

Thin adapters: the coefficients ``α`` come from :mod:`fusion_bench_ace.methods.nan`; the merges are
FusionBench's own functions with ``α`` in place of the uniform weighting (``docs/nan.md``). These
classes are ``BaseAlgorithm`` subclasses of their own, not subclasses of FusionBench's
``TaskArithmeticAlgorithm`` / ``TiesMergingAlgorithm``:

- **Task Arithmetic + NAN**: ``θ = θ_0 + s Σ_i α_i τ_i``. FusionBench's TA is
  ``θ_0 + λ Σ_i τ_i``; the task vectors are computed, scaled and summed with FusionBench's
  ``state_dict_sub`` / ``state_dict_mul`` / ``state_dict_add``. With uniform ``α = 1/M`` this is
  FusionBench's TA with ``scaling_factor = s / M`` (``0.3`` for the default ``s = 0.3M``).
- **TIES + NAN**: FusionBench's ``TiesMergingAlgorithm.run`` flattens the task vectors
  (``state_dict_to_vector``), runs ``ties_merging`` (trim, elect, disjoint merge) and returns
  ``θ_0 + scaling_factor · τ_merged``. Here each flattened ``τ_i`` is multiplied by ``α_i`` (per
  tensor at ``granularity=layer``) *before* ``ties_merging``, and ``scaling_factor = s``. Trim,
  election and merge are FusionBench's functions; the three merge functions are positively
  homogeneous, so uniform ``α = 1/M`` with ``s = 0.3M`` is FusionBench's TIES with
  ``scaling_factor = 0.3``. At ``granularity=layer`` the per-tensor ``α_i^l`` also change which
  entries survive TIES' (whole-model, per-task) top-k trim, as the spec's "replace ``τ_i`` by
  ``α_i τ_i`` at the input of TIES" implies.

Both merge only floating-point tensors that ``remove_keys`` does not select (regexes, matched as
every name option of the plugin is: :mod:`fusion_bench_ace.engine.selection`; an exact name selects
itself, as in FusionBench's TIES); the others keep their pretrained value and are left out of the
norms.
(FusionBench's TIES drops ``remove_keys`` from the merged state dict and then fails to load it
into an ``nn.Module``; keeping the pretrained value is the evident intent.)
"""

from __future__ import annotations

import logging
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from fusion_bench import BaseAlgorithm, BaseModelPool
from fusion_bench.method.ties_merging.ties_merging_utils import (
    state_dict_to_vector,
    ties_merging,
    vector_to_state_dict,
)
from fusion_bench.mixins import SimpleProfilerMixin, auto_register_config
from fusion_bench.utils.state_dict_arithmetic import (
    state_dict_add,
    state_dict_mul,
    state_dict_sub,
)
from torch import Tensor, nn

from ..engine.selection import NamePatterns
from ..methods.nan import (
    DEFAULT_EPS,
    NANCoefficients,
    check_nan_options,
    compute_nan_coefficients,
    resolve_global_scale,
)
from .common import load_pool_state_dicts, write_json_beside_report

log = logging.getLogger(__name__)

TIES_MERGE_FUNCS = ("sum", "mean", "max")


def _merge_keys(pretrained: Dict[str, Tensor], remove: NamePatterns) -> Tuple[List[str], List[str]]:
    """``(merged, removed)`` tensor names: the floating-point ones ``remove_keys`` does not select
    are merged."""
    unused = remove.unused(pretrained)
    if unused:
        log.warning("remove_keys select no tensor of the model (ignored): %s", unused)
    removed = remove.select(pretrained)
    removed_set = set(removed)
    keys = [k for k, v in pretrained.items() if v.is_floating_point() and k not in removed_set]
    if not keys:
        raise ValueError(
            f"no floating-point tensor left to merge after remove_keys={list(remove.patterns)}"
        )
    return keys, removed


class _NANPlugin:
    """What both adapters share: load the pool, compute and report ``α`` and ``s``."""

    method_name = "nan"

    def _check_options(self, norm_target, granularity, normalize, eps, global_scale, remove_keys):
        """Everything both adapters can check before a model is loaded."""
        check_nan_options(norm_target, granularity, normalize, eps)
        resolve_global_scale(global_scale, 1)  # the format; the value needs M and comes in run
        self._remove = NamePatterns.compile(remove_keys, "remove_keys")
        self.coefficients: Optional[NANCoefficients] = None
        self.scale: Optional[float] = None
        self.removed: List[str] = []

    def _coefficients(
        self, modelpool
    ) -> Tuple[nn.Module, Dict[str, Dict[str, Tensor]], List[str], NANCoefficients, float]:
        if not isinstance(modelpool, BaseModelPool):
            modelpool = BaseModelPool(modelpool)
        with self.profile("load models"):
            # the experts' copies of removed tensors are neither merged nor compared
            pretrained_model, experts = load_pool_state_dicts(modelpool, self._remove)
        pretrained = pretrained_model.state_dict()
        keys, self.removed = _merge_keys(pretrained, self._remove)
        with self.profile("norms"):
            coefficients = compute_nan_coefficients(
                pretrained,
                experts,
                keys,
                norm_target=self.norm_target,
                granularity=self.granularity,
                normalize=self.normalize,
                eps=self.eps,
            )
        scale = resolve_global_scale(self.global_scale, len(experts))
        self.coefficients = coefficients
        self.scale = scale
        return pretrained_model, experts, keys, coefficients, scale

    def _report(self, coefficients: NANCoefficients, scale: float, extra: dict) -> None:
        names = coefficients.names
        if coefficients.alpha.dim() == 1:
            listed = ", ".join(
                f"{name}={a:.6g} (norm {n:.6g})"
                for name, a, n in zip(
                    names, coefficients.alpha.tolist(), coefficients.norms.tolist()
                )
            )
        else:
            alpha = coefficients.alpha
            listed = ", ".join(
                f"{name}=mean {float(alpha[i].mean()):.6g} [min {float(alpha[i].min()):.6g}, "
                f"max {float(alpha[i].max()):.6g}]"
                for i, name in enumerate(names)
            )
            for j, key in enumerate(coefficients.keys):
                log.debug("NAN alpha %s: %s", key, alpha[:, j].tolist())
        log.info(
            "%s alpha (norm_target=%s, granularity=%s, normalize=%s, %d tensors): %s; "
            "global scale s=%g (%s), max/min alpha ratio %.6g",
            self.method_name,
            coefficients.norm_target,
            coefficients.granularity,
            coefficients.normalize,
            len(coefficients.keys),
            listed,
            scale,
            self.global_scale,
            coefficients.max_min_ratio(),
        )
        data = {
            "method": self.method_name,
            "global_scale": self.global_scale,
            "scale": scale,
            "remove_keys": list(self._remove.patterns),
            "removed_tensors": list(self.removed),
            **extra,
            **coefficients.to_dict(),
        }
        if coefficients.alpha.dim() == 1:
            data["effective_weights"] = {
                name: scale * a for name, a in zip(names, coefficients.alpha.tolist())
            }
        write_json_beside_report(self, "nan_coefficients.json", data)


@auto_register_config
class TaskArithmeticNANAlgorithm(_NANPlugin, SimpleProfilerMixin, BaseAlgorithm):
    """Task Arithmetic with NAN coefficients: ``θ = θ_0 + s Σ_i α_i τ_i``.

    Args:
        norm_target: ``finetuned`` (norms of ``θ_i``, primary) or ``task_vector`` (of ``τ_i``).
        granularity: ``model`` (one ``α_i`` from the global norm, primary) or ``layer`` (one per
            tensor).
        normalize: ``sum`` of the reciprocal norms (primary) or ``softmax`` over them.
        global_scale: ``s``: a number, ``"<x>M"`` (``x`` times the number of experts; default
            ``"0.3M"`` = FusionBench TA with ``scaling_factor=0.3`` when ``α`` is uniform) or
            ``"m_half"``.
        eps: added to every norm before its reciprocal.
        remove_keys: regexes of tensors kept at their pretrained value and left out of the norms
            (selected as :mod:`fusion_bench_ace.engine.selection` says: ``re.match``; an exact name
            selects itself).
    """

    method_name = "task_arithmetic_nan"

    def __init__(
        self,
        norm_target: str = "finetuned",
        granularity: str = "model",
        normalize: str = "sum",
        global_scale: Union[float, str] = "0.3M",
        eps: float = DEFAULT_EPS,
        remove_keys: Optional[Sequence[str]] = None,
    ):
        # No **kwargs: a misspelt option (+method.epss=...) must fail, not be logged and ignored.
        super().__init__()
        self._check_options(norm_target, granularity, normalize, eps, global_scale, remove_keys)

    @torch.no_grad()
    def run(self, modelpool: BaseModelPool) -> nn.Module:
        pretrained_model, experts, keys, coefficients, scale = self._coefficients(modelpool)
        pretrained = pretrained_model.state_dict()
        base = {key: pretrained[key] for key in keys}
        with self.profile("merge weights"):
            update = None
            for i, state in enumerate(experts.values()):
                task_vector = state_dict_sub({key: state[key] for key in keys}, base)
                if coefficients.alpha.dim() == 1:
                    scaled = state_dict_mul(task_vector, scale * coefficients.coefficient(i, 0))
                else:
                    scaled = {
                        key: (scale * coefficients.coefficient(i, j)) * task_vector[key]
                        for j, key in enumerate(keys)
                    }
                update = scaled if update is None else state_dict_add(update, scaled)
                del task_vector
            merged = state_dict_add(base, update)
        state_dict = dict(pretrained)
        state_dict.update(merged)
        pretrained_model.load_state_dict(state_dict)
        self._report(coefficients, scale, {})
        self.print_profile_summary("Task Arithmetic + NAN profile")
        return pretrained_model


@auto_register_config
class TiesMergingNANAlgorithm(_NANPlugin, SimpleProfilerMixin, BaseAlgorithm):
    """TIES-Merging with NAN coefficients: TIES on ``α_i τ_i``, then ``θ_0 + s τ_merged``.

    Args:
        norm_target, granularity, normalize, global_scale, eps: as for
            :class:`TaskArithmeticNANAlgorithm`.
        threshold: TIES' trim: keep the top-k% entries (by magnitude) of each flattened task
            vector; values > 1 are percent (FusionBench: 20), values <= 1 fractions.
        merge_func: TIES' disjoint merge: ``sum`` (FusionBench's and AdaMerging's default),
            ``mean`` (the TIES paper's disjoint mean) or ``max``.
        remove_keys: as for :class:`TaskArithmeticNANAlgorithm`; also left out of TIES.
    """

    method_name = "ties_merging_nan"

    def __init__(
        self,
        norm_target: str = "finetuned",
        granularity: str = "model",
        normalize: str = "sum",
        global_scale: Union[float, str] = "0.3M",
        eps: float = DEFAULT_EPS,
        threshold: float = 20,
        merge_func: str = "sum",
        remove_keys: Optional[Sequence[str]] = None,
    ):
        # No **kwargs: a misspelt option (+method.epss=...) must fail, not be logged and ignored.
        super().__init__()
        self._check_options(norm_target, granularity, normalize, eps, global_scale, remove_keys)
        _check_ties_options(threshold, merge_func)

    @torch.no_grad()
    def run(self, modelpool: BaseModelPool) -> nn.Module:
        pretrained_model, experts, keys, coefficients, scale = self._coefficients(modelpool)
        # as TiesMergingAlgorithm.run: every entry of the state dict except the removed tensors
        # (FusionBench's helpers take exact names: the names remove_keys selected)
        remove_keys = list(self.removed)
        ptm_check = pretrained_model.state_dict(keep_vars=True)
        with self.profile("merge weights"):
            flat_ft = torch.vstack(
                [state_dict_to_vector(state, remove_keys) for state in experts.values()]
            )
            flat_ptm = state_dict_to_vector(ptm_check, remove_keys)
            tv_flat_checks = flat_ft - flat_ptm
            del flat_ft
            self._weigh_rows(tv_flat_checks, ptm_check, remove_keys, keys, coefficients)
            merged_tv = ties_merging(
                tv_flat_checks, reset_thresh=self.threshold, merge_func=self.merge_func
            )
            merged_check = flat_ptm + scale * merged_tv
            merged = vector_to_state_dict(merged_check, ptm_check, remove_keys=remove_keys)
        state_dict = dict(pretrained_model.state_dict())
        state_dict.update({key: value.detach() for key, value in merged.items()})
        pretrained_model.load_state_dict(state_dict)
        self._report(
            coefficients,
            scale,
            {"threshold": self.threshold, "merge_func": self.merge_func},
        )
        self.print_profile_summary("TIES-Merging + NAN profile")
        return pretrained_model

    @staticmethod
    def _weigh_rows(
        tv_flat_checks: Tensor,
        ptm_check: Dict[str, Tensor],
        remove_keys: List[str],
        keys: List[str],
        coefficients: NANCoefficients,
    ) -> None:
        """``τ_i ← α_i τ_i`` in place, in FusionBench's flattening order."""
        if coefficients.alpha.dim() == 1:
            tv_flat_checks.mul_(coefficients.alpha.to(tv_flat_checks.dtype).unsqueeze(1))
            return
        index = {key: j for j, key in enumerate(keys)}
        for i in range(tv_flat_checks.shape[0]):
            # entries outside `keys` (integer buffers) keep weight 1: their task vectors are
            # what FusionBench's TIES merges for them
            weights = {
                key: torch.full(
                    tensor.shape,
                    coefficients.coefficient(i, index[key]) if key in index else 1.0,
                    dtype=tv_flat_checks.dtype,
                )
                for key, tensor in ptm_check.items()
                if key not in remove_keys
            }
            tv_flat_checks[i].mul_(state_dict_to_vector(weights, remove_keys))


def _check_ties_options(threshold, merge_func) -> None:
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
        raise ValueError(f"threshold must be a number (top-k%% kept); got {threshold!r}")
    fraction = threshold / 100 if threshold > 1 else threshold
    if not 0 < fraction < 1:
        raise ValueError(
            "threshold is the share of entries TIES keeps per task vector: a percentage in "
            f"(1, 100) or a fraction in (0, 1); got {threshold!r} (FusionBench's default is 20)"
        )
    if not isinstance(merge_func, str) or merge_func.split("-")[-1] not in TIES_MERGE_FUNCS:
        raise ValueError(
            f"merge_func must be one of {list(TIES_MERGE_FUNCS)} (optionally 'dis-' prefixed); "
            f"got {merge_func!r}"
        )
