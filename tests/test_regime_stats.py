"""Regime statistics (fusion_bench_ace.mini.stats) on small synthetic pools with known answers."""

import math

import pytest
import torch

from fusion_bench_ace.mini.stats import TrackModels, check_targets, regime_statistics

TARGETS = {
    "relative_norm": [0.005, 0.03], "relative_norm_block_max": 0.05, "one_d_share_max": 0.5,
    "norm_spread": [1.5, 4.0], "cosine_mean_max": 0.06, "cosine_max_max": 0.2,
    "stable_rank_ratio_max": 0.5, "zero_shot_above_chance_points": 10,
    "zero_shot_chance_corrected": [0.3, 0.5], "expert_gain_points": 20, "expert_average_min": 0.85,
    "other_tasks_kept_min": 0.7, "single_gain_kept_min": 0.5,
    "simple_average_gap_closed": [0.3, 0.6],
}
SETTINGS = {"single_alpha": 0.3, "task_arithmetic_lambda": 0.3, "targets": TARGETS}


def linear_pool():
    """Two tasks; task t's accuracy grows linearly with the weight's t-th row shift, so every
    merge's accuracy is known in closed form."""
    theta = {"layers.0.w": torch.ones(2, 4), "layers.0.b": torch.ones(2)}
    tau = {"a": torch.zeros(2, 4), "b": torch.zeros(2, 4)}
    tau["a"][0, 0] = 0.02
    tau["b"][1, 1] = 0.04  # orthogonal to a, twice its norm
    experts = {t: {"layers.0.w": theta["layers.0.w"] + tau[t], "layers.0.b": theta["layers.0.b"]}
               for t in tau}

    def evaluate(state, task):
        row, col, full = (0, 0, 0.02) if task == "a" else (1, 1, 0.04)
        shift = float(state["layers.0.w"][row, col] - 1) / full  # 0 at θ₀, 1 at the expert
        return 0.5 + 0.4 * max(0.0, min(1.0, shift))

    return TrackModels(tasks=["a", "b"], pretrained=theta, experts=experts, evaluate=evaluate,
                       chance={"a": 0.25, "b": 0.25}, block_of=lambda name: name.split(".w")[0])


def test_known_answers():
    stats = regime_statistics(linear_pool(), SETTINGS, progress=False)
    acc, geo = stats["accuracy"], stats["geometry"]
    theta_norm = math.sqrt(8 + 2)
    assert geo["relative_norm"]["a"] == pytest.approx(0.02 / theta_norm)
    assert geo["relative_norm"]["b"] == pytest.approx(0.04 / theta_norm)
    assert geo["norm_spread"] == pytest.approx(2.0)
    assert geo["cosine_mean"] == pytest.approx(0.0) and geo["cosine_max"] == pytest.approx(0.0)
    assert geo["one_d_share_of_task_vector"]["a"] == 0.0
    assert geo["layers"]["layers.0.w"]["stable_rank"] == pytest.approx(1.0)  # rank-one
    assert acc["zero_shot"] == {"a": 0.5, "b": 0.5}
    assert acc["expert"] == {"a": pytest.approx(0.9), "b": pytest.approx(0.9)}
    assert acc["single_gain_kept"]["a"] == pytest.approx(0.3, rel=1e-5)
    assert acc["simple_average_gap_closed"] == pytest.approx(0.5, rel=1e-5)  # 1/2 each
    assert acc["task_arithmetic_gap_closed"] == pytest.approx(0.3, rel=1e-5)
    assert acc["zero_shot_chance_corrected"] == pytest.approx((0.5 - 0.25) / 0.75)
    assert acc["expert_on_other_tasks_vs_zero_shot"] == {"a": 1.0, "b": 1.0}


def test_targets_say_which_fail():
    stats = regime_statistics(linear_pool(), SETTINGS, progress=False)
    verdict = {row["target"]: row["ok"] for row in stats["targets"]}
    assert verdict["norm spread across tasks (max/min)"] is True
    assert verdict["simple average: gap closed"] is True
    assert verdict["one task vector at α=0.3: own gain kept (mean over tasks)"] is False  # 0.3
    assert verdict["task vector ‖τ_t‖/‖θ₀‖, whole model"] is True  # 0.63 % and 1.26 %
    rows = {row["target"]: row for row in check_targets(stats, {**TARGETS,
                                                               "relative_norm": [0.007, 0.03]})}
    assert rows["task vector ‖τ_t‖/‖θ₀‖, whole model"]["ok"] is False
    assert rows["task vector ‖τ_t‖/‖θ₀‖, whole model"]["worst"] == pytest.approx(0.02 / 10 ** 0.5)


def test_a_pretrained_model_scoring_zero_is_reported_not_divided_by():
    """Exact match of a base model that never answers in the tasks' format is 0 on every task:
    the ratios to zero-shot are None (and fail their target), the rest is measured."""
    pool = linear_pool()
    evaluate = pool.evaluate
    pool.evaluate = lambda state, task: max(0.0, (evaluate(state, task) - 0.5) / 0.4)
    pool.chance = {"a": 0.0, "b": 0.0}
    stats = regime_statistics(pool, {**SETTINGS, "targets": {**TARGETS,
                                                            "simple_average_of_expert": [0.4, 1]}},
                              progress=False)
    acc = stats["accuracy"]
    assert acc["zero_shot"] == {"a": 0.0, "b": 0.0}
    assert acc["expert_on_other_tasks_vs_zero_shot"] == {"a": None, "b": None}
    assert acc["simple_average_gap_closed"] == pytest.approx(0.5, rel=1e-5)
    verdict = {row["target"]: row["ok"] for row in stats["targets"]}
    assert verdict["expert on other tasks / zero-shot"] is False
    assert verdict["zero-shot minus chance (points)"] is False
    assert verdict["simple average / expert average"] is True  # 0.5
