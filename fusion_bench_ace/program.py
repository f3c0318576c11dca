"""FusionBench's program with two additions: the merge's cost, and safe saving.

Use it with ``fusion_bench --config-name ace_model_fusion ...`` (our root config) or
``fusion_bench _target_=fusion_bench_ace.program.FusionProgram ...``; the comparison runner does.

- ``merge_stats.json`` beside ``program_report.json``: the wall time of ``method.run`` (loading
  the pool and merging, as every method does it), the process's peak resident memory after it,
  and the peak CUDA memory when a GPU was used. FusionBench's own report is untouched.
- ``merged_model_save_path``: checked before any merging (an existing file or directory is an
  error unless ``overwrite_merged_model=true``), written to a temporary sibling and renamed into
  place, so an interrupted save never leaves a half-written checkpoint under the final name.
"""

from __future__ import annotations

import functools
import json
import os
import resource
import shutil
import time
from pathlib import Path

import torch
from fusion_bench.programs import FabricModelFusionProgram
from fusion_bench.utils import timeit_context

from . import provenance


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


class FusionProgram(FabricModelFusionProgram):
    _merge_stats: dict | None = None

    def __init__(self, *args, overwrite_merged_model: bool = False, **kwargs):
        self.overwrite_merged_model = overwrite_merged_model
        super().__init__(*args, **kwargs)

    # --- merge cost -------------------------------------------------------------------------------

    def _instantiate_and_setup(self, config, compat_load_fn=None):
        obj = super()._instantiate_and_setup(config, compat_load_fn)
        if compat_load_fn is not None and compat_load_fn.endswith("load_algorithm_from_config"):
            obj.run = self._timed(obj.run)
        return obj

    def _timed(self, run):
        @functools.wraps(run)
        def timed_run(*args, **kwargs):
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            rss_before = _peak_rss_mib()
            start = time.perf_counter()
            result = run(*args, **kwargs)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self._merge_stats = {
                "merge_seconds": time.perf_counter() - start,
                "peak_rss_mib": _peak_rss_mib(),
                "peak_rss_mib_before_merge": rss_before,
                "peak_cuda_mib": (torch.cuda.max_memory_allocated() / 2**20
                                  if torch.cuda.is_available() else None),
                "torch_threads": torch.get_num_threads(),
                "machine": provenance.machine(),
            }
            return result

        return timed_run

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
        final.parent.mkdir(parents=True, exist_ok=True)
        # write under the final name inside a private directory: file formats that embed the
        # name (torch.save) come out byte-identical to a direct save
        staging = final.parent / f".{final.name}.saving-{os.getpid()}"
        retired = final.parent / f".{final.name}.old-{os.getpid()}"
        _remove(staging)
        staging.mkdir()
        try:
            with timeit_context(f"Saving the merged model to {final}"):
                self.modelpool.save_model(
                    merged_model, str(staging / final.name), **(self.merged_model_save_kwargs or {})
                )
            if final.exists() or final.is_symlink():
                final.rename(retired)  # only reached with overwrite_merged_model=true
            (staging / final.name).rename(final)
        except BaseException:
            if retired.exists() and not final.exists():
                retired.rename(final)
            raise
        finally:
            _remove(staging)
        _remove(retired)

    def run(self):
        final = self._merged_model_path()
        exists = final is not None and (final.exists() or final.is_symlink())
        if exists and not self.overwrite_merged_model:
            raise FileExistsError(
                f"merged_model_save_path {final} already exists; choose another path or pass "
                "overwrite_merged_model=true to replace it"
            )
        result = super().run()
        if self._merge_stats is not None and self.log_dir is not None:
            with open(os.path.join(self.log_dir, "merge_stats.json"), "w") as handle:
                json.dump(self._merge_stats, handle, indent=1)
        return result
