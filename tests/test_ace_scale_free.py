"""ACE's options beyond the paper: eps_mode=relative and gamma_mode=scale_free.

- against the naive float64 reference (``ace_reference.naive_ace``) in every mode combination;
- the invariances (hypothesis): a common rescaling of the task vectors by 1e-4 ... 1e4 leaves
  the branches unchanged and scales the merged task vector by the same factor;
- the stated mapping between the modes (``docs/ace_scale_free.md``);
- the defaults (absolute / paper) reproduce the merge of the commit before the options, bit for
  bit, in float64;
- clear errors for bad values.
"""

import importlib.util
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from test_ace_fuzz import task_vector_of_kind
from test_ace_math import CASES, HETEROGENEOUS, make_task_vectors, rel_diff

from fusion_bench_ace import ACEMerging, ace_merge_layer, ace_merge_layer_with_info, heterogeneity
from fusion_bench_ace.methods.ace import ace_merge_layer_stream, check_ace_hyperparameters

from ace_reference import naive_ace, naive_gamma

REPO = Path(__file__).resolve().parents[1]
# The last commit before the options (main, 2026-11-23): its ace.py is the paper's behaviour.
BASELINE_COMMIT = "d1870dd335ae5c2a0836daec6df2566c3d1bfd18"
RELATIVE = {"eps_mode": "relative", "eps_rel": 1e-2}
SCALE_FREE = {"gamma_mode": "scale_free", "tau_scale_free": math.log(2)}
MODES = [
    pytest.param({}, id="absolute-paper"),
    pytest.param(RELATIVE, id="relative-paper"),
    pytest.param(SCALE_FREE, id="absolute-scale_free"),
    pytest.param({**RELATIVE, **SCALE_FREE}, id="relative-scale_free"),
]


def frobenius_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    scale = float(torch.linalg.norm(b))
    diff = float(torch.linalg.norm(a - b))
    return diff if scale == 0 else diff / scale


# --- the reference ------------------------------------------------------------------------------


@pytest.mark.parametrize("options", MODES)
@pytest.mark.parametrize("T,m,n,scales,eps,rank", CASES)
def test_matches_naive_float64_in_every_mode(T, m, n, scales, eps, rank, options):
    tvs = make_task_vectors(T, m, n, scales, seed=5, rank=rank)
    expected, expected_het = naive_ace(tvs, eps, **options)
    result = ace_merge_layer_with_info(tvs, eps, **options)
    assert result.heterogeneous == expected_het
    assert rel_diff(result.merged, expected) < 1e-9


@pytest.mark.parametrize("tau", [0.0, math.inf], ids=["heterogeneous", "homogeneous"])
@pytest.mark.parametrize("eps_rel", [1e-6, 1e-2, 1.0])
def test_relative_mode_on_both_branches_and_degenerate_tasks(tau, eps_rel):
    g = torch.Generator().manual_seed(7)
    tvs = make_task_vectors(5, 12, 20, HETEROGENEOUS, seed=8, rank=3)
    tvs.append(torch.zeros(12, 20, dtype=torch.float64))  # left out
    tvs.append(torch.randn(1, 20, generator=g, dtype=torch.float64).expand(12, 20) * 1e-2)  # W̃ = 0
    options = {"eps_mode": "relative", "eps_rel": eps_rel}
    expected, het = naive_ace(tvs, 1e-5, tau=tau, **options)
    result = ace_merge_layer_with_info(tvs, 1e-5, tau=tau, **options)
    assert result.heterogeneous == het == (tau == 0.0)
    assert rel_diff(result.merged, expected) < 1e-9


def test_relative_mode_with_no_centred_energy_gives_zero_like_absolute():
    # homogeneous, every task's rows equal: W̃_t = 0, so W_pre = 0 whatever ε (s̄ = 0)
    rows = [torch.full((4, 3), float(t + 1)) for t in range(3)]
    for options in ({}, RELATIVE):
        merged = ace_merge_layer(rows, 1e-5, tau=math.inf, **options)
        assert torch.equal(merged, torch.zeros(4, 3))


@pytest.mark.parametrize("gamma_mode", ["paper", "scale_free"])
def test_heterogeneity_statistic_matches_naive(gamma_mode):
    tvs = make_task_vectors(6, 9, 7, HETEROGENEOUS, seed=2)
    assert heterogeneity(tvs, gamma_mode) == pytest.approx(naive_gamma(tvs, gamma_mode), rel=1e-12)


def test_scale_free_statistic_is_the_variance_of_log_energies():
    energies = [1.0, 4.0, 0.25]
    tvs = [torch.full((2, 2), math.sqrt(e / 4), dtype=torch.float64) for e in energies]
    logs = [math.log(e) for e in energies]
    mean = sum(logs) / 3
    variance = sum((x - mean) ** 2 for x in logs) / 2
    assert heterogeneity(tvs, "scale_free") == pytest.approx(variance, rel=1e-12)
    # the paper's γ of the same layer: its mean log energy is 0, so γ = inf
    assert heterogeneity(tvs, "paper") == math.inf


# --- the mapping between the modes --------------------------------------------------------------


@pytest.mark.parametrize("tau", [0.0, math.inf], ids=["heterogeneous", "homogeneous"])
@pytest.mark.parametrize("shape", [(16, 10), (6, 30)])
def test_relative_is_absolute_on_the_layer_in_units_of_its_mean_centred_trace(tau, shape):
    """relative(ΔW; eps_rel) = √s̄ absolute(ΔW / √s̄; eps_rel / d_in), and ε = eps_rel s̄ / d_in."""
    m, n = shape
    tvs = make_task_vectors(6, m, n, HETEROGENEOUS, seed=11, rank=2)
    mean_centred = sum(float(((w - w.mean(0)) ** 2).sum()) for w in tvs) / len(tvs)
    unit = math.sqrt(mean_centred)
    relative = ace_merge_layer_with_info(tvs, 1e-5, tau=tau, eps_mode="relative", eps_rel=0.03)
    absolute = ace_merge_layer_with_info([w / unit for w in tvs], 0.03 / n, tau=tau)
    assert relative.heterogeneous == absolute.heterogeneous == (tau == 0.0)
    assert frobenius_rel(relative.merged, absolute.merged * unit) < 1e-10
    assert relative.eps == pytest.approx(0.03 * mean_centred / n, rel=1e-12)
    assert absolute.eps == 0.03 / n


def test_paper_gamma_and_absolute_eps_are_not_scale_free():
    """Why the options exist: the same layer, rescaled, changes branch and shape in paper mode."""
    tvs = make_task_vectors(6, 12, 10, [1e-1, 3e-2, 1e-2], seed=4)
    gammas = [heterogeneity([w * a for w in tvs]) for a in (1e-2, 1.0, 1e2)]
    assert len(set(gammas)) == 3
    for a in (1e-2, 1e2):
        assert heterogeneity([w * a for w in tvs], "scale_free") == pytest.approx(
            heterogeneity(tvs, "scale_free"), rel=1e-12)
    base = ace_merge_layer(tvs, 1e-5, tau=math.inf)
    assert frobenius_rel(ace_merge_layer([w * 1e-3 for w in tvs], 1e-5, tau=math.inf),
                         base * 1e-3) > 1e-2


# --- the invariances (property tests) -----------------------------------------------------------


@st.composite
def rescaled_layers(draw):
    d_out = draw(st.integers(2, 10))
    d_in = draw(st.integers(1, 10))
    tasks = draw(st.integers(1, 6))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    task_vectors = []
    for _ in range(tasks):
        kind = draw(st.sampled_from(["dense", "dense", "rank1", "zero", "equal_rows"]))
        scale = 10.0 ** draw(st.floats(-3.0, 1.0))
        w = task_vector_of_kind(kind, d_out, d_in, g)
        task_vectors.append(w * scale)
    options = {
        "eps_mode": "relative",
        "eps_rel": 10.0 ** draw(st.floats(-4.0, 0.0)),
        "gamma_mode": "scale_free",
        "tau_scale_free": draw(st.sampled_from([0.0, 0.1, math.log(2), 2.0])),
        "k_frac": draw(st.sampled_from([0.0, 0.3, 1.0])),
    }
    factor = 10.0 ** draw(st.floats(-4.0, 4.0))
    return task_vectors, options, factor


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rescaled_layers())
def test_common_rescaling_keeps_branches_and_scales_the_merge(case):
    task_vectors, options, factor = case
    # the refinement's top-k singular vectors of W_pre + Δ_res are arbitrary (a function of the
    # rounding, in any mode) when σ_k is not separated from σ_(k+1), e.g. k above its rank
    _, _, spectrum = naive_ace(task_vectors, 1e-5, **options, with_spectrum=True)
    if spectrum is not None:
        k = int(min(task_vectors[0].shape) * options["k_frac"])
        following = float(spectrum[k]) if k < len(spectrum) else 0.0
        assume(float(spectrum[k - 1]) - following > 1e-6 * float(spectrum[0]))
    base = ace_merge_layer_with_info(task_vectors, 1e-5, **options)
    scaled = ace_merge_layer_with_info([w * factor for w in task_vectors], 1e-5, **options)
    assert scaled.heterogeneous == base.heterogeneous
    assert scaled.rank_k == base.rank_k and scaled.fallback == base.fallback
    assert scaled.gamma == pytest.approx(base.gamma, rel=1e-9, abs=1e-12)
    # relative to the merge, plus float64 rounding of the inputs (a layer whose rows are equal up
    # to rounding merges to rounding noise, ~1e-16 of the inputs, in any mode)
    input_scale = max(float(torch.linalg.norm(w)) for w in task_vectors)
    difference = float(torch.linalg.norm(scaled.merged - base.merged * factor))
    assert difference <= 1e-8 * factor * float(torch.linalg.norm(base.merged)) \
        + 1e-13 * factor * input_scale


@pytest.mark.parametrize("het", [False, True])
@pytest.mark.parametrize("shape", [(24, 16), (8, 40)])
def test_common_rescaling_in_float32(het, shape):
    scales = HETEROGENEOUS if het else [0.01]
    tvs = [w.float() for w in make_task_vectors(8, *shape, scales, seed=3, rank=4)]
    options = {**RELATIVE, **SCALE_FREE}
    base = ace_merge_layer_with_info(tvs, 1e-5, **options)
    assert base.heterogeneous == het
    for factor in (1e-4, 3e-2, 7.0, 1e4):
        scaled = ace_merge_layer_with_info([w * factor for w in tvs], 1e-5, **options)
        assert scaled.heterogeneous == het
        # each within 1e-5 of its float64 merge, and those scale to ~1e-12
        assert frobenius_rel(scaled.merged, base.merged.double() * factor) < 2e-5


# --- the defaults are the paper's merge, bit for bit ----------------------------------------------


@pytest.fixture(scope="module")
def baseline_ace():
    """``fusion_bench_ace/ace.py`` as of BASELINE_COMMIT, imported beside the package."""
    try:
        source = subprocess.run(
            ["git", "show", f"{BASELINE_COMMIT}:fusion_bench_ace/ace.py"],
            cwd=REPO, capture_output=True, text=True, check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip(f"needs the git history (commit {BASELINE_COMMIT[:10]}) of the repository")
    spec = importlib.util.spec_from_loader("fusion_bench_ace._ace_baseline", loader=None)
    module = importlib.util.module_from_spec(spec)
    module.__package__ = "fusion_bench_ace.methods"  # its relative imports: methods/tensors.py
    sys.modules[spec.name] = module  # dataclasses look their module up there
    try:
        exec(compile(source, f"{BASELINE_COMMIT[:10]}:fusion_bench_ace/ace.py", "exec"),
             module.__dict__)
        yield module
    finally:
        del sys.modules[spec.name]


@pytest.mark.parametrize("T,m,n,scales,eps,rank", CASES)
@pytest.mark.parametrize("seed", [0, 1])
def test_defaults_reproduce_the_baseline_bit_for_bit(baseline_ace, T, m, n, scales, eps, rank,
                                                     seed):
    tvs = torch.stack(make_task_vectors(T, m, n, scales, seed, rank=rank))
    want = baseline_ace.ace_merge_layer_with_info(tvs, eps)
    for got in (
        ace_merge_layer_with_info(tvs, eps),
        ace_merge_layer_with_info(tvs, eps, eps_mode="absolute", eps_rel=0.5, gamma_mode="paper",
                                  tau_scale_free=0.1),  # the unused options change nothing
        ace_merge_layer_stream(lambda t: tvs[t], T, eps),
    ):
        assert torch.equal(got.merged, want.merged)
        assert (got.gamma, got.heterogeneous, got.rank_k, got.tasks_used, got.fallback) == (
            want.gamma, want.heterogeneous, want.rank_k, want.tasks_used, want.fallback)
    assert baseline_ace.heterogeneity(tvs) == heterogeneity(tvs)


# --- bad values -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options, message",
    [
        ({"eps_mode": "relativ"}, "eps_mode must be one of absolute, relative"),
        ({"gamma_mode": "scalefree"}, "gamma_mode must be one of paper, scale_free"),
        ({"eps_mode": "relative"}, "needs eps_rel"),
        ({"eps_mode": "relative", "eps_rel": 0.0}, "eps_rel must be a finite number > 0"),
        ({"eps_mode": "relative", "eps_rel": -1e-3}, "eps_rel must be a finite number > 0"),
        ({"eps_mode": "relative", "eps_rel": math.nan}, "eps_rel must be a finite number > 0"),
        ({"eps_mode": "relative", "eps_rel": math.inf}, "eps_rel must be a finite number > 0"),
        ({"eps_mode": "relative", "eps_rel": True}, "eps_rel must be a finite number > 0"),
        ({"eps_rel": "1e-2"}, "eps_rel must be a finite number > 0"),  # checked when given
        ({"gamma_mode": "scale_free"}, "needs tau_scale_free"),
        ({"gamma_mode": "scale_free", "tau_scale_free": -0.1}, "tau_scale_free must be >= 0"),
        ({"gamma_mode": "scale_free", "tau_scale_free": math.nan}, "tau_scale_free must be >= 0"),
    ],
)
def test_bad_option_values_fail_clearly(options, message):
    tvs = make_task_vectors(3, 4, 5, [1e-2], seed=0)
    with pytest.raises(ValueError, match=message):
        check_ace_hyperparameters(1e-5, 0.3, 0.3, **options)
    with pytest.raises(ValueError, match=message):
        ace_merge_layer(tvs, 1e-5, **options)
    with pytest.raises(ValueError, match=message):
        ace_merge_layer_stream(lambda t: tvs[t], 3, 1e-5, **options)
    with pytest.raises(ValueError, match=message):
        ACEMerging(eps=1e-5, **options)


def test_heterogeneity_rejects_an_unknown_mode():
    with pytest.raises(ValueError, match="gamma_mode must be one of"):
        heterogeneity([torch.ones(2, 2)], "variance")
