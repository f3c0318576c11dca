"""Shared fixtures: the reduced embedded benchmark, built once per test session."""

from pathlib import Path

import pytest
from hypothesis import settings

from fusion_bench_ace.environ import patched_environ  # noqa: F401 (tests import it from here)

# property tests draw the same examples on every run and machine: a red test is reproducible
settings.register_profile("deterministic", derandomize=True, database=None)
settings.load_profile("deterministic")


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "rehearsal: every paper benchmark end to end on stand-ins, every default "
        "method (slow; deselected unless -m selects it, e.g. pytest -m rehearsal)")


def pytest_collection_modifyitems(config, items):
    if config.option.markexpr:  # an explicit -m decides
        return
    kept = [item for item in items if item.get_closest_marker("rehearsal") is None]
    if len(kept) < len(items):
        config.hook.pytest_deselected(items=[i for i in items if i not in kept])
        items[:] = kept


def _reduced_track_env(track, tmp_path_factory):
    """Environment pointing at a fresh session cache holding the reduced ``track`` (built here)."""
    from fusion_bench_ace.mini import build

    env = {
        "FUSION_BENCH_ACE_CACHE": str(tmp_path_factory.mktemp(f"mini_{track}_cache")),
        "FUSION_BENCH_ACE_MINI_SIZE": "reduced",
    }
    with patched_environ(env):
        build([track], progress=False)
    return env


@pytest.fixture(scope="session")
def reduced_clip_env(tmp_path_factory):
    return _reduced_track_env("clip", tmp_path_factory)


@pytest.fixture(scope="session")
def reduced_gpt2_env(tmp_path_factory):
    return _reduced_track_env("gpt2", tmp_path_factory)


@pytest.fixture(scope="session")
def reduced_llm_env(tmp_path_factory):
    return _reduced_track_env("llm", tmp_path_factory)


def assert_same_safetensors(first: Path, second: Path, parts) -> None:
    """Each ``<part>/model.safetensors`` holds bit-identical tensors under both roots."""
    import torch
    from safetensors.torch import load_file

    for part in parts:
        a = load_file(Path(first) / part / "model.safetensors")
        b = load_file(Path(second) / part / "model.safetensors")
        assert a.keys() == b.keys(), part
        assert all(torch.equal(a[k], b[k]) for k in a), part
