"""Selecting parameters by name: regexes matched with re.match, compiled once, for every method."""

import copy
import dataclasses

import pytest
import torch
from fusion_bench import BaseModelPool
from torch import nn

from fusion_bench_ace import ACEMerging
from fusion_bench_ace.algorithms.nan import TaskArithmeticNANAlgorithm, TiesMergingNANAlgorithm
from fusion_bench_ace.engine.driver import plan_parameters
from fusion_bench_ace.engine.selection import NamePatterns
from fusion_bench_ace.methods.ace import ACE, ACEOptions

STATE = {
    "h.0.attn.weight": torch.zeros(4, 4),
    "h.0.attn.bias": torch.zeros(4),
    "h.1.attn.weight": torch.zeros(4, 4),
    "h.10.attn.weight": torch.zeros(4, 4),
    "score.weight": torch.zeros(2, 4),
    "text_projection.weight": torch.zeros(3, 4),
    "position_ids": torch.zeros(1, 4, dtype=torch.long),
}


def test_patterns_match_at_the_start_of_the_name():
    patterns = NamePatterns.compile([".*score.*", "h.1"], "exclude_keys")
    # re.match: anchored at the start, not at the end ("h.1" also selects h.10...)
    assert patterns.select(STATE) == ["h.1.attn.weight", "h.10.attn.weight", "score.weight"]
    assert patterns.matches("x.score")  # ".*" at the start
    assert not NamePatterns.compile(["attn"], "exclude_keys").matches("h.0.attn.weight")


def test_exact_names_select_themselves_even_with_regex_characters():
    patterns = NamePatterns.compile(["h.0.attn.bias", "w[0]+"], "remove_keys")
    assert patterns.select(["h.0.attn.bias", "h.0.attn.weight", "w[0]+", "w0"]) == [
        "h.0.attn.bias", "w[0]+", "w0"]
    assert patterns.unused(["h.0.attn.bias"]) == ["w[0]+"]


def test_invalid_regex_names_the_option():
    with pytest.raises(ValueError, match=r"invalid average_keys regex '\(': "):
        NamePatterns.compile(["("], "average_keys")
    with pytest.raises(ValueError, match="expected regex strings"):
        NamePatterns.compile([3], "exclude_keys")
    for option in ("exclude_keys", "average_keys", "spectrum_keys"):
        with pytest.raises(ValueError, match=f"invalid {option} regex"):
            ACEMerging(**{option: ["*bad"]})  # at configuration, before any model is loaded


def ace_unit(exclude=(), average=()):
    return ACE(ACEOptions(), exclude=NamePatterns.compile(exclude, "exclude_keys"),
               average=NamePatterns.compile(average, "average_keys"))


def test_plan_sorts_parameters_by_the_patterns():
    plan = plan_parameters(STATE, ace_unit([".*score.*"], [".*text_projection.*"]),
                           transpose_keys=["h.1.attn.weight"])
    assert plan.merge == ("h.0.attn.weight", "h.1.attn.weight", "h.10.attn.weight")
    assert plan.average == ("h.0.attn.bias", "text_projection.weight")
    assert plan.skip == ("score.weight", "position_ids")
    assert plan.transpose == frozenset({"h.1.attn.weight"})
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.merge = ()
    with pytest.raises(ValueError, match="no parameter left to merge"):
        plan_parameters(STATE, ace_unit([".*"]))


def _pool(num_experts=3):
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4))
    models = {"_pretrained_": base}
    for i in range(num_experts):
        expert = copy.deepcopy(base)
        expert.load_state_dict({k: v + (i + 1) * 0.1 * torch.randn_like(v)
                                for k, v in base.state_dict().items()})
        models[f"e{i}"] = expert
    return models


@pytest.mark.parametrize("algorithm_class", [TaskArithmeticNANAlgorithm, TiesMergingNANAlgorithm])
def test_nan_remove_keys_are_regexes_and_exact_names_still_work(algorithm_class):
    base = _pool()["_pretrained_"].state_dict()
    by_regex = algorithm_class(remove_keys=[r".*\.bias"])
    merged = by_regex.run(BaseModelPool(_pool())).state_dict()
    assert by_regex.removed == ["0.bias", "2.bias"]
    assert by_regex.coefficients.keys == ["0.weight", "2.weight"]
    for name in ("0.bias", "2.bias"):
        assert torch.equal(merged[name], base[name])
    assert not torch.equal(merged["0.weight"], base["0.weight"])
    # the exact names (the former semantics) select the same tensors and give the same merge
    by_name = algorithm_class(remove_keys=["0.bias", "2.bias"])
    same = by_name.run(BaseModelPool(_pool())).state_dict()
    assert by_name.removed == by_regex.removed
    assert all(torch.equal(same[k], merged[k]) for k in merged)
    with pytest.raises(ValueError, match=r"invalid remove_keys regex '\['"):
        algorithm_class(remove_keys=["["])
