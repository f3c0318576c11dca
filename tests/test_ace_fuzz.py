"""Property test: thousands of random, degenerate and badly scaled layers never give NaN/Inf."""

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fusion_bench_ace import ace_merge_layer_with_info

# float16 cannot hold 1e-8 (it flushes to zero, which the merge handles as a zero task) nor much
# above 6e4; its magnitudes stay inside its normal range so the test exercises the merge, not
# the dtype's limits.
MAGNITUDES = {
    torch.float64: (-8.0, 4.0),
    torch.float32: (-8.0, 4.0),
    torch.bfloat16: (-8.0, 4.0),
    torch.float16: (-3.0, 2.0),
}


KINDS = ["dense", "rank1", "zero", "equal_rows", "sparse", "copy"]


def task_vector_of_kind(kind, d_out, d_in, g, previous=None):
    """A float64 ``d_out x d_in`` task vector of a (degenerate) kind, before its scale."""
    if kind == "zero":
        return torch.zeros(d_out, d_in, dtype=torch.float64)
    if kind == "rank1":
        return torch.randn(d_out, 1, generator=g, dtype=torch.float64) @ torch.randn(
            1, d_in, generator=g, dtype=torch.float64)
    if kind == "equal_rows":
        return torch.randn(1, d_in, generator=g, dtype=torch.float64).expand(d_out, d_in).clone()
    if kind == "sparse":
        w = torch.randn(d_out, d_in, generator=g, dtype=torch.float64)
        return w * (torch.rand(d_out, d_in, generator=g, dtype=torch.float64) < 0.2)
    if kind == "copy" and previous is not None:
        return previous.to(torch.float64) / max(previous.abs().max().item(), 1e-300)
    return torch.randn(d_out, d_in, generator=g, dtype=torch.float64)


@st.composite
def layers(draw):
    dtype = draw(st.sampled_from(list(MAGNITUDES)))
    d_out = draw(st.integers(1, 12))
    d_in = draw(st.integers(1, 12))
    tasks = draw(st.integers(1, 6))
    seed = draw(st.integers(0, 2**31 - 1))
    low, high = MAGNITUDES[dtype]
    g = torch.Generator().manual_seed(seed)
    task_vectors = []
    for _ in range(tasks):
        kind = draw(st.sampled_from(KINDS))
        scale = 10.0 ** draw(st.floats(low, high))
        w = task_vector_of_kind(kind, d_out, d_in, g, task_vectors[-1] if task_vectors else None)
        task_vectors.append((w * scale).to(dtype))
    eps = 10.0 ** draw(st.floats(-12.0, 0.0))
    tau = draw(st.sampled_from([0.0, 0.3, 1.0, math.inf]))
    k_frac = draw(st.floats(0.0, 1.0))
    return task_vectors, eps, tau, k_frac


@settings(max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(layers())
def test_random_layers_never_give_nan_or_inf(case):
    task_vectors, eps, tau, k_frac = case
    try:
        result = ace_merge_layer_with_info(task_vectors, eps, tau, k_frac)
    except ValueError as error:
        # the one allowed refusal: a finite merge too large for a half-precision input dtype
        assert task_vectors[0].dtype == torch.float16 and "does not fit in" in str(error)
        return
    merged = result.merged
    assert merged.shape == task_vectors[0].shape
    assert merged.dtype == task_vectors[0].dtype
    assert torch.isfinite(merged).all(), (result.gamma, result.heterogeneous, result.fallback)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_ill_conditioned_layer(dtype):
    # columns scaled over 12 decades: the Gram matrix's condition number is ~1e24
    g = torch.Generator().manual_seed(0)
    columns = 10.0 ** torch.linspace(-8, 4, 16, dtype=torch.float64)
    task_vectors = [
        (torch.randn(24, 16, generator=g, dtype=torch.float64) * columns).to(dtype)
        for _ in range(5)
    ]
    for eps in (1e-12, 1e-5, 1.0):
        for tau in (0.0, math.inf):
            merged = ace_merge_layer_with_info(task_vectors, eps, tau).merged
            assert torch.isfinite(merged).all()
