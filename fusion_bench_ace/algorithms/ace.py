"""ACE-Merging as a FusionBench algorithm: ``fusion_bench method=ace modelpool=... taskpool=...``.

A thin adapter: load the pool, plan which parameters are merged how, hand every 2-D weight to
:func:`fusion_bench_ace.methods.ace.ace_merge_layer_with_info` through the streaming driver, return
``pretrained + scaling_factor * merged task vector``.
"""

from __future__ import annotations

import logging
import math
from contextlib import ExitStack
from pathlib import Path
from typing import List, Optional, Sequence

import torch
from fusion_bench import BaseAlgorithm, BaseModelPool
from fusion_bench.mixins import SimpleProfilerMixin, auto_register_config
from torch import Tensor, nn

from ..atomic import staged_path
from ..engine.distributed import Ranks, balanced_owners, plan_costs, work_per_rank
from ..engine.driver import (
    check_experts_match,
    create_checkpoint_files,
    merge_in_place,
    plan_parameters,
    write_merged_checkpoint,
)
from ..engine.io.writer import DEFAULT_MAX_SHARD_SIZE
from ..engine.selection import NamePatterns
from ..methods.ace import ace_merge_layer_with_info, check_ace_hyperparameters
from .common import (
    conv1d_weight_names,
    layer_progress,
    load_pool_experts,
    open_pool_checkpoints,
    resolve_device,
    streaming_mode,
    tensor_specs,
    write_json_beside_report,
    write_model_files,
)

log = logging.getLogger(__name__)


@auto_register_config
class ACEMerging(SimpleProfilerMixin, BaseAlgorithm):
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

    def __init__(
        self,
        eps: float = 1e-5,
        tau: float = 0.3,
        k_frac: float = 0.3,
        eps_mode: str = "absolute",
        eps_rel: Optional[float] = None,
        gamma_mode: str = "paper",
        tau_scale_free: Optional[float] = None,
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
        check_ace_hyperparameters(eps, tau, k_frac, eps_mode=eps_mode, eps_rel=eps_rel,
                                  gamma_mode=gamma_mode, tau_scale_free=tau_scale_free)
        streaming_mode(streaming)
        if isinstance(scaling_factor, bool) or not isinstance(scaling_factor, (int, float)) \
                or not math.isfinite(scaling_factor):
            raise ValueError(f"scaling_factor must be a finite number; got {scaling_factor!r}")
        # compiled once, here, so a bad regex fails when the method is configured
        self._exclude = NamePatterns.compile(exclude_keys, "exclude_keys")
        self._average = NamePatterns.compile(average_keys, "average_keys")
        self._spectrum = NamePatterns.compile(spectrum_keys, "spectrum_keys")
        self.layer_info: List[dict] = []
        self.partition: Optional[dict] = None
        """Under torchrun: this rank's share of :meth:`merge_to_checkpoint` and every rank's
        estimated work (:mod:`fusion_bench_ace.engine.distributed`)."""

    @torch.no_grad()
    def run(self, modelpool: BaseModelPool) -> nn.Module:
        if not isinstance(modelpool, BaseModelPool):
            modelpool = BaseModelPool(modelpool)
        device = resolve_device(self.device)
        with self.profile("load models"):
            pretrained_model, experts, streamed = load_pool_experts(
                modelpool, self.streaming, keep_pretrained=self._exclude)
        pretrained = pretrained_model.state_dict()
        transpose = conv1d_weight_names(pretrained_model) if self.transpose_conv1d else ()
        plan = self._plan(pretrained, transpose)
        self._log_start(len(experts), plan, device, f"streamed={streamed}")
        self.layer_info = []
        with self.profile("merge"):
            # written into the pretrained model's own tensors: one model in memory, not two
            merge_in_place(
                pretrained,
                experts,
                self._merge_matrix,
                plan,
                scaling_factor=self.scaling_factor,
                device=device,
                progress=layer_progress("ACE-Merging"),
            )
        self._report_diagnostics()
        self.print_profile_summary("ACE-Merging profile")
        return pretrained_model

    @torch.no_grad()
    def merge_to_checkpoint(
        self,
        modelpool: BaseModelPool,
        path,
        *,
        overwrite: bool = False,
        max_shard_size=DEFAULT_MAX_SHARD_SIZE,
    ) -> bool:
        """Merge the pool straight into a Hugging Face checkpoint directory at ``path``.

        Every model is read tensor by tensor from its safetensors checkpoint and every merged
        tensor is written to its shard as soon as it is computed, so memory holds one
        parameter's task vectors, never a model. The directory has the pretrained checkpoint's
        tensors in the dtype the pool loads them in (``torch_dtype``; float32 math), sharded by
        ``max_shard_size``, with the index, ``config.json`` and the tokenizer; it is written
        beside ``path`` and renamed into place at the end (an existing ``path`` is an error
        unless ``overwrite``). The tensors are bit-identical to :meth:`run`'s.

        Returns ``False`` without writing when the pool cannot be streamed and ``streaming`` is
        ``auto`` (models not local safetensors checkpoints, ``transpose_conv1d``): use
        :meth:`run` then. ``streaming=false`` always returns ``False``; ``true`` raises instead.
        """
        if not isinstance(modelpool, BaseModelPool):
            modelpool = BaseModelPool(modelpool)
        if self.transpose_conv1d and streaming_mode(self.streaming) != "false":
            if streaming_mode(self.streaming) == "true":
                raise ValueError("transpose_conv1d needs the model's modules: it cannot be "
                                 "combined with writing the merge by streaming (streaming=true)")
            return False
        device = resolve_device(self.device)
        checkpoints = open_pool_checkpoints(modelpool, self.streaming)
        if checkpoints is None:
            return False
        ranks = Ranks.join(device)  # None in one process; under torchrun, this merge's share
        device = device if ranks is None else ranks.device
        reference = checkpoints.pretrained.meta()
        plan = self._plan(reference, ())
        check_experts_match(
            reference, {name: state.meta() for name, state in checkpoints.experts.items()},
            ignore=plan.skip,
        )
        specs = tensor_specs(reference)
        self._matrix_order = plan.matrix
        how = f"writing {path}"
        if ranks is not None:
            shapes = {spec.name: spec.shape for spec in specs}
            costs = plan_costs(shapes, plan.matrix, plan.average, len(checkpoints.experts))
            owners = balanced_owners(costs, ranks.world_size)
            work = work_per_rank(costs, owners, ranks.world_size)
            self.partition = {"rank": ranks.rank, "world_size": ranks.world_size,
                              "tensors": owners.count(ranks.rank), "work_per_rank": work}
            how += (f", rank {ranks.rank} of {ranks.world_size}: {owners.count(ranks.rank)} of "
                    f"{len(specs)} tensors, estimated work max/min over ranks "
                    f"{max(work) / max(min(work), 1.0):.3f}")
        self._log_start(len(checkpoints.experts), plan, device, how)
        self.layer_info = []
        merge = dict(
            pretrained=checkpoints.pretrained, experts=checkpoints.experts,
            matrix_merge=self._merge_matrix, plan=plan, specs=specs,
            max_shard_size=max_shard_size, scaling_factor=self.scaling_factor, device=device,
        )
        with self.profile("merge and write"):
            if ranks is None:
                with staged_path(path, overwrite=overwrite) as staging:
                    staging.mkdir()
                    write_merged_checkpoint(staging, **merge,
                                            progress=layer_progress("ACE-Merging"))
                    write_model_files(staging, modelpool, checkpoints)
            else:
                mine = [s.name for s, owner in zip(specs, owners) if owner == ranks.rank]
                self._merge_share(ranks, path, overwrite, mine, merge,
                                  lambda staging: write_model_files(staging, modelpool,
                                                                    checkpoints))
        if ranks is None or ranks.is_main:
            log.info("wrote the merged model to %s", path)
        self._report_diagnostics(ranks)
        self.print_profile_summary("ACE-Merging profile")
        return True

    def _merge_share(self, ranks: Ranks, path, overwrite: bool, mine: List[str], merge: dict,
                     write_model_files) -> None:
        """This rank's share of a checkpoint written by several processes: rank 0 stages the
        directory and creates the shards (the layout of one process's), every rank writes its
        tensors into them, rank 0 writes the index and the model files and renames it into
        place. A failure on any rank stops all (:meth:`Ranks.together`)."""

        def write_share(staging: Path) -> None:
            write_merged_checkpoint(
                staging, **merge, names=mine, create_files=False, write_index=ranks.is_main,
                progress=layer_progress(f"ACE-Merging (rank {ranks.rank})"),
            )

        main = ranks.is_main
        with ExitStack() as stack:

            def stage() -> Optional[Path]:
                if not main:
                    return None
                staging = stack.enter_context(staged_path(path, overwrite=overwrite))
                staging.mkdir()
                create_checkpoint_files(staging, merge["specs"], merge["max_shard_size"])
                return staging

            staging = Path(ranks.broadcast(str(ranks.together(stage))))
            ranks.together(lambda: write_share(staging))
            ranks.together(lambda: write_model_files(staging) if main else None)
            ranks.together(stack.close)  # rank 0 renames the directory into place

    def _plan(self, pretrained, transpose):
        return plan_parameters(
            pretrained, exclude_keys=self._exclude, average_keys=self._average,
            transpose_keys=transpose,
        )

    def _log_start(self, num_experts: int, plan, device, how: str) -> None:
        log.info(
            "ACE-Merging %d experts: %d matrices by ACE, %d averaged, %d kept pretrained "
            "(%s, k_frac=%g, scaling_factor=%g, device=%s, %s)",
            num_experts, len(plan.matrix), len(plan.average), len(plan.skip),
            self._describe_options(), self.k_frac, self.scaling_factor, device, how,
        )

    def _merge_matrix(self, task_vectors: Tensor, name: str) -> Tensor:
        """ACE on one 2-D parameter's ``(T, d_out, d_in)`` task vectors; records its diagnostics."""
        spectrum = self._spectrum.matches(name)
        info = ace_merge_layer_with_info(
            task_vectors, self.eps, self.tau, self.k_frac, eps_mode=self.eps_mode,
            eps_rel=self.eps_rel, gamma_mode=self.gamma_mode,
            tau_scale_free=self.tau_scale_free, keep_preliminary=spectrum,
        )
        row = {
            "name": name,
            "shape": list(task_vectors.shape[1:]),
            "gamma": info.gamma,
            "heterogeneous": info.heterogeneous,
            "eps": info.eps,
            "compute_dtype": str(info.compute_dtype).removeprefix("torch."),
            "rank_k": info.rank_k,
            "tasks_used": info.tasks_used,
            "fallback": info.fallback,
        }
        if spectrum and info.preliminary is not None:  # None: averaged (fallback) layers
            row["singular_values"] = {
                "preliminary": _singular_values(info.preliminary),
                "merged": _singular_values(info.merged),
            }
        self.layer_info.append(row)
        return info.merged

    def _describe_options(self) -> str:
        ridge = (f"eps={self.eps:g}" if self.eps_mode == "absolute"
                 else f"eps_mode=relative, eps_rel={self.eps_rel:g}")
        branch = (f"tau={self.tau:g}" if self.gamma_mode == "paper"
                  else f"gamma_mode=scale_free, tau_scale_free={self.tau_scale_free:g}")
        return f"{ridge}, {branch}"

    def _report_diagnostics(self, ranks: Optional[Ranks] = None) -> None:
        if ranks is not None:  # every rank's layers, in the order one process merges them
            gathered = ranks.gather(self.layer_info)
            if not ranks.is_main:
                return
            rows = [row for rows in gathered for row in rows]
            order = {name: i for i, name in enumerate(self._matrix_order)}
            self.layer_info = sorted(rows, key=lambda row: order[row["name"]])
        if not self.layer_info:
            return
        heterogeneous = sum(1 for row in self.layer_info if row["heterogeneous"])
        statistic = "gamma" if self.gamma_mode == "paper" else "Var[log e]"
        threshold = self.tau if self.gamma_mode == "paper" else self.tau_scale_free
        log.info(
            "ACE branches: %d of %d matrices heterogeneous (%s > %g)",
            heterogeneous, len(self.layer_info), statistic, threshold,
        )
        if self.diagnostics:
            write_json_beside_report(self, "ace_diagnostics.json", {
                "eps": self.eps, "tau": self.tau, "k_frac": self.k_frac,
                "eps_mode": self.eps_mode, "eps_rel": self.eps_rel,
                "gamma_mode": self.gamma_mode, "tau_scale_free": self.tau_scale_free,
                "layers": self.layer_info,
            })


def _singular_values(matrix: Tensor) -> List[float]:
    """Singular values, largest first, computed in float64 (a diagnostic, not the merge)."""
    return torch.linalg.svdvals(matrix.detach().to(torch.float64)).tolist()
