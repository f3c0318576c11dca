"""Bad input to the FusionBench adapters fails early and clearly; odd but valid input merges
finitely.

Each case here is a row of docs/reliability.md's table. In-process (no CLI) on small in-memory
model pools; the CLI-level cases (unknown method names, output clobbering) are in test_cli_ace.py
and test_program.py.
"""

import copy
import math

import pytest
import torch
from fusion_bench import BaseModelPool
from torch import nn

from fusion_bench_ace import ACEMerging
from fusion_bench_ace.algorithms.nan import TaskArithmeticNANAlgorithm, TiesMergingNANAlgorithm


def small_model(seed: int, dtype=torch.float32) -> nn.Module:
    torch.manual_seed(seed)
    # a square layer, a 1 x n and an n x 1 weight, a norm: the shapes that break naive code
    model = nn.Sequential(nn.Linear(6, 5), nn.LayerNorm(5), nn.Linear(5, 1), nn.Linear(1, 4))
    return model.to(dtype)


def pool_of(pretrained: nn.Module, experts: dict) -> BaseModelPool:
    return BaseModelPool({"_pretrained_": pretrained, **experts})


def perturbed(base: nn.Module, seed: int, scale: float, dtype=None) -> nn.Module:
    expert = small_model(0)
    expert.load_state_dict(base.state_dict())
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in expert.parameters():
            p.add_(scale * torch.randn(p.shape, generator=generator, dtype=p.dtype))
    return expert.to(dtype) if dtype is not None else expert


@pytest.mark.parametrize("cls", [ACEMerging, TaskArithmeticNANAlgorithm, TiesMergingNANAlgorithm])
def test_a_misspelt_option_is_an_error_not_a_warning(cls):
    with pytest.raises(TypeError, match="epss"):
        cls(epss=1e-5)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"eps": 0.0}, "eps"),
        ({"eps": -1e-5}, "eps"),
        ({"tau": -0.1}, "tau"),
        ({"k_frac": 1.5}, "k_frac"),
        ({"k_frac": -0.1}, "k_frac"),
        ({"eps": float("nan")}, "eps"),
        ({"scaling_factor": float("inf")}, "scaling_factor"),
    ],
)
def test_hyperparameters_out_of_range_are_rejected_with_the_range(options, message):
    with pytest.raises(ValueError, match=message):
        ACEMerging(**options)


def test_fewer_than_two_experts():
    base = small_model(0)
    with pytest.raises(ValueError, match="at least two"):
        ACEMerging().run(pool_of(base, {"only": perturbed(base, 1, 1e-2)}))


def test_missing_pretrained_model():
    base = small_model(0)
    pool = BaseModelPool({"a": perturbed(base, 1, 1e-2), "b": perturbed(base, 2, 1e-2)})
    with pytest.raises(ValueError, match="_pretrained_"):
        ACEMerging().run(pool)


def test_an_expert_of_another_architecture_is_named_with_its_mismatches():
    base = small_model(0)
    other = nn.Sequential(nn.Linear(6, 7), nn.LayerNorm(7), nn.Linear(7, 1), nn.Linear(1, 4))
    pool = pool_of(base, {"good": perturbed(base, 1, 1e-2), "wide": other})
    with pytest.raises(ValueError) as error:
        ACEMerging().run(pool)
    text = str(error.value)
    assert "expert 'wide'" in text and "0.weight: shape (7, 6) vs pretrained (5, 6)" in text
    assert "good" not in text


def test_nan_in_a_checkpoint_names_the_parameter_and_the_expert():
    base = small_model(0)
    broken = perturbed(base, 2, 1e-2)
    with torch.no_grad():
        broken[2].weight[0, 3] = float("nan")
    pool = pool_of(base, {"fine": perturbed(base, 1, 1e-2), "broken": broken})
    with pytest.raises(ValueError, match=r"'2\.weight'.*broken"):
        ACEMerging().run(pool)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_experts_are_merged_in_float32_and_cast_back(dtype):
    base = small_model(0, dtype)
    as_float = lambda module: copy.deepcopy(module).float()  # noqa: E731 (.float() is in place)
    experts = {f"e{i}": perturbed(as_float(base), i, 10.0 ** -(i + 1), dtype) for i in range(3)}
    # the same values merged in float32 first: the half result must be its rounding
    reference = ACEMerging(eps=1e-5).run(
        pool_of(as_float(base), {k: as_float(v) for k, v in experts.items()})
    )
    merged = ACEMerging(eps=1e-5).run(pool_of(base, experts))
    for (name, got), want in zip(merged.state_dict().items(), reference.state_dict().values()):
        assert got.dtype == dtype, name
        assert torch.isfinite(got).all(), name
        torch.testing.assert_close(got.float(), want.to(dtype).float(), rtol=0, atol=0)


def test_a_merge_that_overflows_float16_is_an_error_naming_the_parameter():
    base = small_model(0, torch.float16)
    experts = {
        f"e{i}": perturbed(copy.deepcopy(base).float(), i, 1.0, torch.float16) for i in range(2)
    }
    message = r"parameter '0.weight': the merged weights do not fit in torch.float16"
    with pytest.raises(ValueError, match=message):
        ACEMerging(scaling_factor=1e6).run(pool_of(base, experts))


@pytest.mark.parametrize("scale", [1e-8, 1e-4, 1.0, 1e4])
def test_extreme_magnitudes_and_all_zero_experts_stay_finite(scale):
    base = small_model(0)
    experts = {
        "tiny": perturbed(base, 1, scale * 1e-3),
        "large": perturbed(base, 2, scale),
        "unchanged": perturbed(base, 3, 0.0),  # an all-zero task vector
    }
    merged = ACEMerging(eps=1e-5).run(pool_of(base, experts))
    for name, value in merged.state_dict().items():
        assert torch.isfinite(value).all(), name
    assert not math.isnan(float(sum(v.abs().sum() for v in merged.state_dict().values())))


def test_all_experts_equal_to_pretrained_give_the_pretrained_model():
    base = small_model(0)
    experts = {"a": perturbed(base, 1, 0.0), "b": perturbed(base, 2, 0.0)}
    merged = ACEMerging().run(pool_of(base, experts))
    for (name, got), want in zip(merged.state_dict().items(), base.state_dict().values()):
        torch.testing.assert_close(got, want, rtol=0, atol=0, msg=name)
