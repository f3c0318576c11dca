"""FusionBench's program with the merge's cost recorded: ``_target_=fusion_bench_ace.program.ProfiledFusionProgram``.

Writes ``merge_stats.json`` beside ``program_report.json``: the wall time of ``method.run``
(loading the pool and merging, as every method does it), the process's peak resident memory
after it, and the peak CUDA memory when a GPU was used. FusionBench's own report is untouched.
"""

from __future__ import annotations

import functools
import json
import os
import platform
import resource
import time

import torch
from fusion_bench.programs import FabricModelFusionProgram


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


class ProfiledFusionProgram(FabricModelFusionProgram):
    _merge_stats: dict | None = None

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
                "machine": platform.machine(),
                "processor": platform.processor() or None,
                "cpu_count": os.cpu_count(),
            }
            return result

        return timed_run

    def run(self):
        result = super().run()
        if self._merge_stats is not None and self.log_dir is not None:
            with open(os.path.join(self.log_dir, "merge_stats.json"), "w") as handle:
                json.dump(self._merge_stats, handle, indent=1)
        return result
