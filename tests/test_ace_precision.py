"""Precision as a choice: the default float32 path computes each layer once and predicts its own
error; ``precision="float64"`` is the float64 merge; short layers are solved in the row space.

Ill-conditioned layers (fine-tuning updates have fast-decaying spectra, and ε = 1e-5 is tiny next
to their Gram matrices) amplify float32 rounding; the result reports the predicted error, and the
float64 option gives the exact merge of the inputs.
"""

import math

import pytest
import torch

import fusion_bench_ace.methods.ace as ace
from fusion_bench_ace.methods.ace import ace_merge_layer_stream, ace_merge_layer_with_info


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


def random_layer(T, m, n, het, seed):
    g = torch.Generator().manual_seed(seed)
    scales = torch.logspace(-4, -1, T) if het else torch.full((T,), 1e-2)
    return torch.randn(T, m, n, generator=g) * scales.view(-1, 1, 1)


CASES = [  # (T, m, n, tau, k_frac): column space unless T m <= n
    (6, 48, 64, math.inf, 0.3),  # homogeneous
    (6, 48, 64, 0.0, 0.3),  # heterogeneous with refinement
    (5, 96, 40, 0.0, 0.5),  # tall, large k
    (8, 24, 96, math.inf, 0.3),  # wide: the row-Gram association
    (3, 24, 96, math.inf, 0.3),  # T m <= n: the row space
    (3, 24, 96, 0.0, 0.3),
]


def counting_source(stacked):
    calls = [0] * stacked.shape[0]

    def source(t):
        calls[t] += 1
        return stacked[t]

    return source, calls


@pytest.mark.parametrize("T,m,n,tau,k_frac", CASES)
@pytest.mark.parametrize("kind", ["decaying", "random"])
def test_the_default_reads_each_task_twice_and_solves_once(T, m, n, tau, k_frac, kind,
                                                         monkeypatch):
    """One float32 pass, whatever the conditioning: energies, then the sums (no float64 redo)."""
    stacked = (decaying_spectrum_layer(T, m, n, seed=T + m) if kind == "decaying"
               else random_layer(T, m, n, tau == 0.0, seed=T + n))
    finishes = []
    for cls in (ace._ColumnSums, ace._RowSums):
        original = cls.finish

        def recording(self, *args, original=original, **kwargs):
            finishes.append((type(self).__name__, self.dtype))
            return original(self, *args, **kwargs)

        monkeypatch.setattr(cls, "finish", recording)
    source, calls = counting_source(stacked)
    info = ace_merge_layer_stream(source, T, 1e-5, tau=tau, k_frac=k_frac)
    assert calls == [2] * T
    expected = "_RowSums" if T * m <= n else "_ColumnSums"
    assert finishes == [(expected, torch.float32)]
    assert info.compute_dtype == torch.float32 and info.merged.dtype == torch.float32
    assert info.float32_error_estimate is not None and info.float32_error_estimate > 0


@pytest.mark.parametrize("T,m,n,tau,k_frac", CASES)
def test_precision_float64_is_the_float64_merge_of_the_inputs(T, m, n, tau, k_frac):
    stacked = decaying_spectrum_layer(T, m, n, seed=T + m)
    got = ace_merge_layer_with_info(stacked, 1e-5, tau=tau, k_frac=k_frac, precision="float64")
    want = ace_merge_layer_with_info(stacked.double(), 1e-5, tau=tau, k_frac=k_frac)
    assert got.compute_dtype == torch.float64 and got.merged.dtype == torch.float32
    assert got.float32_error_estimate is None
    assert torch.equal(got.merged, want.merged.float())


@pytest.mark.parametrize("T,m,n,tau,k_frac", CASES)
@pytest.mark.parametrize("kind", ["decaying", "random"])
def test_float32_error_estimate_is_at_least_the_error(T, m, n, tau, k_frac, kind):
    stacked = (decaying_spectrum_layer(T, m, n, seed=T + m) if kind == "decaying"
               else random_layer(T, m, n, tau == 0.0, seed=T + n))
    got = ace_merge_layer_with_info(stacked, 1e-5, tau=tau, k_frac=k_frac)
    want = ace_merge_layer_with_info(stacked.double(), 1e-5, tau=tau, k_frac=k_frac).merged
    assert relative(got.merged, want) <= got.float32_error_estimate


@pytest.mark.parametrize("het", [False, True])
@pytest.mark.parametrize("shape", [(96, 96), (48, 192), (192, 48)])
def test_well_conditioned_float32_merges_are_close_to_float64(het, shape):
    stacked = random_layer(8, *shape, het, seed=sum(shape))
    info = ace_merge_layer_with_info(stacked, 1e-5)
    assert info.heterogeneous == het
    want = ace_merge_layer_with_info(stacked.double(), 1e-5).merged
    assert relative(info.merged, want) < 1e-5


@pytest.mark.parametrize("tau", [0.0, math.inf])
def test_short_layers_are_accurate_in_float32_in_the_row_space(tau, monkeypatch):
    """T d_out < d_in (a position embedding, GQA key/value projections with few experts): the
    column system is singular but for ε, where float32 rounding is amplified by ~1/ε; the row
    space never meets those directions."""
    stacked = decaying_spectrum_layer(8, 10, 200, seed=5)
    want = ace_merge_layer_with_info(stacked.double(), 1e-5, tau=tau).merged
    rows = relative(ace_merge_layer_with_info(stacked, 1e-5, tau=tau).merged, want)
    assert rows < 1e-4
    monkeypatch.setattr(ace, "_solves_in_row_space", lambda *shape: False)
    columns = ace_merge_layer_with_info(stacked, 1e-5, tau=tau).merged
    assert relative(columns, want) > 30 * rows  # measured: 1.6e-3 and 3.8e-3 against ~3e-5
    columns_64 = ace_merge_layer_with_info(stacked.double(), 1e-5, tau=tau).merged
    assert relative(columns_64, want) < 1e-8  # the two ways are the same merge


def test_streamed_and_stacked_agree_bit_for_bit():
    for stacked in (decaying_spectrum_layer(6, 48, 64, seed=2),
                    decaying_spectrum_layer(3, 10, 64, seed=2)):
        a = ace.ace_merge_layer_with_info(stacked, 1e-5, tau=0.0)
        b = ace.ace_merge_layer_stream(lambda t: stacked[t], stacked.shape[0], 1e-5, tau=0.0)
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
        # directions named as unreached are left out of λ_min
        known = q[:, -2:]
        without = ace._condition_estimate(spd, factor, known)
        assert 0.5 * eigenvalues[0] / eigenvalues[-3] <= without
        assert without <= eigenvalues[0] / eigenvalues[-3] * (1 + 1e-6)


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
