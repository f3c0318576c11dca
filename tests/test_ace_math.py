"""The ACE core against the naive float64 reference, plus edge cases and input errors."""

import math

import pytest
import torch

from fusion_bench_ace import ace_merge_layer, ace_merge_layer_with_info, heterogeneity

from ace_reference import naive_ace, naive_gamma


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """Max absolute difference relative to the largest entry of the reference."""
    scale = b.abs().max().item()
    diff = (a.double() - b.double()).abs().max().item()
    return diff if scale == 0 else diff / scale


def make_task_vectors(T, m, n, scales, seed, dtype=torch.float64, rank=None):
    """Random task vectors: optionally low-rank plus noise, a column-scale profile, task scales."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for t in range(T):
        if rank is None:
            w = torch.randn(m, n, generator=g, dtype=torch.float64)
        else:
            w = torch.randn(m, rank, generator=g, dtype=torch.float64) @ torch.randn(
                rank, n, generator=g, dtype=torch.float64
            ) + 0.1 * torch.randn(m, n, generator=g, dtype=torch.float64)
        columns = torch.rand(n, generator=g, dtype=torch.float64) + 0.2
        out.append((w * columns * scales[t % len(scales)]).to(dtype))
    return out


HOMOGENEOUS = [0.01]
HETEROGENEOUS = [1e-1, 1e-3, 1e-5, 3e-2]

CASES = [
    # (T, m, n, scales, eps, rank)
    (8, 24, 16, HOMOGENEOUS, 1e-5, None),
    (8, 24, 16, HETEROGENEOUS, 1e-5, None),
    (5, 16, 40, HOMOGENEOUS, 1e-3, 4),  # d_out < d_in / 2: the row-Gram association
    (5, 16, 40, HETEROGENEOUS, 4e-2, 4),
    (3, 40, 12, HETEROGENEOUS, 2e-4, None),  # tall
    (20, 10, 10, HETEROGENEOUS, 1e-5, 3),  # T = 20
    (20, 12, 9, HOMOGENEOUS, 1e-5, None),
    (1, 12, 9, HOMOGENEOUS, 1e-5, None),  # T = 1
    (4, 2, 2, HETEROGENEOUS, 1e-5, None),  # tiny: k = int(2 * 0.3) = 0
    (4, 2, 3, HOMOGENEOUS, 1e-5, None),
    (3, 7, 1, HETEROGENEOUS, 1e-5, None),  # d_in = 1
    (3, 1, 7, HETEROGENEOUS, 1e-5, None),  # d_out = 1: averaged
]


@pytest.mark.parametrize("T,m,n,scales,eps,rank", CASES)
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_naive_float64(T, m, n, scales, eps, rank, seed):
    tvs = make_task_vectors(T, m, n, scales, seed, rank=rank)
    expected, expected_het = naive_ace(tvs, eps)
    result = ace_merge_layer_with_info(tvs, eps)
    assert result.heterogeneous == expected_het
    assert result.merged.dtype == torch.float64
    assert result.merged.shape == (m, n)
    assert torch.isfinite(result.merged).all()
    assert rel_diff(result.merged, expected) < 1e-9


@pytest.mark.parametrize("T,m,n,scales,eps,rank", CASES[:7])
def test_float32_close_to_naive_float64(T, m, n, scales, eps, rank):
    tvs64 = make_task_vectors(T, m, n, scales, seed=3, rank=rank)
    expected, _ = naive_ace(tvs64, eps)
    merged = ace_merge_layer([t.float() for t in tvs64], eps)
    assert merged.dtype == torch.float32
    assert rel_diff(merged, expected) < 1e-3


def test_both_branches_are_exercised():
    hom = make_task_vectors(8, 24, 16, HOMOGENEOUS, 0)
    het = make_task_vectors(8, 24, 16, HETEROGENEOUS, 0)
    assert not ace_merge_layer_with_info(hom, 1e-5).heterogeneous
    info = ace_merge_layer_with_info(het, 1e-5)
    assert info.heterogeneous and info.rank_k == int(16 * 0.3)


def test_refinement_changes_heterogeneous_merge():
    tvs = make_task_vectors(6, 20, 20, HETEROGENEOUS, 5)
    refined = ace_merge_layer(tvs, 1e-5, k_frac=0.3)
    unrefined = ace_merge_layer(tvs, 1e-5, k_frac=0.0)
    assert rel_diff(refined, unrefined) > 1e-3
    expected, _ = naive_ace(tvs, 1e-5, k_frac=0.0)
    assert rel_diff(unrefined, expected) < 1e-9


def test_tau_selects_branch():
    tvs = make_task_vectors(6, 12, 10, HETEROGENEOUS, 2)
    gamma = heterogeneity(tvs)
    assert ace_merge_layer_with_info(tvs, 1e-5, tau=gamma * 0.99).heterogeneous
    assert not ace_merge_layer_with_info(tvs, 1e-5, tau=gamma * 1.01).heterogeneous
    expected, het = naive_ace(tvs, 1e-5, tau=gamma * 1.01)
    assert not het
    assert rel_diff(ace_merge_layer(tvs, 1e-5, tau=gamma * 1.01), expected) < 1e-9


def test_stacked_tensor_equals_list():
    tvs = make_task_vectors(4, 9, 7, HETEROGENEOUS, 8)
    assert torch.equal(ace_merge_layer(tvs, 1e-5), ace_merge_layer(torch.stack(tvs), 1e-5))


def test_deterministic():
    tvs = make_task_vectors(6, 30, 20, HETEROGENEOUS, 9, dtype=torch.float32)
    assert torch.equal(ace_merge_layer(tvs, 1e-5), ace_merge_layer(tvs, 1e-5))


# --- heterogeneity -----------------------------------------------------------------------------


def test_gamma_hand_computed():
    # energies 1, e^2, e^4 -> log energies 0, 2, 4: mean 2, unbiased variance 4, gamma = 4 / 2^2
    tvs = [torch.tensor([[1.0]]), torch.tensor([[math.e]]), torch.tensor([[math.e**2]])]
    assert heterogeneity(tvs) == pytest.approx(1.0, rel=1e-6)


def test_gamma_single_task_and_equal_energies():
    g = torch.Generator().manual_seed(0)
    assert heterogeneity([torch.randn(4, 5, generator=g)]) == 0.0
    w = torch.randn(4, 5, generator=g)
    assert heterogeneity([w, -w, 2 * w / 2]) == 0.0
    assert heterogeneity([w, w.flip(0)]) == pytest.approx(0.0, abs=1e-12)  # summation order


def test_gamma_zero_mean_log_energy_is_infinite():
    # energies 1/2 and 2 (exact in binary): log energies -ln 2 and +ln 2, mean 0
    tvs = [torch.tensor([[0.5, 0.5]]), torch.tensor([[1.0, 1.0]])]
    assert heterogeneity(tvs) == math.inf


@pytest.mark.parametrize("scales", [HOMOGENEOUS, HETEROGENEOUS])
def test_gamma_matches_naive(scales):
    tvs = make_task_vectors(7, 8, 6, scales, 4)
    assert heterogeneity(tvs) == pytest.approx(naive_gamma(tvs), rel=1e-12)


# --- degenerate inputs ---------------------------------------------------------------------------


@pytest.mark.parametrize("scales", [HOMOGENEOUS, HETEROGENEOUS])
def test_zero_task_vector_is_left_out(scales):
    tvs = make_task_vectors(5, 12, 10, scales, 6)
    with_zero = tvs[:2] + [torch.zeros(12, 10, dtype=torch.float64)] + tvs[2:]
    merged = ace_merge_layer(with_zero, 1e-5)
    assert torch.isfinite(merged).all()
    assert merged.abs().max() > 0
    assert rel_diff(merged, ace_merge_layer(tvs, 1e-5)) < 1e-12
    assert heterogeneity(with_zero) == heterogeneity(tvs)


def test_all_zero_task_vectors_give_zero():
    merged = ace_merge_layer([torch.zeros(4, 3), torch.zeros(4, 3)], 1e-5)
    assert torch.equal(merged, torch.zeros(4, 3))


def test_single_row_weight_is_averaged():
    tvs = make_task_vectors(3, 1, 7, HETEROGENEOUS, 1)
    info = ace_merge_layer_with_info(tvs, 1e-5)
    assert info.fallback == "average"
    assert torch.allclose(info.merged, sum(tvs) / 3)


def test_identical_rows_in_heterogeneous_branch():
    rows_equal = torch.ones(6, 5, dtype=torch.float64) * torch.arange(1.0, 6.0, dtype=torch.float64)
    tvs = make_task_vectors(3, 6, 5, HETEROGENEOUS, 2) + [rows_equal]
    info = ace_merge_layer_with_info(tvs, 1e-5)
    assert info.heterogeneous and info.tasks_used == 3
    expected, _ = naive_ace(tvs, 1e-5)
    assert rel_diff(info.merged, expected) < 1e-9


def test_rank_deficient_and_tiny_eps_stays_finite():
    # 3 tasks of rank 1 in a 30-dim input space: the Gram sum is singular at float32 precision
    tvs = make_task_vectors(3, 10, 30, HOMOGENEOUS, 3, dtype=torch.float32, rank=1)
    tvs = [t * 1e4 for t in tvs]
    merged = ace_merge_layer(tvs, 1e-12)
    assert torch.isfinite(merged).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_round_trip(dtype):
    tvs = make_task_vectors(4, 16, 12, HETEROGENEOUS[:2], 7, dtype=torch.float32)
    merged = ace_merge_layer([t.to(dtype) for t in tvs], 1e-5)
    assert merged.dtype == dtype
    reference = ace_merge_layer([t.to(dtype).float() for t in tvs], 1e-5)
    assert torch.equal(merged, reference.to(dtype))


# --- input errors --------------------------------------------------------------------------------


def test_nan_and_inf_are_named():
    tvs = [torch.ones(3, 4) for _ in range(3)]
    tvs[1][0, 0] = float("nan")
    tvs[2][1, 1] = float("inf")
    with pytest.raises(
        ValueError, match=r"task vector 1: 1 NaN, 0 Inf; task vector 2: 0 NaN, 1 Inf"
    ):
        ace_merge_layer(tvs, 1e-5)


def test_shape_mismatch_lists_shapes():
    with pytest.raises(ValueError, match=r"0: \(3, 4\), 1: \(3, 5\), 2: \(3, 4\)"):
        ace_merge_layer([torch.ones(3, 4), torch.ones(3, 5), torch.ones(3, 4)], 1e-5)


@pytest.mark.parametrize(
    "bad", [[], [torch.ones(3)], [torch.ones(2, 3, 4)], [torch.ones(2, 2, dtype=torch.int64)]]
)
def test_bad_inputs(bad):
    with pytest.raises(ValueError):
        ace_merge_layer(bad, 1e-5)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"eps": 0.0}, "eps must be"),
        ({"eps": -1.0}, "eps must be"),
        ({"eps": float("nan")}, "eps must be"),
        ({"eps": 1e-5, "tau": -0.1}, "tau must be"),
        ({"eps": 1e-5, "k_frac": 1.5}, "k_frac must lie in"),
        ({"eps": 1e-5, "k_frac": -0.1}, "k_frac must lie in"),
    ],
)
def test_bad_hyperparameters(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ace_merge_layer([torch.ones(3, 4), 2 * torch.ones(3, 4)], **kwargs)


@pytest.mark.parametrize("scales", [[1.0] * 4, [1e-2, 1.0, 3e-1, 1e1]])
def test_float32_rank_deficient_short_layer_matches_float64(scales):
    """T (d_out - 1) < d_in: the summed Gram is singular and only eps regularises it.

    float32 arithmetic there is amplified by ~1/eps (relative error ~0.3 before the fix); such
    layers are computed in float64 and cast back.
    """
    generator = torch.Generator().manual_seed(3)
    task_vectors = torch.stack(
        [s * torch.randn(5, 60, generator=generator, dtype=torch.float64) for s in scales]
    )
    expected, _ = naive_ace(task_vectors, eps=1e-5)
    merged = ace_merge_layer(task_vectors.float(), eps=1e-5)
    assert merged.dtype == torch.float32
    relative = float((merged.double() - expected).norm() / expected.norm())
    assert relative < 1e-5
