"""The embedded CLIP track: task generators, a reduced build, FusionBench loading it offline."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fusion_bench_ace.mini import NotBuiltError, build, track_path
from fusion_bench_ace.mini.cache import build_atomically, is_built
from fusion_bench_ace.mini.clip import TASK_ORDER
from fusion_bench_ace.mini.vision_tasks import DigitSource, draw_split, vision_tasks

from conftest import assert_same_safetensors, patched_environ

FUSION_BENCH = str(Path(sys.executable).with_name("fusion_bench"))


def run_cli(args, env, cwd):
    result = subprocess.run([FUSION_BENCH, *args], cwd=cwd, capture_output=True, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", **env}, timeout=600)
    return result


# --- task generators ------------------------------------------------------------------------------


@pytest.mark.parametrize("task", TASK_ORDER)
def test_task_splits_are_balanced_and_deterministic(task):
    digits = DigitSource(seed=0)
    images, labels = draw_split(task, 40, 16, 0, "test", digits)
    again, labels_again = draw_split(task, 40, 16, 0, "test", digits)
    other, _ = draw_split(task, 40, 16, 1, "test", digits)
    n_classes = len(vision_tasks()[task].classnames)
    assert images.shape == (40, 16, 16, 3) and images.dtype == np.uint8
    assert np.array_equal(images, again) and np.array_equal(labels, labels_again)
    assert not np.array_equal(images, other)
    counts = np.bincount(labels, minlength=n_classes)
    assert counts.max() - counts.min() <= 1


def test_digit_train_and_test_images_are_disjoint():
    digits = DigitSource(seed=0)
    assert not set(digits.split["train"]) & set(digits.split["test"])


# --- build ----------------------------------------------------------------------------------------


def test_reduced_build_is_complete(reduced_clip_env):
    with patched_environ(reduced_clip_env):
        root = Path(track_path("clip"))
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["size"] == "reduced" and manifest["tasks"] == list(TASK_ORDER)
    for task in TASK_ORDER:
        assert (root / "experts" / task / "model.safetensors").is_file()
        assert (root / "data" / task / "dataset_info.json").is_file()
    assert set(json.loads((root / "tasks.json").read_text())) == set(TASK_ORDER)


def test_build_is_deterministic(reduced_clip_env, tmp_path):
    with patched_environ({**reduced_clip_env, "FUSION_BENCH_ACE_CACHE": str(tmp_path)}):
        build(["clip"], progress=False)
        second = Path(track_path("clip"))
    with patched_environ(reduced_clip_env):
        first = Path(track_path("clip"))
    assert_same_safetensors(first, second, ["pretrained", *(f"experts/{t}" for t in TASK_ORDER)])


def test_interrupted_build_leaves_nothing_that_looks_built(tmp_path):
    target = tmp_path / "clip-v1-reduced-x"

    def failing(out_dir):
        (out_dir / "half.bin").write_bytes(b"x")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build_atomically(target, failing)
    assert not target.exists() and list(tmp_path.iterdir()) == [tmp_path / f".{target.name}.lock"]
    build_atomically(target, lambda out: {"ok": True}, log=lambda _: None)
    assert is_built(target)
    calls = []
    build_atomically(target, lambda out: calls.append(1) or {}, log=lambda _: None)
    assert calls == []  # idempotent


def test_unbuilt_pool_says_how_to_build(tmp_path):
    env = {"FUSION_BENCH_ACE_CACHE": str(tmp_path), "FUSION_BENCH_ACE_MINI_SIZE": "reduced"}
    build_command = "python -m fusion_bench_ace.mini build --track clip --size reduced"
    with patched_environ(env), pytest.raises(NotBuiltError, match=build_command):
        track_path("clip", "experts/shapes")
    result = run_cli(["method=dummy", "modelpool=ace_mini_clip", "taskpool=ace_mini_clip",
                      f"path.log_dir={tmp_path}/log"], env, tmp_path)
    assert result.returncode != 0
    assert "python -m fusion_bench_ace.mini build" in result.stdout + result.stderr


# --- through FusionBench --------------------------------------------------------------------------


def test_fusion_bench_evaluates_the_built_track(reduced_clip_env, tmp_path):
    """FusionBench's own pool and task pool load the track; its pretrained zero-shot accuracy
    equals the one the builder measured with its own preprocessing."""
    result = run_cli(["method=dummy", "modelpool=ace_mini_clip", "taskpool=ace_mini_clip",
                      f"path.log_dir={tmp_path}/dummy"], reduced_clip_env, tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((tmp_path / "dummy" / "program_report.json").read_text())
    with patched_environ(reduced_clip_env):
        manifest = json.loads((Path(track_path("clip")) / "manifest.json").read_text())
    for task in TASK_ORDER:
        assert report[task]["accuracy"] == pytest.approx(manifest["metrics"]["pretrained"][task])


def test_ace_runs_on_the_built_track(reduced_clip_env, tmp_path):
    result = run_cli(["method=ace_vit", "modelpool=ace_mini_clip", "taskpool=ace_mini_clip",
                      f"path.log_dir={tmp_path}/ace"], reduced_clip_env, tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((tmp_path / "ace" / "program_report.json").read_text())
    assert set(TASK_ORDER) <= set(report)
