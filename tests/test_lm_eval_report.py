"""lm-eval's results JSON read back as a FusionBench report (the paper LLM task pools)."""

import json
import os
import time

import pytest

from fusion_bench_ace.taskpools.lm_eval_report import (
    newest_results,
    read_report,
    report_from_results,
    results_files,
)

RESULTS = {"results": {
    "gsm8k_cot": {"alias": "gsm8k_cot", "exact_match,strict-match": 0.7, "exact_match_stderr,"
                  "strict-match": 0.01, "exact_match,flexible-extract": 0.72},
    "mathqa": {"alias": "mathqa", "acc,none": 0.343, "acc_norm,none": 0.35},
}}


def test_the_named_metric_is_the_score():
    report = report_from_results(RESULTS, ["gsm8k_cot", "mathqa"],
                                 {"gsm8k_cot": "exact_match,strict-match", "mathqa": "acc,none"})
    assert report["gsm8k_cot"]["score"] == 0.7 and report["mathqa"]["score"] == 0.343
    assert report["gsm8k_cot"]["exact_match,flexible-extract"] == 0.72
    assert "alias" not in report["mathqa"]
    assert report["average"]["score"] == pytest.approx((0.7 + 0.343) / 2)


def test_a_missing_task_or_metric_is_named():
    with pytest.raises(KeyError, match="humaneval"):
        report_from_results(RESULTS, ["humaneval"])
    with pytest.raises(KeyError, match="pass@1"):
        report_from_results(RESULTS, ["mathqa"], {"mathqa": "pass@1,none"})


def test_the_file_written_by_this_run_is_read(tmp_path):
    old = tmp_path / "model" / "results_2024.json"
    old.parent.mkdir()
    old.write_text(json.dumps({"results": {"mathqa": {"acc,none": 0.1}}}))
    before = results_files(tmp_path)
    with pytest.raises(FileNotFoundError):
        newest_results(tmp_path, before)
    new = tmp_path / "model" / "results_2025.json"
    new.write_text(json.dumps(RESULTS))
    os.utime(new, (time.time() + 1, time.time() + 1))
    assert newest_results(tmp_path, before) == new
    assert read_report(new, ["mathqa"], {"mathqa": "acc,none"})["mathqa"]["score"] == 0.343
