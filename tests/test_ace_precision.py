"""float32 ACE merges land within 1e-5 of the float64 merge of the same inputs.

Ill-conditioned layers (fine-tuning updates have fast-decaying spectra, and ε = 1e-5 is tiny next
to their Gram matrices) amplify float32 rounding past that; the core predicts it from the
system's condition number and the refinement's sensitivity and merges such layers in float64.
Well-conditioned layers stay float32 (one pass, no extra cost).
"""

import math

import pytest
import torch

import fusion_bench_ace.methods.ace as ace
from fusion_bench_ace.methods.ace import ace_merge_layer_with_info


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.norm(a.double() - b.double()) / torch.linalg.norm(b.double()))


def decaying_spectrum_layer(T, m, n, seed, power=2.0):
    """Task vectors like fine-tuning updates: singular values decaying as i^-power."""
    g = torch.Generator().manual_seed(seed)
    r = min(m, n)
    out = []
    for _ in range(T):
        jitter = 1.0 + torch.rand(r, generator=g, dtype=torch.float64)  # distinct spectra
        values = (jitter * torch.arange(1, r + 1, dtype=torch.float64) ** -power).sort().values
        u, _ = torch.linalg.qr(torch.randn(m, r, generator=g, dtype=torch.float64))
        v, _ = torch.linalg.qr(torch.randn(n, r, generator=g, dtype=torch.float64))
        out.append((u * values.flip(0)) @ v.T)
    return torch.stack(out).float()


@pytest.fixture
def float32_only(monkeypatch):
    """The float32 path with its precision check switched off (what the core did before)."""
    monkeypatch.setattr(ace, "_FLOAT32_TARGET", math.inf)


CASES = [  # (T, m, n, tau, k_frac)
    (6, 48, 64, math.inf, 0.3),  # homogeneous
    (6, 48, 64, 0.0, 0.3),  # heterogeneous with refinement
    (5, 96, 40, 0.0, 0.5),  # tall, large k
    (8, 24, 96, math.inf, 0.3),  # wide: the row-Gram association
]


@pytest.mark.parametrize("T,m,n,tau,k_frac", CASES)
def test_ill_conditioned_float32_merge_matches_float64(T, m, n, tau, k_frac, monkeypatch):
    stacked = decaying_spectrum_layer(T, m, n, seed=T + m)
    want = ace_merge_layer_with_info(stacked.double(), 1e-5, tau=tau, k_frac=k_frac).merged
    got = ace_merge_layer_with_info(stacked, 1e-5, tau=tau, k_frac=k_frac).merged
    assert got.dtype == torch.float32
    assert relative(got, want) < 1e-5
    # the layer is hard: float32 sums alone miss the target by far
    monkeypatch.setattr(ace, "_FLOAT32_TARGET", math.inf)
    plain = ace_merge_layer_with_info(stacked, 1e-5, tau=tau, k_frac=k_frac).merged
    assert relative(plain, want) > 1e-4, relative(plain, want)


def count_accumulators(monkeypatch):
    dtypes = []
    original = ace._Accumulator.__init__

    def recording(self, m, n, dtype, *args, **kwargs):
        dtypes.append(dtype)
        original(self, m, n, dtype, *args, **kwargs)

    monkeypatch.setattr(ace._Accumulator, "__init__", recording)
    return dtypes


@pytest.mark.parametrize("het", [False, True])
@pytest.mark.parametrize("shape", [(96, 96), (48, 192), (192, 48)])
def test_well_conditioned_layers_stay_float32(het, shape, monkeypatch):
    g = torch.Generator().manual_seed(sum(shape))
    scales = torch.logspace(-4, -1, 8) if het else torch.full((8,), 1e-2)
    stacked = torch.randn(8, *shape, generator=g) * scales.view(-1, 1, 1)
    dtypes = count_accumulators(monkeypatch)
    info = ace_merge_layer_with_info(stacked, 1e-5)
    assert info.heterogeneous == het
    assert dtypes == [torch.float32]  # one pass, no float64 redo
    assert info.compute_dtype == torch.float32
    want = ace_merge_layer_with_info(stacked.double(), 1e-5).merged
    assert relative(info.merged, want) < 1e-5


def test_ill_conditioned_layers_are_redone_in_float64(monkeypatch):
    stacked = decaying_spectrum_layer(6, 48, 64, seed=1)
    dtypes = count_accumulators(monkeypatch)
    info = ace_merge_layer_with_info(stacked, 1e-5)
    assert dtypes == [torch.float32, torch.float64]
    assert info.compute_dtype == torch.float64 and info.merged.dtype == torch.float32
    dtypes.clear()
    ace_merge_layer_with_info(stacked.double(), 1e-5)  # float64 inputs: one float64 pass
    assert dtypes == [torch.float64]


@pytest.mark.parametrize("tau", [0.0, math.inf])
def test_a_redone_layer_is_the_float64_merge_cast(tau):
    stacked = decaying_spectrum_layer(6, 48, 64, seed=3)
    got = ace_merge_layer_with_info(stacked, 1e-5, tau=tau).merged
    want = ace_merge_layer_with_info(stacked.double(), 1e-5, tau=tau).merged
    assert torch.equal(got, want.float())


def test_streamed_and_stacked_agree_bit_for_bit_when_redone():
    stacked = decaying_spectrum_layer(6, 48, 64, seed=2)
    a = ace.ace_merge_layer_with_info(stacked, 1e-5, tau=0.0)
    b = ace.ace_merge_layer_stream(lambda t: stacked[t], 6, 1e-5, tau=0.0)
    assert torch.equal(a.merged, b.merged)


@pytest.mark.parametrize("n", [8, 40])
def test_condition_estimate_is_a_close_lower_bound(n):
    g = torch.Generator().manual_seed(n)
    for decades in (1, 4, 7):
        q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
        eigenvalues = 10.0 ** torch.linspace(0, -decades, n, dtype=torch.float64)
        spd = (q * eigenvalues) @ q.T
        factor = torch.linalg.cholesky(spd)
        estimate = ace._condition_estimate(spd, factor)
        assert 0.5 * 10**decades <= estimate <= 10**decades * (1 + 1e-9)


@pytest.mark.parametrize("m,n,k", [(12, 12, 4), (20, 9, 3), (9, 20, 5)])
def test_refinement_amplification_matches_random_perturbations(m, n, k):
    """The first-order formula against ‖R(F + E) - R(F)‖ / ‖E‖ for small random E."""
    g = torch.Generator().manual_seed(m * n + k)
    fused = torch.randn(m, n, generator=g, dtype=torch.float64)

    def refine(f):
        u, s, vh = torch.linalg.svd(f, full_matrices=False)
        return s[:k].mean() * (u[:, :k] @ vh[:k])

    base = refine(fused)
    ratios = []
    for _ in range(200):
        e = torch.randn(m, n, generator=g, dtype=torch.float64) * 1e-7
        ratios.append(float(torch.linalg.norm(refine(fused + e) - base) / torch.linalg.norm(e)))
    measured = math.sqrt(sum(r * r for r in ratios) / len(ratios))
    predicted = ace._refinement_amplification(torch.linalg.svdvals(fused), k, m, n)
    assert 0.5 * measured < predicted < 2.0 * measured
