"""FusionBench's ``LMEvalHarnessTaskPool`` that also returns the scores as its report.

FusionBench's pool runs lm-eval and leaves the results in files (its ``evaluate`` returns
``None``, so ``program_report.json`` and our comparison tables stay empty). This subclass runs it
unchanged, then reads the results file lm-eval wrote and returns
:func:`fusion_bench_ace.taskpools.lm_eval_report.report_from_results`. Needs the ``lm-eval``
package (``pip install lm-eval``), as FusionBench's pool does.
"""

from __future__ import annotations

import os
from typing import Mapping, Optional

from fusion_bench.taskpool.lm_eval_harness.taskpool import LMEvalHarnessTaskPool

from .lm_eval_report import newest_results, read_report, results_files


class LMEvalReportTaskPool(LMEvalHarnessTaskPool):
    """Args: those of FusionBench's ``LMEvalHarnessTaskPool``, and ``scores``: task -> the
    lm-eval metric key (``"<metric>,<filter>"``) reported as the task's ``score``."""

    def __init__(self, tasks, scores: Optional[Mapping[str, str]] = None, **kwargs):
        super().__init__(tasks, **kwargs)
        self.scores = dict(scores or {})

    def evaluate(self, model, *args, **kwargs):
        output = self.output_path or os.path.join(self.log_dir, "lm_eval_results")
        before = results_files(output)
        super().evaluate(model, *args, **kwargs)
        tasks = [self.tasks] if isinstance(self.tasks, str) else list(self.tasks)
        return read_report(newest_results(output, before), tasks, self.scores)
