"""Shared fixtures: the reduced embedded benchmark, built once per test session."""

import contextlib
import os

import pytest


@contextlib.contextmanager
def patched_environ(values):
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, old in saved.items():
            if old is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = old


@pytest.fixture(scope="session")
def reduced_clip_env(tmp_path_factory):
    """Environment pointing at a session cache holding the reduced CLIP track (built here)."""
    from fusion_bench_ace.mini import build

    env = {
        "FUSION_BENCH_ACE_CACHE": str(tmp_path_factory.mktemp("mini_cache")),
        "FUSION_BENCH_ACE_MINI_SIZE": "reduced",
    }
    with patched_environ(env):
        build(["clip"], progress=False)
    return env


@pytest.fixture(scope="session")
def reduced_gpt2_env(tmp_path_factory):
    """Environment pointing at a session cache holding the reduced GPT-2 track (built here)."""
    from fusion_bench_ace.mini import build

    env = {
        "FUSION_BENCH_ACE_CACHE": str(tmp_path_factory.mktemp("mini_gpt2_cache")),
        "FUSION_BENCH_ACE_MINI_SIZE": "reduced",
    }
    with patched_environ(env):
        build(["gpt2"], progress=False)
    return env
