"""ACE-Merging as a FusionBench algorithm: ``fusion_bench method=ace modelpool=... taskpool=...``.

A thin adapter: the options become one validated :class:`~fusion_bench_ace.methods.ace.ACEOptions`
and an :class:`~fusion_bench_ace.methods.ace.ACE` unit, which the engine runs in memory or
straight into a checkpoint (:class:`~fusion_bench_ace.algorithms.base.TensorMergeAlgorithm`).
"""

from __future__ import annotations

import logging
import math
from typing import List, Optional, Sequence

from fusion_bench.mixins import auto_register_config

from ..engine.selection import NamePatterns
from ..methods.ace import ACE, ACEOptions
from .base import TensorMergeAlgorithm
from .common import streaming_mode, write_json_beside_report

log = logging.getLogger(__name__)


@auto_register_config
class ACEMerging(TensorMergeAlgorithm):
    """ACE-Merging (arXiv 2603.02945): closed-form, covariance-aware, data-free merging.

    Args:
        eps: Tikhonov strength ε (paper: 1e-5 for CLIP ViT, 4e-2 GPT-2, 2e-4 RoBERTa-Base).
        tau: heterogeneity threshold τ; the heterogeneous branch runs when γ > τ.
        k_frac: spectral rank fraction of the refinement.
        eps_mode: ``absolute`` (the paper: the ridge is ``eps``) or ``relative`` (the ridge is
            ``eps_rel`` times each layer's mean Gram eigenvalue, the heterogeneous prior in the
            same units; the merge scales with the task vectors). ``docs/ace_scale_free.md``.
        eps_rel: the relative ridge of ``eps_mode=relative``.
        gamma_mode: ``paper`` (γ = Var[log e] / Mean[log e]² against ``tau``) or ``scale_free``
            (Var[log e] against ``tau_scale_free``, unchanged by a common rescaling).
        tau_scale_free: the threshold of ``gamma_mode=scale_free``.
        scaling_factor: multiplies the merged task vector before it is added to the pretrained
            weights (the authors use 1.0).
        exclude_keys: regexes of parameters kept at their pretrained value (every name option
            selects as :mod:`fusion_bench_ace.engine.selection` says: ``re.match``).
        average_keys: regexes of 2-D parameters merged by averaging instead of ACE (the authors
            average ``text_projection``).
        transpose_conv1d: GPT-2 stores its Conv1D weights as ``d_in x d_out``. ``False`` (default)
            merges them as stored, as the authors did; ``True`` transposes them to the
            ``d_out x d_in`` orientation of the paper's equations first.
        precision: ``float32`` (one float32 pass per layer, its predicted error in the
            diagnostics) or ``float64`` (the float64 merge, about twice the time).
        check_precision: also merge every float32 layer in float64 and record the measured
            relative difference in the diagnostics (``float32_error``; about 3x the time).
        device: where the merge math runs: ``cpu``, ``cuda``, ``cuda:N`` or ``auto``.
        diagnostics: record γ, the branch and the refinement rank of every layer, log a summary
            and write ``ace_diagnostics.json`` beside the run's report.
        streaming: ``auto`` (default) reads the experts tensor by tensor from their safetensors
            checkpoints when every expert is one (peak memory about one model plus one layer's
            task vectors, whatever the number of experts), else loads them as models; ``true``
            requires streaming, ``false`` always loads the experts as models. Same result bit for
            bit either way (:mod:`fusion_bench_ace.engine.io.reader`).
        spectrum_keys: regexes of 2-D parameters whose singular values of ``W_pre`` and of the
            final merged task vector are added to the diagnostics (the paper's Fig. 2); plot
            them with ``python -m fusion_bench_ace.compare diagnostics <ace_diagnostics.json>``.
    """

    label = "ACE-Merging"

    def __init__(
        self,
        eps: float = 1e-5,
        tau: float = 0.3,
        k_frac: float = 0.3,
        eps_mode: str = "absolute",
        eps_rel: Optional[float] = None,
        gamma_mode: str = "paper",
        tau_scale_free: Optional[float] = None,
        precision: str = "float32",
        check_precision: bool = False,
        scaling_factor: float = 1.0,
        exclude_keys: Optional[Sequence[str]] = None,
        average_keys: Optional[Sequence[str]] = None,
        transpose_conv1d: bool = False,
        device: str = "cpu",
        diagnostics: bool = True,
        streaming: str = "auto",
        spectrum_keys: Optional[Sequence[str]] = None,
    ):
        # No **kwargs: a misspelt option (+method.epss=...) must fail, not be logged and ignored.
        super().__init__()
        # validated once, here, so a bad value fails when the method is configured
        self.options = ACEOptions(eps, tau, k_frac, eps_mode, eps_rel, gamma_mode,
                                  tau_scale_free, precision)
        streaming_mode(streaming)
        if isinstance(scaling_factor, bool) or not isinstance(scaling_factor, (int, float)) \
                or not math.isfinite(scaling_factor):
            raise ValueError(f"scaling_factor must be a finite number; got {scaling_factor!r}")
        self._exclude = NamePatterns.compile(exclude_keys, "exclude_keys")
        self._average = NamePatterns.compile(average_keys, "average_keys")
        self._spectrum = NamePatterns.compile(spectrum_keys, "spectrum_keys")
        self.layer_info: List[dict] = []

    def build_method(self, expert_names):
        return ACE(self.options, scaling_factor=self.scaling_factor, exclude=self._exclude,
                   average=self._average, spectrum=self._spectrum,
                   check_precision=self.check_precision)

    def kept_pretrained(self):
        return self._exclude

    def transposes_conv1d(self) -> bool:
        return bool(self.transpose_conv1d)

    def describe(self, method) -> str:
        return f"{self.options.describe()}, scaling_factor={self.scaling_factor:g}"

    def report(self, diagnostics, plan) -> None:
        self.layer_info = list((diagnostics or {}).get("layers", []))
        if not self.layer_info:
            return
        heterogeneous = sum(1 for row in self.layer_info if row["heterogeneous"])
        statistic = "gamma" if self.options.gamma_mode == "paper" else "Var[log e]"
        log.info("ACE branches: %d of %d matrices heterogeneous (%s > %g)", heterogeneous,
                 len(self.layer_info), statistic, self.options.threshold)
        estimates = [row["float32_error_estimate"] for row in self.layer_info
                     if row.get("float32_error_estimate") is not None]
        if estimates:
            worst = max(math.inf if e == "inf" else e for e in estimates)
            log.info("ACE float32: %d layers, predicted relative error to float64 at most %.2g "
                     "(precision=float64 for the exact merge)", len(estimates), worst)
        if self.diagnostics:
            write_json_beside_report(self, "ace_diagnostics.json", diagnostics)
