"""The FusionBench side of every per-tensor merge method: one adapter base for all of them.

A subclass builds its :class:`~fusion_bench_ace.methods.base.TensorMergeMethod` from its config
(:meth:`TensorMergeAlgorithm.build_method`) and writes its diagnostics; this base runs it through
the engine both ways FusionBench needs:

- :meth:`~TensorMergeAlgorithm.run` (``fusion_bench method=... modelpool=... taskpool=...``): the
  experts streamed from their safetensors checkpoints when they can be, the merge written into
  the pretrained model's own tensors, which is returned;
- :meth:`~TensorMergeAlgorithm.merge_to_checkpoint` (``--config-name ace_model_fusion ...
  '~taskpool' merged_model_save_path=DIR``): every model read tensor by tensor, every merged
  tensor written to its shard at once, split across the processes of ``torchrun``.
"""

from __future__ import annotations

import logging
from typing import List, Optional

import torch
from fusion_bench import BaseAlgorithm, BaseModelPool
from fusion_bench.mixins import SimpleProfilerMixin
from torch import nn

from ..engine.distributed import Ranks
from ..engine.driver import (
    ParameterPlan,
    Share,
    check_experts_match,
    merge_in_place,
    merge_into_directory,
    plan_parameters,
)
from ..engine.io.writer import DEFAULT_MAX_SHARD_SIZE
from ..engine.selection import NamePatterns
from ..methods.base import TensorMergeMethod
from .common import (
    conv1d_weight_names,
    layer_progress,
    load_pool_experts,
    open_pool_checkpoints,
    resolve_device,
    streaming_mode,
    tensor_specs,
    write_model_files,
)

log = logging.getLogger(__name__)


class TensorMergeAlgorithm(SimpleProfilerMixin, BaseAlgorithm):
    """Base of the adapters of per-tensor methods. Subclasses set :attr:`label`, have ``device``
    and ``streaming`` options, and implement :meth:`build_method` and :meth:`report`."""

    label = "merge"
    """The method's name in progress bars, logs and the profile."""

    def build_method(self, expert_names: List[str]) -> TensorMergeMethod:
        """The engine's unit for this pool's experts (in their order)."""
        raise NotImplementedError

    def kept_pretrained(self) -> NamePatterns:
        """Parameters the options keep at their pretrained value: the experts' copies are never
        read, so they may be missing or shaped otherwise (e.g. an embedding with added tokens)."""
        return NamePatterns.compile(None, "kept parameters")

    def transposes_conv1d(self) -> bool:
        return False

    def report(self, diagnostics: Optional[dict], plan: ParameterPlan) -> None:
        """Log and write the method's diagnostics (every process's, gathered)."""

    # --- the two ways of merging -----------------------------------------------------------------

    @torch.no_grad()
    def run(self, modelpool: BaseModelPool) -> nn.Module:
        if not isinstance(modelpool, BaseModelPool):
            modelpool = BaseModelPool(modelpool)
        device = resolve_device(self.device)
        with self.profile("load models"):
            pretrained_model, experts, streamed = load_pool_experts(
                modelpool, self.streaming, keep_pretrained=self.kept_pretrained())
        pretrained = pretrained_model.state_dict()
        method = self.build_method(list(experts))
        transpose = conv1d_weight_names(pretrained_model) if self.transposes_conv1d() else ()
        plan = plan_parameters(pretrained, method, transpose_keys=transpose)
        self._log_start(method, len(experts), plan, device, f"streamed={streamed}")
        with self.profile("merge"):
            # written into the pretrained model's own tensors: one model in memory, not two
            merge_in_place(pretrained, experts, method, plan, device=device,
                           progress=layer_progress(self.label))
        self.report(method.diagnostics(), plan)
        self.print_profile_summary(f"{self.label} profile")
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
        unless ``overwrite``). The tensors are bit-identical to :meth:`run`'s. Under ``torchrun``
        the processes split the parameters (:func:`fusion_bench_ace.engine.driver.
        merge_into_directory`) and write the bytes one process would.

        Returns ``False`` without writing when the pool cannot be streamed and ``streaming`` is
        ``auto`` (models not local safetensors checkpoints, transposed Conv1D weights): use
        :meth:`run` then. ``streaming=false`` always returns ``False``; ``true`` raises instead.
        """
        if not isinstance(modelpool, BaseModelPool):
            modelpool = BaseModelPool(modelpool)
        mode = streaming_mode(self.streaming)
        if self.transposes_conv1d() and mode != "false":
            if mode == "true":
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
        method = self.build_method(list(checkpoints.experts))
        plan = plan_parameters(reference, method)
        check_experts_match(
            reference, {name: state.meta() for name, state in checkpoints.experts.items()},
            ignore=plan.skip,
        )
        specs = tensor_specs(reference)
        how = f"writing {path}"
        if ranks is not None:
            how += f", rank {ranks.rank} of {ranks.world_size}"
        self._log_start(method, len(checkpoints.experts), plan, device, how)
        with self.profile("merge and write"):
            share = merge_into_directory(
                path, checkpoints.pretrained, checkpoints.experts, method, plan, specs=specs,
                max_shard_size=max_shard_size, device=device, overwrite=overwrite, ranks=ranks,
                model_files=lambda directory: write_model_files(directory, modelpool,
                                                                checkpoints),
                progress=lambda what: layer_progress(f"{self.label} ({what})"),
            )
        self.partition = _partition(ranks, share, len(specs))
        if self.partition is not None:
            log.info("rank %d of %d merged %d of %d tensors; estimated work max/min over ranks "
                     "%.3f", ranks.rank, ranks.world_size, len(share.names), len(specs),
                     max(share.work_per_rank) / max(min(share.work_per_rank), 1.0))
        diagnostics = _gathered(method.diagnostics(), ranks, plan)
        if ranks is None or ranks.is_main:
            log.info("wrote the merged model to %s", path)
            self.report(diagnostics, plan)
        self.print_profile_summary(f"{self.label} profile")
        return True

    partition: Optional[dict] = None
    """Under torchrun, after :meth:`merge_to_checkpoint`: this rank's share and every rank's
    estimated work."""

    def _log_start(self, method, num_experts: int, plan, device, how: str) -> None:
        log.info("%s of %d experts: %d parameters merged by the method, %d averaged, %d kept "
                 "pretrained (%s, device=%s, %s)", self.label, num_experts, len(plan.merge),
                 len(plan.average), len(plan.skip), self.describe(method), device, how)

    def describe(self, method: TensorMergeMethod) -> str:
        """The options worth a log line."""
        return f"scaling_factor={method.scaling_factor:g}"


def _partition(ranks: Optional[Ranks], share: Optional[Share], total: int) -> Optional[dict]:
    if ranks is None or share is None:
        return None
    return {"rank": ranks.rank, "world_size": ranks.world_size, "tensors": len(share.names),
            "of_tensors": total, "work_per_rank": list(share.work_per_rank)}


def _gathered(diagnostics: Optional[dict], ranks: Optional[Ranks], plan: ParameterPlan
              ) -> Optional[dict]:
    """Every process's diagnostics as one process's: per-parameter ``layers`` rows of all
    processes, in the plan's order; the other entries as rank 0 has them."""
    if ranks is None:
        return diagnostics
    gathered = ranks.gather(diagnostics)
    if not ranks.is_main or diagnostics is None:
        return None
    merged = dict(diagnostics)
    if "layers" in merged:
        order = {name: index for index, name in enumerate(plan.merge)}
        rows = [row for data in gathered for row in (data or {}).get("layers", [])]
        merged["layers"] = sorted(rows, key=lambda row: order.get(row["name"], len(order)))
    return merged
