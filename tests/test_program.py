"""Our FusionBench program: merge cost recorded, merged models saved atomically, never clobbered."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fusion_bench_ace.program import FusionProgram

from tiny_gpt2 import build_tiny_gpt2_pool

FUSION_BENCH = str(Path(sys.executable).with_name("fusion_bench"))


@pytest.fixture(scope="module")
def tiny_config_dir(tmp_path_factory):
    return build_tiny_gpt2_pool(tmp_path_factory.mktemp("tiny_gpt2"))


def merge(config_dir, log_dir, save_path, *extra):
    return subprocess.run(
        [FUSION_BENCH, "--config-name", "ace_model_fusion", "--config-dir", str(config_dir),
         "method=ace_gpt2", "modelpool=tiny_gpt2_test", "taskpool=tiny_gpt2_test",
         f"path.log_dir={log_dir}", f"merged_model_save_path={save_path}", *extra],
        capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=600,
    )


def test_same_inputs_give_byte_identical_merges_and_no_clobbering(tiny_config_dir, tmp_path):
    first = merge(tiny_config_dir, tmp_path / "log1", tmp_path / "a" / "merged.pt")
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    second = merge(tiny_config_dir, tmp_path / "log2", tmp_path / "b" / "merged.pt")
    assert second.returncode == 0
    original = (tmp_path / "a" / "merged.pt").read_bytes()
    assert original == (tmp_path / "b" / "merged.pt").read_bytes()
    stats = json.loads((tmp_path / "log1" / "merge_stats.json").read_text())
    assert stats["merge_seconds"] > 0 and stats["peak_rss_mib"] > 0

    refused = merge(tiny_config_dir, tmp_path / "log3", tmp_path / "a" / "merged.pt")
    assert refused.returncode != 0
    assert "already exists" in refused.stdout + refused.stderr
    assert not (tmp_path / "log3" / "merge_stats.json").exists()  # refused before merging
    assert (tmp_path / "a" / "merged.pt").read_bytes() == original

    replaced = merge(tiny_config_dir, tmp_path / "log4", tmp_path / "a" / "merged.pt",
                     "overwrite_merged_model=true", "method.eps=1e-3")
    assert replaced.returncode == 0
    assert (tmp_path / "a" / "merged.pt").read_bytes() != original
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["merged.pt"]


class _FailingPool:
    def save_model(self, model, path, **kwargs):
        Path(path).write_bytes(b"half a checkpoint")
        raise KeyboardInterrupt


def _program(save_path, overwrite):
    program = object.__new__(FusionProgram)
    program.merged_model_save_path = str(save_path)
    program.merged_model_save_kwargs = None
    program.overwrite_merged_model = overwrite
    program.modelpool = _FailingPool()
    return program


def test_interrupted_save_leaves_no_partial_checkpoint(tmp_path):
    target = tmp_path / "merged.pt"
    with pytest.raises(KeyboardInterrupt):
        _program(target, overwrite=False).save_merged_model(object())
    assert list(tmp_path.iterdir()) == []


def test_interrupted_overwrite_keeps_the_previous_checkpoint(tmp_path):
    target = tmp_path / "merged.pt"
    target.write_bytes(b"the previous merge")
    with pytest.raises(KeyboardInterrupt):
        _program(target, overwrite=True).save_merged_model(object())
    assert target.read_bytes() == b"the previous merge"
    assert list(tmp_path.iterdir()) == [target]
