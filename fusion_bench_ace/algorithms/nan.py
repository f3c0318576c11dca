"""NAN (arXiv 2505.16148) as a plug-in to Task Arithmetic and TIES-Merging.

    fusion_bench method=task_arithmetic_nan modelpool=... taskpool=...
    fusion_bench method=ties_merging_nan modelpool=... taskpool=...
    fusion_bench --config-name ace_model_fusion method=task_arithmetic_nan \\
        modelpool=<CausalLMPool> '~taskpool' merged_model_save_path=DIR   # streamed to disk

Thin adapters of the engine's per-tensor units (:class:`~fusion_bench_ace.methods.nan.
TaskArithmeticNAN`, :class:`~fusion_bench_ace.methods.nan.TiesMergingNAN`), so both stream
tensor by tensor, write to disk and split across ``torchrun`` processes like ACE
(:class:`~fusion_bench_ace.algorithms.base.TensorMergeAlgorithm`):

- **Task Arithmetic + NAN**: ``θ = θ_0 + s Σ_i α_i τ_i``, summed in FusionBench's order; with
  uniform ``α = 1/M`` this is FusionBench's TA with ``scaling_factor = s / M`` (``0.3`` for the
  default ``s = 0.3M``).
- **TIES + NAN**: TIES on ``α_i τ_i`` (per tensor at ``granularity=layer``), then
  ``θ_0 + s τ_merged``; trim, election and disjoint merge equal FusionBench's ``ties_merging`` on
  the flattened model bit for bit (tested), its whole-model threshold and majority sign gathered
  one parameter at a time. Uniform ``α = 1/M`` with ``s = 0.3M`` is FusionBench's TIES with
  ``scaling_factor = 0.3``; at ``granularity=layer`` the per-tensor ``α_i^l`` also change which
  entries survive the (whole-model, per-task) top-k trim, as the spec's "replace ``τ_i`` by
  ``α_i τ_i`` at the input of TIES" implies.

Both merge the floating-point tensors that ``remove_keys`` does not select (regexes, matched as
every name option of the plugin is: :mod:`fusion_bench_ace.engine.selection`; an exact name
selects itself); the others keep their pretrained value and are left out of the norms and of
TIES. ``α`` is logged and written to ``nan_coefficients.json`` beside the run's report.
"""

from __future__ import annotations

import logging
from typing import List, Optional, Sequence, Union

import torch
from fusion_bench.mixins import auto_register_config

from ..engine.selection import NamePatterns
from ..methods.nan import (
    DEFAULT_EPS,
    NANCoefficients,
    TaskArithmeticNAN,
    TiesMergingNAN,
    check_nan_options,
    resolve_global_scale,
)
from ..methods.ties import MERGE_FUNCS, keep_fraction
from .base import TensorMergeAlgorithm
from .common import streaming_mode, write_json_beside_report

log = logging.getLogger(__name__)


class _NANPlugin(TensorMergeAlgorithm):
    """What both adapters share: the options, the coefficients' report."""

    method_name = "nan"

    def _check_options(self, norm_target, granularity, normalize, eps, global_scale, remove_keys,
                       streaming):
        """Everything both adapters can check before a model is loaded."""
        check_nan_options(norm_target, granularity, normalize, eps)
        resolve_global_scale(global_scale, 1)  # the format; the value needs M and comes in run
        streaming_mode(streaming)
        self._remove = NamePatterns.compile(remove_keys, "remove_keys")
        self.coefficients: Optional[NANCoefficients] = None
        self.scale: Optional[float] = None
        self.removed: List[str] = []

    def kept_pretrained(self):
        return self._remove

    def _nan_options(self, expert_names) -> dict:
        self.scale = resolve_global_scale(self.global_scale, len(expert_names))
        return dict(norm_target=self.norm_target, granularity=self.granularity,
                    normalize=self.normalize, eps=self.eps, scale=self.scale,
                    remove=self._remove)

    def describe(self, method) -> str:
        return (f"norm_target={self.norm_target}, granularity={self.granularity}, "
                f"normalize={self.normalize}, global scale s={self.scale:g} ({self.global_scale})")

    def report(self, diagnostics, plan) -> None:
        if diagnostics is None:
            return
        unused = self._remove.unused(list(plan.merge) + list(plan.average) + list(plan.skip))
        if unused:
            log.warning("remove_keys select no tensor of the model (ignored): %s", unused)
        self.removed = self._remove.select(plan.skip)
        self.coefficients = _coefficients(diagnostics, list(plan.merge))
        coefficients = self.coefficients
        if coefficients.alpha.dim() == 1:
            listed = ", ".join(f"{name}={a:.6g} (norm {n:.6g})" for name, a, n in zip(
                coefficients.names, coefficients.alpha.tolist(), coefficients.norms.tolist()))
        else:
            alpha = coefficients.alpha
            listed = ", ".join(
                f"{name}=mean {float(alpha[i].mean()):.6g} [min {float(alpha[i].min()):.6g}, "
                f"max {float(alpha[i].max()):.6g}]" for i, name in enumerate(coefficients.names))
        log.info("%s alpha (norm_target=%s, granularity=%s, normalize=%s, %d tensors): %s; "
                 "global scale s=%g (%s), max/min alpha ratio %.6g", self.method_name,
                 coefficients.norm_target, coefficients.granularity, coefficients.normalize,
                 len(coefficients.keys), listed, self.scale, self.global_scale,
                 coefficients.max_min_ratio())
        data = {"method": self.method_name, "global_scale": self.global_scale,
                "scale": self.scale, "remove_keys": list(self._remove.patterns),
                "removed_tensors": self.removed,
                **{key: diagnostics[key] for key in ("threshold", "merge_func", "entries",
                                                     "magnitude_thresholds", "majority_sign")
                   if key in diagnostics},
                **coefficients.to_dict()}
        if coefficients.alpha.dim() == 1:
            data["effective_weights"] = diagnostics["effective_weights"]
        write_json_beside_report(self, "nan_coefficients.json", data)


def _coefficients(diagnostics: dict, keys: List[str]) -> NANCoefficients:
    """The coefficients a unit recorded, as the :class:`NANCoefficients` of the pool."""
    names = diagnostics["models"]
    if diagnostics["granularity"] == "model":
        norms = torch.tensor([diagnostics["norms"][name] for name in names], dtype=torch.float64)
        alpha = torch.tensor([diagnostics["alpha"][name] for name in names], dtype=torch.float64)
    else:
        rows = {row["name"]: row for row in diagnostics["layers"]}
        norms = torch.tensor([rows[key]["norms"] for key in keys], dtype=torch.float64).T
        alpha = torch.tensor([rows[key]["alpha"] for key in keys], dtype=torch.float64).T
    return NANCoefficients(names=list(names), keys=keys,
                           norm_target=diagnostics["norm_target"],
                           granularity=diagnostics["granularity"],
                           normalize=diagnostics["normalize"], eps=diagnostics["eps"],
                           norms=norms, alpha=alpha)


@auto_register_config
class TaskArithmeticNANAlgorithm(_NANPlugin):
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
        remove_keys: regexes of tensors kept at their pretrained value and left out of the norms.
        device: where the merge math runs: ``cpu``, ``cuda``, ``cuda:N`` or ``auto``.
        streaming: ``auto`` reads the experts tensor by tensor from their safetensors
            checkpoints when every expert is one, else loads them as models; ``true`` requires
            it, ``false`` never streams (the same result bit for bit).
    """

    method_name = "task_arithmetic_nan"
    label = "Task Arithmetic + NAN"

    def __init__(
        self,
        norm_target: str = "finetuned",
        granularity: str = "model",
        normalize: str = "sum",
        global_scale: Union[float, str] = "0.3M",
        eps: float = DEFAULT_EPS,
        remove_keys: Optional[Sequence[str]] = None,
        device: str = "cpu",
        streaming: str = "auto",
    ):
        # No **kwargs: a misspelt option (+method.epss=...) must fail, not be logged and ignored.
        super().__init__()
        self._check_options(norm_target, granularity, normalize, eps, global_scale, remove_keys,
                            streaming)

    def build_method(self, expert_names):
        return TaskArithmeticNAN(expert_names, **self._nan_options(expert_names))


@auto_register_config
class TiesMergingNANAlgorithm(_NANPlugin):
    """TIES-Merging with NAN coefficients: TIES on ``α_i τ_i``, then ``θ_0 + s τ_merged``.

    Args:
        norm_target, granularity, normalize, global_scale, eps, device, streaming: as for
            :class:`TaskArithmeticNANAlgorithm`.
        threshold: TIES' trim: keep the top-k% entries (by magnitude) of each flattened task
            vector; values > 1 are percent (FusionBench: 20), values <= 1 fractions.
        merge_func: TIES' disjoint merge: ``sum`` (FusionBench's and AdaMerging's default),
            ``mean`` (the TIES paper's disjoint mean) or ``max``.
        remove_keys: as for :class:`TaskArithmeticNANAlgorithm`; also left out of TIES.
    """

    method_name = "ties_merging_nan"
    label = "TIES-Merging + NAN"

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
        device: str = "cpu",
        streaming: str = "auto",
    ):
        # No **kwargs: a misspelt option (+method.epss=...) must fail, not be logged and ignored.
        super().__init__()
        self._check_options(norm_target, granularity, normalize, eps, global_scale, remove_keys,
                            streaming)
        _check_ties_options(threshold, merge_func)

    def build_method(self, expert_names):
        return TiesMergingNAN(expert_names, threshold=self.threshold, merge_func=self.merge_func,
                              **self._nan_options(expert_names))


def _check_ties_options(threshold, merge_func) -> None:
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
        raise ValueError(f"threshold must be a number (top-k%% kept); got {threshold!r}")
    if not 0 < keep_fraction(threshold) < 1:
        raise ValueError(
            "threshold is the share of entries TIES keeps per task vector: a percentage in "
            f"(1, 100) or a fraction in (0, 1); got {threshold!r} (FusionBench's default is 20)"
        )
    if not isinstance(merge_func, str) or merge_func.split("-")[-1] not in MERGE_FUNCS:
        raise ValueError(
            f"merge_func must be one of {list(MERGE_FUNCS)} (optionally 'dis-' prefixed); "
            f"got {merge_func!r}"
        )
