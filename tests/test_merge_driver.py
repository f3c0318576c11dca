"""The merge driver writes each merged tensor into the pretrained model's own storage."""

import copy

import pytest
import torch
from torch import nn

from fusion_bench_ace.engine.driver import (
    distinct_storage_names,
    merge_in_place,
    merged_tensors,
    plan_parameters,
)
from fusion_bench_ace.methods.base import KEEP, MERGE, TensorMergeMethod


class TiedModel(nn.Module):
    """An embedding tied to the output layer, as in GPT-2 or Llama-3.2 (one tensor, two names)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(7, 4)
        self.hidden = nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4)
        self.head = nn.Linear(4, 7, bias=False)
        self.head.weight = self.embed.weight
        self.register_buffer("steps", torch.tensor(3))


def models(seed=0, num_experts=3):
    torch.manual_seed(seed)
    pretrained = TiedModel()
    experts = {}
    for index in range(num_experts):
        expert = copy.deepcopy(pretrained)
        with torch.no_grad():
            for parameter in expert.parameters():
                parameter.add_(0.01 * (index + 1) * torch.randn_like(parameter))
        experts[f"e{index}"] = expert.state_dict()
    return pretrained, experts


class WeightedSum(TensorMergeMethod):
    """A toy per-tensor method: the task vectors weighted 1, 2, ..., T."""

    name = "weighted_sum_test"

    def __init__(self, scaling_factor=1.0, keep=()):
        self.scaling_factor, self.keep, self.seen = scaling_factor, set(keep), []

    def treatment(self, name, shape, dtype):
        return KEEP if name in self.keep else super().treatment(name, shape, dtype)

    def merge(self, name, task_vectors, base):
        self.seen.append(name)
        weights = torch.arange(1, task_vectors.shape[0] + 1, dtype=task_vectors.dtype)
        return torch.einsum("t,t...->...", weights, task_vectors) / weights.sum()


def test_in_place_equals_the_merge_collected_then_loaded():
    pretrained, experts = models()
    reference_model = copy.deepcopy(pretrained)
    method = WeightedSum(scaling_factor=0.7)
    plan = plan_parameters(pretrained.state_dict(), method)
    assert MERGE == "merge" and "steps" in plan.skip  # an integer buffer
    collected = {name: tensor.clone() for name, tensor in merged_tensors(
        reference_model.state_dict(), experts, method, plan)}
    reference_model.load_state_dict(collected)

    state = pretrained.state_dict()
    pointers = {name: tensor.data_ptr() for name, tensor in state.items()}
    merge_in_place(state, experts, method, plan)
    after = pretrained.state_dict()
    assert {name: tensor.data_ptr() for name, tensor in after.items()} == pointers
    for name, tensor in reference_model.state_dict().items():
        assert torch.equal(after[name], tensor), name
    assert pretrained.head.weight is pretrained.embed.weight
    assert int(after["steps"]) == 3


def test_tied_weights_are_merged_once():
    pretrained, experts = models()
    method = WeightedSum()
    plan = plan_parameters(pretrained.state_dict(), method)
    names = distinct_storage_names(pretrained.state_dict(), plan)
    assert "embed.weight" in names and "head.weight" not in names
    merge_in_place(pretrained.state_dict(), experts, method, plan)
    assert method.seen.count("embed.weight") == 1 and "head.weight" not in method.seen


def test_tied_weights_planned_differently_are_refused():
    pretrained, experts = models()
    method = WeightedSum(keep=["head.weight"])
    plan = plan_parameters(pretrained.state_dict(), method)
    before = copy.deepcopy(pretrained.state_dict())
    with pytest.raises(ValueError, match="'head.weight' and 'embed.weight' are tied"):
        merge_in_place(pretrained.state_dict(), experts, method, plan)
    assert all(torch.equal(before[k], v) for k, v in pretrained.state_dict().items())


def test_overlapping_views_are_refused():
    storage = torch.randn(10)
    state = {"a": storage[:6].view(2, 3), "b": storage[4:].view(2, 3)}
    plan = plan_parameters(state, WeightedSum())
    with pytest.raises(ValueError, match="overlap"):
        distinct_storage_names(state, plan)
