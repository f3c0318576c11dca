"""FusionBench's program with three additions: the merge's cost, safe saving, streamed saving.

Use it with ``fusion_bench --config-name ace_model_fusion ...`` (our root config) or
``fusion_bench _target_=fusion_bench_ace.program.FusionProgram ...``; the comparison runner does.

- ``merge_stats.json`` beside ``program_report.json``: the wall time of ``method.run`` (loading
  the pool and merging, as every method does it), this process's resident (RSS) and anonymous
  (``RssAnon``) memory before it and at their peaks during it (sampled every 5 ms:
  :mod:`fusion_bench_ace.memory`; RSS includes the file pages of memory-mapped checkpoints, which
  the kernel can drop, anonymous memory is what runs a machine out of memory), and the peak CUDA
  memory when a GPU was used. FusionBench's own report is untouched.
- ``merged_model_save_path``: checked before any merging (an existing file or directory is an
  error unless ``overwrite_merged_model=true``), written to a temporary sibling and renamed into
  place, so an interrupted save never leaves a half-written checkpoint under the final name.
- With no task pool (``'~taskpool'``) nothing needs the merged model in memory: a method that
  can (``merge_to_checkpoint``: ACE) writes it tensor by tensor straight into
  ``merged_model_save_path`` as a Hugging Face checkpoint directory (sharded safetensors;
  ``merged_model_save_kwargs.max_shard_size``), and the run returns no model. When the pool
  cannot be streamed (not local safetensors checkpoints), the usual in-memory merge and save run.
  Under ``torchrun --nproc-per-node N`` ACE splits that merge across the N processes
  (docs/scale_out.md); rank 0 writes ``merge_stats.json``.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import resource
import time
from pathlib import Path

import torch
from fusion_bench.programs import FabricModelFusionProgram
from fusion_bench.utils import timeit_context

from . import provenance
from .atomic import staged_path
from .engine.distributed import world_from_env
from .memory import MemorySampler

log = logging.getLogger(__name__)


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


class FusionProgram(FabricModelFusionProgram):
    _merge_stats: dict | None = None

    def __init__(self, *args, overwrite_merged_model: bool = False, **kwargs):
        self.overwrite_merged_model = overwrite_merged_model
        super().__init__(*args, **kwargs)

    # --- merge cost -------------------------------------------------------------------------------

    def _instantiate_and_setup(self, config, compat_load_fn=None):
        obj = super()._instantiate_and_setup(config, compat_load_fn)
        if compat_load_fn is not None and compat_load_fn.endswith("load_algorithm_from_config"):
            if self._streams_to_disk(obj):
                obj.run = self._streamed(obj)
            obj.run = self._timed(obj.run)
        return obj

    def _timed(self, run):
        @functools.wraps(run)
        def timed_run(*args, **kwargs):
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            with MemorySampler() as memory:
                start = time.perf_counter()
                result = run(*args, **kwargs)
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                seconds = time.perf_counter() - start
            self._merge_stats = {
                "merge_seconds": seconds,
                **memory.mib(),
                "process_peak_rss_mib": _peak_rss_mib(),
                "peak_cuda_mib": (torch.cuda.max_memory_allocated() / 2**20
                                  if torch.cuda.is_available() else None),
                "torch_threads": torch.get_num_threads(),
                "machine": provenance.machine(),
            }
            return result

        return timed_run

    # --- merging straight to disk ---------------------------------------------------------------

    def _streams_to_disk(self, method) -> bool:
        """No task pool needs the merged model in memory, a path is given, and the method can
        write its merge tensor by tensor (``merge_to_checkpoint``)."""
        return (self._taskpool is None and self._merged_model_path() is not None
                and callable(getattr(method, "merge_to_checkpoint", None)))

    def _streamed(self, method):
        run = method.run

        @functools.wraps(run)
        def streamed_run(modelpool):
            kwargs = dict(self.merged_model_save_kwargs or {})
            shard_size = kwargs.pop("max_shard_size", None)
            written = method.merge_to_checkpoint(
                modelpool, self._merged_model_path(), overwrite=self.overwrite_merged_model,
                **({} if shard_size is None else {"max_shard_size": shard_size}),
            )
            if not written:  # the pool cannot be streamed: merge in memory, saved as usual
                return run(modelpool)
            if kwargs:
                log.warning("merged_model_save_kwargs %s do not apply to a checkpoint written "
                            "by streaming (only max_shard_size does)", sorted(kwargs))
            return None  # nothing left for FusionBench to save or evaluate

        return streamed_run

    # --- safe saving ------------------------------------------------------------------------------

    def _merged_model_path(self) -> Path | None:
        if self.merged_model_save_path is None:
            return None
        path = str(self.merged_model_save_path)
        if "{log_dir}" in path and self.log_dir is not None:
            path = path.format(log_dir=self.log_dir)
        return Path(path)

    def save_merged_model(self, merged_model):
        final = self._merged_model_path()
        if final is None:
            return super().save_merged_model(merged_model)
        # the final name inside a private directory: formats that embed the name (torch.save)
        # come out byte-identical to a direct save
        with staged_path(final, overwrite=self.overwrite_merged_model) as staging:
            with timeit_context(f"Saving the merged model to {final}"):
                self.modelpool.save_model(
                    merged_model, str(staging), **(self.merged_model_save_kwargs or {})
                )

    def run(self):
        final = self._merged_model_path()
        exists = final is not None and (final.exists() or final.is_symlink())
        if exists and not self.overwrite_merged_model:
            raise FileExistsError(
                f"merged_model_save_path {final} already exists; choose another path or pass "
                "overwrite_merged_model=true to replace it"
            )
        result = super().run()
        rank, _, world_size = world_from_env()
        if self._merge_stats is not None and self.log_dir is not None and rank == 0:
            self._merge_stats["processes"] = world_size  # torchrun: rank 0's, after all ranks
            with open(os.path.join(self.log_dir, "merge_stats.json"), "w") as handle:
                json.dump(self._merge_stats, handle, indent=1)
        return result
