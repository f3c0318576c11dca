"""The embedded CLIP track: task generators, a reduced build, FusionBench loading it offline."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fusion_bench_ace.mini import NotBuiltError, build, track_path
from fusion_bench_ace.mini.cache import build_atomically, content_hash, is_built, read_manifest
from fusion_bench_ace.mini.clip import TASK_ORDER
from fusion_bench_ace.mini.vision_tasks import DigitSource, draw_captioned, draw_split, vision_tasks

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


def test_digit_splits_are_disjoint():
    digits = DigitSource(seed=0)
    splits = [set(digits.split[name]) for name in ("train", "validation", "test")]
    assert all(splits) and sum(map(len, splits)) == len(set.union(*splits))


def test_captions_name_every_task_concept_and_never_everything():
    """The pretraining mix names each class of every task some of the time."""
    import yaml

    from fusion_bench_ace.paths import config_dir

    full = yaml.safe_load((config_dir() / "mini" / "clip.yaml").read_text())["full"]
    mix = full["pretrain"]["mix"]
    rng = np.random.default_rng(0)
    digits = DigitSource(seed=0)
    drawn = [draw_captioned(rng, 16, digits, mix) for _ in range(4000)]
    assert all(image.shape == (16, 16, 3) and image.dtype == np.uint8 for image, _ in drawn)
    captions = " ".join(caption for _, caption in drawn)
    for task, spec in vision_tasks().items():
        for name in spec.classnames:
            assert f" {name} " in f" {captions} " or f" {name}." in captions, (task, name)
    assert "a object." in captions or "a handwritten digit." in captions  # unnamed scenes too


# --- build ----------------------------------------------------------------------------------------


def test_reduced_build_is_complete(reduced_clip_env):
    with patched_environ(reduced_clip_env):
        root = Path(track_path("clip"))
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["size"] == "reduced" and manifest["tasks"] == list(TASK_ORDER)
    for task in TASK_ORDER:
        assert (root / "experts" / task / "model.safetensors").is_file()
        assert (root / "data" / task / "dataset_info.json").is_file()
        assert (root / "validation" / task / "dataset_info.json").is_file()
    assert len(manifest["content_hash"]) == 64
    assert set(json.loads((root / "tasks.json").read_text())) == set(TASK_ORDER)


def test_build_is_deterministic(reduced_clip_env, tmp_path):
    with patched_environ({**reduced_clip_env, "FUSION_BENCH_ACE_CACHE": str(tmp_path)}):
        build(["clip"], progress=False)
        second = Path(track_path("clip"))
    with patched_environ(reduced_clip_env):
        first = Path(track_path("clip"))
    assert_same_safetensors(first, second, ["pretrained", *(f"experts/{t}" for t in TASK_ORDER)])


# A machine with other vector instructions: ATen's generic kernels, MKL's SSE4.2 path.
OTHER_MACHINE = {"ATEN_CPU_CAPABILITY": "default", "MKL_CBWR": "COMPATIBLE",
                 "MKL_ENABLE_INSTRUCTIONS": "SSE4_2"}


def test_build_is_bit_identical_under_other_instruction_sets(reduced_clip_env, tmp_path):
    """The build pins its instruction sets, so the environment of another machine gives the same
    bytes; without the pinning (the control) the same settings change the weights."""
    with patched_environ({**reduced_clip_env, "FUSION_BENCH_ACE_CACHE": str(tmp_path / "a"),
                          **OTHER_MACHINE}):
        build(["clip"], progress=False)
        other = Path(track_path("clip"))
    with patched_environ(reduced_clip_env):
        first = Path(track_path("clip"))
    assert content_hash(other) == content_hash(first) == read_manifest(first)["content_hash"]

    unpinned = tmp_path / "unpinned"
    subprocess.run([sys.executable, "-m", "fusion_bench_ace.mini", "build-here", "--track", "clip",
                    "--size", "reduced", "--out", str(unpinned), "--report",
                    str(tmp_path / "report.json"), "--quiet"],
                   env={**os.environ, **OTHER_MACHINE, "HF_HUB_OFFLINE": "1"}, check=True,
                   capture_output=True)
    assert content_hash(unpinned) != content_hash(first)


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


def test_regime_statistics_of_the_built_track(reduced_clip_env, tmp_path):
    """``mini stats`` writes the report; its numbers are recomputed here from the files."""
    import torch
    from safetensors.torch import load_file

    env = {**os.environ, **reduced_clip_env, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-m", "fusion_bench_ace.mini", "stats", "--track",
                             "clip", "--out", str(tmp_path)], env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    stats = json.loads((tmp_path / "regime.json").read_text())
    assert "Against the real regime" in (tmp_path / "regime.md").read_text()
    with patched_environ(reduced_clip_env):
        root = Path(track_path("clip"))
        manifest = read_manifest(root)
    assert stats["info"]["content_hash"] == manifest["content_hash"]
    theta = load_file(root / "pretrained" / "model.safetensors")
    tau = {k: v - theta[k] for k, v in load_file(root / "experts/digits/model.safetensors").items()}
    norm = lambda sd: float(torch.cat([v.double().flatten() for v in sd.values()]).norm())  # noqa: E731
    assert stats["geometry"]["relative_norm"]["digits"] == pytest.approx(norm(tau) / norm(theta))
    for task in TASK_ORDER:  # the same test sets and heads as the builder
        assert stats["accuracy"]["zero_shot"][task] == pytest.approx(
            manifest["metrics"]["pretrained"][task])
        assert stats["accuracy"]["expert"][task] == pytest.approx(
            manifest["metrics"]["expert"][task])
    assert {row["target"] for row in stats["targets"]} >= {"simple average: gap closed"}
