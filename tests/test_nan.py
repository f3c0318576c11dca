"""NAN (arXiv 2505.16148): coefficient math, the TA/TIES plug-ins against FusionBench, the CLI."""

import copy
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from fusion_bench import BaseModelPool
from fusion_bench.method import TaskArithmeticAlgorithm, TiesMergingAlgorithm
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from fusion_bench_ace.algorithms.nan import TaskArithmeticNANAlgorithm, TiesMergingNANAlgorithm
from fusion_bench_ace.methods.nan import (
    check_nan_options,
    compute_nan_coefficients,
    model_norms,
    nan_coefficients,
    resolve_global_scale,
    tensor_norms,
)

FUSION_BENCH = str(Path(sys.executable).with_name("fusion_bench"))
OFFLINE = {
    **os.environ,
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
}


# ----------------------------------------------------------------------------- the math


def test_hand_computed_sum_normalisation():
    alpha = nan_coefficients([1.0, 2.0, 4.0], eps=0.0)
    torch.testing.assert_close(
        alpha, torch.tensor([4 / 7, 2 / 7, 1 / 7], dtype=torch.float64), rtol=1e-15, atol=0
    )
    # the spec's eps = 1e-12 moves these by ~1e-12 relative
    torch.testing.assert_close(nan_coefficients([1.0, 2.0, 4.0]), alpha, rtol=1e-11, atol=0)
    assert alpha.dtype == torch.float64


def test_hand_computed_softmax():
    alpha = nan_coefficients([1.0, 2.0, 4.0], normalize="softmax", eps=0.0)
    e = [math.exp(1.0), math.exp(0.5), math.exp(0.25)]
    expected = torch.tensor([x / sum(e) for x in e], dtype=torch.float64)
    torch.testing.assert_close(alpha, expected, rtol=1e-14, atol=0)


def test_layer_norms_are_normalised_per_tensor():
    norms = torch.tensor([[1.0, 3.0], [2.0, 3.0], [4.0, 6.0]], dtype=torch.float64)
    alpha = nan_coefficients(norms, eps=0.0)
    expected = torch.tensor([[4 / 7, 0.4], [2 / 7, 0.4], [1 / 7, 0.2]], dtype=torch.float64)
    torch.testing.assert_close(alpha, expected, rtol=1e-14, atol=0)


norm_lists = st.lists(
    st.floats(min_value=1e-3, max_value=1e3, allow_nan=False), min_size=2, max_size=8
)


@settings(max_examples=60, deadline=None)
@given(norms=norm_lists, factor=st.floats(min_value=1e-3, max_value=1e3))
def test_sum_normalisation_invariants(norms, factor):
    n = torch.tensor(norms, dtype=torch.float64)
    alpha = nan_coefficients(n)
    assert abs(float(alpha.sum()) - 1.0) < 1e-12
    assert bool((alpha > 0).all())
    for i in range(len(norms)):
        for j in range(len(norms)):
            if norms[i] > norms[j] * (1 + 1e-9):  # larger norm => smaller coefficient
                assert alpha[i] < alpha[j]
    # invariant under a common rescaling of all norms: exactly with eps = 0, to ~eps/n with the
    # default
    torch.testing.assert_close(
        nan_coefficients(n * factor, eps=0.0), nan_coefficients(n, eps=0.0), rtol=1e-12, atol=0
    )
    torch.testing.assert_close(nan_coefficients(n * factor), alpha, rtol=1e-6, atol=0)


@settings(max_examples=40, deadline=None)
@given(norms=norm_lists)
def test_softmax_invariants(norms):
    n = torch.tensor(norms, dtype=torch.float64)
    alpha = nan_coefficients(n, normalize="softmax")
    assert abs(float(alpha.sum()) - 1.0) < 1e-12
    order = torch.argsort(n)
    assert bool((alpha[order][1:] <= alpha[order][:-1]).all())  # non-increasing in the norm


def test_softmax_is_not_scale_invariant_and_flattens_large_norms():
    small = nan_coefficients([1.0, 2.0], normalize="softmax")
    large = nan_coefficients([100.0, 200.0], normalize="softmax")
    assert float(small[0] - small[1]) > 0.2
    assert abs(float(large[0]) - 0.5) < 0.01  # the spec's warning: ~uniform for large norms
    torch.testing.assert_close(  # while the sum normalisation does not care
        nan_coefficients([100.0, 200.0]), nan_coefficients([1.0, 2.0]), rtol=1e-12, atol=0
    )


@pytest.mark.parametrize("normalize", ["sum", "softmax"])
@pytest.mark.parametrize("num_models", [2, 3, 8])
@pytest.mark.parametrize("norm", [1e-3, 0.37, 123.4])
def test_equal_norms_give_uniform_coefficients(normalize, num_models, norm):
    alpha = nan_coefficients([norm] * num_models, normalize=normalize)
    assert float((alpha - 1.0 / num_models).abs().max()) < 1e-15


def test_zero_norm_next_to_nonzero_is_an_error():
    with pytest.raises(ValueError, match=r"\['b'\] have a zero norm while other models do not"):
        nan_coefficients([1.0, 0.0, 2.0], names=["a", "b", "c"])
    with pytest.raises(ValueError, match="zero norm for tensor 'w2'"):
        nan_coefficients(
            torch.tensor([[1.0, 1.0], [2.0, 0.0]]), names=["a", "b"], units=["w1", "w2"]
        )


@pytest.mark.parametrize("normalize", ["sum", "softmax"])
@pytest.mark.parametrize("eps", [1e-12, 0.0])
def test_all_zero_norms_give_uniform_coefficients(normalize, eps):
    # documented: what the eps formula gives (a tensor no expert changed / copies of the base)
    alpha = nan_coefficients([0.0, 0.0, 0.0], normalize=normalize, eps=eps)
    torch.testing.assert_close(alpha, torch.full((3,), 1 / 3, dtype=torch.float64))
    layer = nan_coefficients(torch.tensor([[1.0, 0.0], [3.0, 0.0]]), normalize=normalize, eps=eps)
    torch.testing.assert_close(layer[:, 1], torch.full((2,), 0.5, dtype=torch.float64))
    assert float(layer[0, 0]) > float(layer[1, 0])


@pytest.mark.parametrize(
    "norms, kwargs, match",
    [
        ([1.0], {}, "at least two models"),
        ([], {}, "at least two models"),
        ([1.0, float("nan")], {}, "finite"),
        ([1.0, float("inf")], {}, "finite"),
        ([1.0, -2.0], {}, ">= 0"),
        ([1.0, 2.0], {"normalize": "l2"}, "normalize must be one of"),
        ([1.0, 2.0], {"eps": -1e-12}, "eps must be"),
        ([1.0, 2.0], {"eps": float("nan")}, "eps must be"),
        (torch.ones(2, 2, 2), {}, r"shape \(M,\) or \(M, L\)"),
    ],
)
def test_bad_norms_and_options(norms, kwargs, match):
    with pytest.raises(ValueError, match=match):
        nan_coefficients(norms, **kwargs)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"norm_target": "weights"}, "norm_target must be one of"),
        ({"granularity": "block"}, "granularity must be one of"),
        ({"normalize": "max"}, "normalize must be one of"),
    ],
)
def test_unknown_option_names(kwargs, match):
    with pytest.raises(ValueError, match=match):
        check_nan_options(**kwargs)


@pytest.mark.parametrize(
    "value, models, expected",
    [
        ("0.3M", 8, 2.4),
        ("0.3*M", 8, 2.4),
        ("M", 3, 3.0),
        ("m_half", 8, 4.0),
        (1.5, 8, 1.5),
        (2, 3, 2.0),
        ("2.4", 5, 2.4),
        ("1e-1M", 10, 1.0),
        (0.0, 3, 0.0),
    ],
)
def test_global_scale(value, models, expected):
    assert resolve_global_scale(value, models) == pytest.approx(expected, rel=1e-15)


@pytest.mark.parametrize(
    "value", ["abc", "0.3N", "-0.3M", -1.0, float("nan"), float("inf"), True, None]
)
def test_bad_global_scale(value):
    with pytest.raises(ValueError, match="global_scale"):
        resolve_global_scale(value, 3)


# per-tensor norms known by construction: θ_i^l = θ_0^l + t_il e_l, with ||e_l|| = 1 and
# e_l ⊥ θ_0^l,
# so ||τ_i^l|| = t_il and ||θ_i^l||^2 = ||θ_0^l||^2 + t_il^2
F64 = torch.float64
E = {
    "a": torch.tensor([[0.6, 0.0], [0.0, 0.8]], dtype=F64),
    "b": torch.tensor([0.0, 0.0, 1.0], dtype=F64),
}
BASE = {
    "a": torch.tensor([[0.0, 1.0], [1.0, 0.0]], dtype=F64),
    "b": torch.tensor([2.0, -1.0, 0.0], dtype=F64),
}
T = {"x": {"a": 1.0, "b": 3.0}, "y": {"a": 2.0, "b": 1.0}, "z": {"a": 4.0, "b": 1.0}}


def known_norm_experts(dtype=torch.float64):
    base = {k: v.to(dtype) for k, v in BASE.items()}
    experts = {name: {k: base[k] + t[k] * E[k].to(dtype) for k in base} for name, t in T.items()}
    return base, experts


def test_per_tensor_norms_hand_computed():
    base, experts = known_norm_experts()
    tv = tensor_norms(list(experts.values()), ["a", "b"], pretrained=base)
    expected_tv = torch.tensor([[T[m]["a"], T[m]["b"]] for m in T], dtype=torch.float64)
    torch.testing.assert_close(tv, expected_tv, rtol=1e-15, atol=1e-15)
    ft = tensor_norms(list(experts.values()), ["a", "b"])
    expected_ft = torch.sqrt(torch.tensor([[2.0, 5.0]], dtype=torch.float64) + expected_tv**2)
    torch.testing.assert_close(ft, expected_ft, rtol=1e-15, atol=0)
    # global Frobenius norm = norm of the concatenation of all tensors
    concatenated = [torch.cat([e["a"].flatten(), e["b"]]).norm() for e in experts.values()]
    torch.testing.assert_close(model_norms(ft), torch.stack(concatenated), rtol=1e-15, atol=0)


def test_layer_granularity_with_known_norms():
    base, experts = known_norm_experts()
    result = compute_nan_coefficients(
        base, experts, ["a", "b"], norm_target="task_vector", granularity="layer"
    )
    # tensor a: norms 1, 2, 4 -> 4/7, 2/7, 1/7; tensor b: norms 3, 1, 1 -> 1/7, 3/7, 3/7
    expected = torch.tensor([[4 / 7, 1 / 7], [2 / 7, 3 / 7], [1 / 7, 3 / 7]], dtype=torch.float64)
    torch.testing.assert_close(result.alpha, expected, rtol=1e-11, atol=0)
    assert result.coefficient(2, 1) == pytest.approx(3 / 7, rel=1e-11)
    data = result.to_dict()
    assert data["alpha"]["b"]["y"] == pytest.approx(3 / 7, rel=1e-11)
    assert data["norms"]["a"]["z"] == pytest.approx(4.0)
    assert data["alpha_max_min_ratio"] == pytest.approx(4.0, rel=1e-10)

    model = compute_nan_coefficients(base, experts, ["a", "b"], norm_target="task_vector")
    n = [math.sqrt(T[m]["a"] ** 2 + T[m]["b"] ** 2) for m in T]  # sqrt(10), sqrt(5), sqrt(17)
    r = [1 / x for x in n]
    torch.testing.assert_close(
        model.alpha, torch.tensor([x / sum(r) for x in r], dtype=torch.float64), rtol=1e-11, atol=0
    )
    finetuned = compute_nan_coefficients(base, experts, ["a", "b"], norm_target="finetuned")
    n = [math.sqrt(7.0 + T[m]["a"] ** 2 + T[m]["b"] ** 2) for m in T]
    r = [1 / x for x in n]
    torch.testing.assert_close(
        finetuned.alpha,
        torch.tensor([x / sum(r) for x in r], dtype=torch.float64),
        rtol=1e-11,
        atol=0,
    )


def test_bad_weights_are_named():
    base, experts = known_norm_experts()
    experts["y"]["b"] = torch.tensor([0.0, float("nan"), float("inf")], dtype=torch.float64)
    with pytest.raises(ValueError, match=r"tensor 'b' of model 'y': 1 NaN, 1 Inf"):
        compute_nan_coefficients(base, experts, ["a", "b"])
    base, experts = known_norm_experts()
    with pytest.raises(ValueError, match="'c' is missing from model 'x'"):
        tensor_norms(list(experts.values()), ["a", "c"], names=list(experts))
    experts["x"]["a"] = torch.ones(2, 2, dtype=torch.int64)
    with pytest.raises(ValueError, match="floating-point tensors only"):
        compute_nan_coefficients(base, experts, ["a"], norm_target="task_vector")
    with pytest.raises(ValueError, match="keys is empty"):
        compute_nan_coefficients(base, dict(list(known_norm_experts()[1].items())), [])
    with pytest.raises(ValueError, match="at least two models"):
        compute_nan_coefficients(base, {"x": experts["x"]}, ["b"])


def test_zero_task_vector_expert_is_rejected_by_name():
    base, experts = known_norm_experts()
    experts["copy"] = {k: v.clone() for k, v in base.items()}
    with pytest.raises(ValueError, match=r"\['copy'\] have a zero norm"):
        compute_nan_coefficients(base, experts, ["a", "b"], norm_target="task_vector")
    # the fine-tuned weights of that expert are not zero: fine
    result = compute_nan_coefficients(base, experts, ["a", "b"], norm_target="finetuned")
    assert result.alpha.argmax().item() == 3  # the smallest weights get the largest coefficient


# ----------------------------------------------------------------------------- the plug-ins


def make_net(dtype):
    return nn.Sequential(nn.Linear(6, 5), nn.LayerNorm(5), nn.Linear(5, 3)).to(dtype)


def equal_norm_models(num_experts=3, dtype=torch.float32, seed=0):
    """θ_0^l constant per tensor, θ_i^l = θ_0^l + π_i(δ^l): every τ_i^l is a permutation of δ^l
    and every θ_i^l one of θ_0^l + δ^l, so all norms (either target, either granularity) are
    equal."""
    generator = torch.Generator().manual_seed(seed)
    base = make_net(dtype)
    base_sd = {
        k: torch.full_like(v, 0.1 * (j + 1)) for j, (k, v) in enumerate(base.state_dict().items())
    }
    base.load_state_dict(base_sd)
    experts = {}
    deltas = {
        k: 0.05 * torch.randn(v.shape, generator=generator, dtype=dtype) for k, v in base_sd.items()
    }
    for i in range(num_experts):
        model = make_net(dtype)
        state = {}
        for k, v in base_sd.items():
            perm = torch.randperm(v.numel(), generator=generator)
            state[k] = v + deltas[k].flatten()[perm].reshape(v.shape)
        model.load_state_dict(state)
        experts[f"task{i}"] = model
    return base, experts


def scaled_norm_models(scales, dtype=torch.float64, seed=1):
    """τ_i^l = c_il u_il with ||u_il||_F = 1: per-tensor task-vector norms c_il by construction."""
    generator = torch.Generator().manual_seed(seed)
    base = make_net(dtype)
    base.load_state_dict(
        {
            k: torch.randn(v.shape, generator=generator, dtype=dtype)
            for k, v in base.state_dict().items()
        }
    )
    units, experts = {}, {}
    for i, name in enumerate(scales):
        units[name] = {}
        state = {}
        for j, (k, v) in enumerate(base.state_dict().items()):
            u = torch.randn(v.shape, generator=generator, dtype=dtype)
            units[name][k] = u / u.norm()
            state[k] = v + scales[name][j] * units[name][k]
        model = make_net(dtype)
        model.load_state_dict(state)
        experts[name] = model
    return base, experts, units


def pool(base, experts):
    """A fresh pool (the algorithms write the merge into the pretrained model in place)."""
    return BaseModelPool(
        {"_pretrained_": copy.deepcopy(base), **{n: copy.deepcopy(m) for n, m in experts.items()}}
    )


def assert_same_weights(a: nn.Module, b: nn.Module, **tolerances):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        torch.testing.assert_close(sa[key], sb[key], msg=key, **tolerances)


@pytest.mark.parametrize("norm_target", ["finetuned", "task_vector"])
@pytest.mark.parametrize("granularity", ["model", "layer"])
@pytest.mark.parametrize(
    "global_scale, fusion_bench_lambda", [("0.3M", 0.3), (1.5, 0.5), ("m_half", 0.5)]
)
def test_ta_nan_is_fusion_bench_ta_when_norms_are_equal(
    norm_target, granularity, global_scale, fusion_bench_lambda
):
    base, experts = equal_norm_models()
    algorithm = TaskArithmeticNANAlgorithm(
        norm_target=norm_target, granularity=granularity, global_scale=global_scale
    )
    merged = algorithm.run(pool(base, experts))
    assert float((algorithm.coefficients.alpha - 1 / 3).abs().max()) < 1e-12
    reference = TaskArithmeticAlgorithm(scaling_factor=fusion_bench_lambda).run(pool(base, experts))
    assert_same_weights(merged, reference, rtol=1e-6, atol=1e-7)
    assert not torch.equal(merged.state_dict()["0.weight"], base.state_dict()["0.weight"])


@pytest.mark.parametrize("granularity", ["model", "layer"])
@pytest.mark.parametrize(
    "merge_func, threshold", [("sum", 20), ("mean", 20), ("max", 20), ("sum", 0.5)]
)
def test_ties_nan_with_uniform_alpha_is_fusion_bench_ties(granularity, merge_func, threshold):
    base, experts = equal_norm_models()
    algorithm = TiesMergingNANAlgorithm(
        norm_target="task_vector",
        granularity=granularity,
        threshold=threshold,
        merge_func=merge_func,
    )
    merged = algorithm.run(pool(base, experts))
    assert float((algorithm.coefficients.alpha - 1 / 3).abs().max()) < 1e-12
    reference = TiesMergingAlgorithm(
        scaling_factor=0.3, threshold=threshold, remove_keys=[], merge_func=merge_func
    ).run(pool(base, experts))
    assert_same_weights(merged, reference, rtol=1e-6, atol=1e-7)


SCALES = {
    "small": [0.5, 2.0, 1.0, 0.1, 3.0, 0.2],
    "mid": [1.0, 1.0, 4.0, 0.3, 1.0, 0.2],
    "big": [8.0, 1.0, 4.0, 0.4, 1.0, 1.2],
}


def test_ta_nan_model_granularity_equalises_contributions():
    """τ_i = c_i u_i with ||u_i|| = 1 => α_i ∝ 1/c_i and θ = θ_0 + s (Σ_j 1/c_j)^-1 Σ_i u_i."""
    base, experts, units = scaled_norm_models(SCALES)
    algorithm = TaskArithmeticNANAlgorithm(norm_target="task_vector", granularity="model")
    merged = algorithm.run(pool(base, experts)).state_dict()
    # ||u_i||_global = sqrt(number of tensors) since each tensor's u has unit norm
    c = {name: math.sqrt(sum(x * x for x in s)) for name, s in SCALES.items()}
    harmonic = 1 / sum(1 / x for x in c.values())
    expected_alpha = [harmonic / c[name] for name in SCALES]
    torch.testing.assert_close(
        algorithm.coefficients.alpha,
        torch.tensor(expected_alpha, dtype=torch.float64),
        rtol=1e-10,
        atol=0,
    )
    assert algorithm.scale == pytest.approx(0.9)
    for j, (key, theta0) in enumerate(base.state_dict().items()):
        direction = sum((SCALES[name][j] / c[name]) * units[name][key] for name in SCALES)
        torch.testing.assert_close(
            merged[key], theta0 + 0.9 * harmonic * direction, rtol=1e-12, atol=1e-12, msg=key
        )


def test_ta_nan_layer_granularity_with_known_per_layer_norms():
    """Per tensor: α_i^l ∝ 1/c_il, so θ^l = θ_0^l + s (Σ_j 1/c_jl)^-1 Σ_i u_il."""
    base, experts, units = scaled_norm_models(SCALES)
    algorithm = TaskArithmeticNANAlgorithm(
        norm_target="task_vector", granularity="layer", global_scale=2.0
    )
    merged = algorithm.run(pool(base, experts)).state_dict()
    keys = list(base.state_dict())
    assert algorithm.coefficients.keys == keys
    for j, key in enumerate(keys):
        harmonic = 1 / sum(1 / SCALES[name][j] for name in SCALES)
        expected_alpha = [harmonic / SCALES[name][j] for name in SCALES]
        torch.testing.assert_close(
            algorithm.coefficients.alpha[:, j],
            torch.tensor(expected_alpha, dtype=torch.float64),
            rtol=1e-10,
            atol=0,
        )
        expected = base.state_dict()[key] + 2.0 * harmonic * sum(
            units[name][key] for name in SCALES
        )
        torch.testing.assert_close(merged[key], expected, rtol=1e-12, atol=1e-12, msg=key)


@pytest.mark.parametrize("granularity", ["model", "layer"])
@pytest.mark.parametrize("merge_func", ["sum", "mean"])
def test_ties_nan_reweights_the_task_vectors_before_ties(granularity, merge_func):
    """TIES+NAN = FusionBench's TIES on experts θ_0 + M α_i τ_i with scaling_factor s/M (float64,
    so rounding cannot move TIES' trim), and differs from plain TIES."""
    base, experts, _ = scaled_norm_models(SCALES)
    algorithm = TiesMergingNANAlgorithm(
        norm_target="task_vector", granularity=granularity, merge_func=merge_func
    )
    merged = algorithm.run(pool(base, experts))
    alpha = algorithm.coefficients.alpha
    assert algorithm.coefficients.max_min_ratio() > 2
    base_sd = base.state_dict()
    virtual = {}
    for i, (name, model) in enumerate(experts.items()):
        state = {}
        for j, (key, theta0) in enumerate(base_sd.items()):
            a = float(alpha[i] if alpha.dim() == 1 else alpha[i, j])
            state[key] = theta0 + 3 * a * (model.state_dict()[key] - theta0)
        virtual[name] = make_net(torch.float64)
        virtual[name].load_state_dict(state)
    ties = dict(threshold=20, remove_keys=[], merge_func=merge_func)
    reference = TiesMergingAlgorithm(scaling_factor=0.3, **ties).run(pool(base, virtual))
    assert_same_weights(merged, reference, rtol=1e-10, atol=1e-12)
    plain = TiesMergingAlgorithm(scaling_factor=0.3, **ties).run(pool(base, experts))
    assert (merged.state_dict()["0.weight"] - plain.state_dict()["0.weight"]).abs().max() > 1e-3


@pytest.mark.parametrize("algorithm_class", [TaskArithmeticNANAlgorithm, TiesMergingNANAlgorithm])
def test_remove_keys_stay_pretrained_and_leave_the_norms(algorithm_class):
    base, experts, _ = scaled_norm_models(SCALES)
    algorithm = algorithm_class(norm_target="task_vector", remove_keys=["2.bias"])
    merged = algorithm.run(pool(base, experts)).state_dict()
    assert torch.equal(merged["2.bias"], base.state_dict()["2.bias"])
    assert not torch.equal(merged["2.weight"], base.state_dict()["2.weight"])
    keys = [k for k in base.state_dict() if k != "2.bias"]
    assert algorithm.coefficients.keys == keys
    expected = compute_nan_coefficients(
        base.state_dict(),
        {n: m.state_dict() for n, m in experts.items()},
        keys,
        norm_target="task_vector",
    )
    torch.testing.assert_close(algorithm.coefficients.alpha, expected.alpha, rtol=0, atol=0)


def test_expert_identical_to_pretrained_is_rejected_by_name():
    base, experts = equal_norm_models()
    experts["unchanged"] = copy.deepcopy(base)
    with pytest.raises(ValueError, match=r"\['unchanged'\] have a zero norm"):
        TaskArithmeticNANAlgorithm(norm_target="task_vector").run(pool(base, experts))


def test_pool_needs_two_experts():
    base, experts = equal_norm_models(num_experts=1)
    with pytest.raises(ValueError, match="at least two fine-tuned experts"):
        TiesMergingNANAlgorithm().run(pool(base, experts))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"norm_target": "weights"}, "norm_target"),
        ({"granularity": "per_layer"}, "granularity"),
        ({"normalize": "l1"}, "normalize"),
        ({"global_scale": "0.3 models"}, "global_scale"),
        ({"threshold": 100}, "threshold"),
        ({"threshold": 0}, "threshold"),
        ({"merge_func": "median"}, "merge_func"),
    ],
)
def test_bad_configuration_is_rejected_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TiesMergingNANAlgorithm(**kwargs)
    ta_kwargs = {k: v for k, v in kwargs.items() if k not in ("threshold", "merge_func")}
    if ta_kwargs:
        with pytest.raises(ValueError, match=match):
            TaskArithmeticNANAlgorithm(**ta_kwargs)


# ----------------------------------------------------------------------------- the real CLI


def test_cli_ties_merging_nan_on_tiny_gpt2(tmp_path):
    from transformers import GPT2Model

    from tiny_gpt2 import SCALES as TINY_SCALES
    from tiny_gpt2 import TASKS, build_tiny_gpt2_pool

    root = tmp_path / "pool"
    config_dir = build_tiny_gpt2_pool(root)
    out = tmp_path / "out"
    result = subprocess.run(
        [
            FUSION_BENCH,
            "--config-dir",
            str(config_dir),
            "method=ties_merging_nan",
            "method.norm_target=task_vector",
            "modelpool=tiny_gpt2_test",
            "taskpool=tiny_gpt2_test",
            f"merged_model_save_path={out}/merged.pt",
            f"path.log_dir={out}/logs",
        ],
        cwd=tmp_path,
        env=OFFLINE,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    log_text = (out / "logs" / "cli.log").read_text()
    assert "ties_merging_nan alpha (norm_target=task_vector, granularity=model" in log_text

    report = json.loads((out / "logs" / "program_report.json").read_text())
    for task in TASKS:
        assert 0.0 <= report[task]["accuracy"] <= 1.0
    data = json.loads((out / "logs" / "nan_coefficients.json").read_text())
    assert data["method"] == "ties_merging_nan"
    assert (data["norm_target"], data["granularity"], data["normalize"]) == (
        "task_vector",
        "model",
        "sum",
    )
    assert (data["global_scale"], data["threshold"], data["merge_func"]) == ("0.3M", 20, "sum")
    assert data["models"] == list(TASKS)
    assert data["scale"] == pytest.approx(0.3 * len(TASKS))
    assert sum(data["alpha"].values()) == pytest.approx(1.0, abs=1e-12)
    # experts perturbed with larger noise have larger task vectors and get smaller coefficients
    by_scale = sorted(TASKS, key=lambda t: TINY_SCALES[t])
    assert [data["alpha"][t] for t in by_scale] == sorted(data["alpha"].values(), reverse=True)

    pretrained = GPT2Model.from_pretrained(root / "pretrained").eval()
    experts = {t: GPT2Model.from_pretrained(root / t).eval() for t in TASKS}
    keys = [k for k, v in pretrained.state_dict().items() if v.is_floating_point()]
    expected = compute_nan_coefficients(
        pretrained.state_dict(),
        {t: m.state_dict() for t, m in experts.items()},
        keys,
        norm_target="task_vector",
    )
    # the streamed unit takes the norms of the task vectors it merges (float32, as the weights):
    # the float64 differences of compute_nan_coefficients agree to their float32 rounding
    assert data["alpha"] == pytest.approx(dict(zip(TASKS, expected.alpha.tolist())), rel=1e-9)

    in_process = TiesMergingNANAlgorithm(norm_target="task_vector").run(
        BaseModelPool({"_pretrained_": pretrained, **experts})
    )
    merged = torch.load(out / "merged.pt")
    assert merged.keys() == in_process.state_dict().keys()
    for key, tensor in in_process.state_dict().items():
        torch.testing.assert_close(merged[key], tensor, rtol=1e-6, atol=1e-7, msg=key)


# ------------------------------------------- TIES one parameter at a time = FusionBench's TIES


def _ties_case(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = {"a": torch.randn(40, 30, generator=g, dtype=dtype),
            "b": torch.randn(77, generator=g, dtype=dtype),
            "c": torch.randn(5, 9, generator=g, dtype=dtype) * 1e-3}
    experts = {f"e{i}": {k: v + (i + 1) * 0.1 * torch.randn(v.shape, generator=g, dtype=dtype)
                         for k, v in base.items()} for i in range(3)}
    experts["e0"]["b"][:10] = base["b"][:10]  # zeros in one task vector
    experts["e1"]["a"][0, :6] = base["a"][0, :6] + 0.125  # equal magnitudes across the cut
    experts["e2"]["a"][0, :6] = base["a"][0, :6] + 0.125
    return base, experts


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("granularity", ["model", "layer"])
@pytest.mark.parametrize("merge_func, threshold", [("sum", 20), ("mean", 20), ("max", 20),
                                                   ("sum", 0.5), ("mean", 99)])
def test_ties_unit_is_fusion_bench_ties_on_the_flattened_model(dtype, granularity, merge_func,
                                                               threshold):
    from fusion_bench.method.ties_merging.ties_merging_utils import (
        state_dict_to_vector,
        ties_merging,
        vector_to_state_dict,
    )

    from fusion_bench_ace.engine.driver import (
        compute_statistics,
        merged_tensors,
        plan_parameters,
    )
    from fusion_bench_ace.methods.nan import TiesMergingNAN

    base, experts = _ties_case(dtype)
    unit = TiesMergingNAN(list(experts), norm_target="task_vector", granularity=granularity,
                          scale=0.9, threshold=threshold, merge_func=merge_func)
    plan = plan_parameters(base, unit)
    compute_statistics(unit, base, experts, plan)
    got = dict(merged_tensors(base, experts, unit, plan))
    # the reference: FusionBench's TIES on the flattened α-weighted task vectors, same α
    flat_tv = torch.vstack([state_dict_to_vector(s) for s in experts.values()]) \
        - state_dict_to_vector(base)
    if granularity == "model":
        flat_tv.mul_(unit.alpha.to(dtype).unsqueeze(1))
    else:
        alpha = {row["name"]: row["alpha"] for row in unit.layer_rows}
        flat_tv.mul_(torch.vstack([state_dict_to_vector(
            {k: torch.full(v.shape, alpha[k][i], dtype=dtype) for k, v in base.items()})
            for i in range(3)]))
    merged = ties_merging(flat_tv, reset_thresh=threshold, merge_func=merge_func)
    reference = vector_to_state_dict(state_dict_to_vector(base) + 0.9 * merged, base)
    for key in base:
        assert torch.equal(got[key], reference[key]), key


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_radix_selection_is_kthvalue(dtype):
    from fusion_bench_ace.methods import ties

    g = torch.Generator().manual_seed(1)
    values = torch.randn(3, 500, generator=g, dtype=dtype) * torch.logspace(-30, 30, 500,
                                                                           dtype=dtype)
    values[0, :50] = 0.0
    values[1, :100] = -values[1, 100:200]  # every magnitude twice
    values[2, :3] = torch.finfo(dtype).tiny / 4  # subnormal
    pieces = [values[:, :123], values[:, 123:]]
    for k in (1, 2, 250, 499, 500):
        prefix, ranks = None, [k] * 3
        for shift in ties.digit_shifts(dtype):
            histogram = sum(ties.digit_histogram(p, shift, prefix) for p in pieces)
            bucket, remaining = ties.bucket_of_rank(histogram, ranks)
            ranks = remaining.tolist()
            prefix = bucket if prefix is None else (prefix << 16) | bucket
        assert torch.equal(ties.threshold_values(prefix, dtype),
                           values.abs().kthvalue(k, dim=1).values), k
