"""The embedded GPT-2 track: text-task generators, a reduced build, FusionBench loads it offline."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fusion_bench_ace.mini import build, track_path
from fusion_bench_ace.mini.text_tasks import TASKS, make_splits, pretraining_corpus

from conftest import assert_same_safetensors, patched_environ

FUSION_BENCH = str(Path(sys.executable).with_name("fusion_bench"))


def run_cli(args, env, cwd):
    return subprocess.run(
        [FUSION_BENCH, *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1", **env},
        timeout=600,
    )


# --- text-task generators -------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(TASKS))
def test_splits_are_deterministic_balanced_and_disjoint(name):
    task = TASKS[name]
    train, test, validation = make_splits(task, 0, 60, 40, 20)
    again = make_splits(task, 0, 60, 40, 20)
    other = make_splits(task, 1, 60, 40, 20)
    assert (train, test, validation) == again
    assert (train, test, validation) != other
    assert len(train) == 60 and len(test) == 40 and len(validation) == 20
    for split in (train, test, validation):
        counts = [sum(e.label == label for e in split) for label in range(task.num_labels)]
        assert max(counts) - min(counts) <= 1
    texts = [{e.text for e in split} for split in (train, test, validation)]
    assert not texts[0] & texts[1] and not texts[0] & texts[2] and not texts[1] & texts[2]
    # adding a validation split leaves train and test as they were
    assert make_splits(task, 0, 60, 40)[:2] == (train, test)


def test_pretraining_corpus_is_deterministic():
    assert pretraining_corpus(0, 50) == pretraining_corpus(0, 50)
    assert pretraining_corpus(0, 50) != pretraining_corpus(1, 50)


# --- build ----------------------------------------------------------------------------------------


def test_reduced_build_is_complete(reduced_gpt2_env):
    with patched_environ(reduced_gpt2_env):
        root = Path(track_path("gpt2"))
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["size"] == "reduced" and manifest["tasks"] == list(TASKS)
    assert (root / "tokenizer" / "vocab.json").is_file()
    assert (root / "pretrained" / "model.safetensors").is_file()
    for task in TASKS:
        assert (root / "experts" / task / "model.safetensors").is_file()
        for split in ("train", "test", "validation"):
            assert (root / "data" / task / split / "dataset_info.json").is_file()
    assert set(json.loads((root / "tasks.json").read_text())) == set(TASKS)


def test_build_is_deterministic(reduced_gpt2_env, tmp_path):
    with patched_environ({**reduced_gpt2_env, "FUSION_BENCH_ACE_CACHE": str(tmp_path)}):
        build(["gpt2"], progress=False)
        second = Path(track_path("gpt2"))
    with patched_environ(reduced_gpt2_env):
        first = Path(track_path("gpt2"))
    assert_same_safetensors(first, second, ["pretrained", *(f"experts/{t}" for t in TASKS)])
    for name in ("vocab.json", "merges.txt"):
        assert (first / "tokenizer" / name).read_bytes() == (
            second / "tokenizer" / name
        ).read_bytes()


# --- through FusionBench --------------------------------------------------------------------------


def test_fusion_bench_pretrained_matches_the_build(reduced_gpt2_env, tmp_path):
    """FusionBench's pool and task pool load the track offline; the pretrained backbone under each
    expert's head scores what the builder measured with the same protocol."""
    result = run_cli(
        [
            "method=dummy",
            "modelpool=ace_mini_gpt2",
            "taskpool=ace_mini_gpt2",
            f"path.log_dir={tmp_path}/dummy",
        ],
        reduced_gpt2_env,
        tmp_path,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((tmp_path / "dummy" / "program_report.json").read_text())
    with patched_environ(reduced_gpt2_env):
        manifest = json.loads((Path(track_path("gpt2")) / "manifest.json").read_text())
    measured = manifest["metrics"]["accuracy"]["pretrained"]
    for task in TASKS:
        assert report[task]["accuracy"] == pytest.approx(measured[task], abs=1e-6)


def test_ace_runs_on_the_built_track(reduced_gpt2_env, tmp_path):
    result = run_cli(
        [
            "method=ace",
            "modelpool=ace_mini_gpt2",
            "taskpool=ace_mini_gpt2",
            f"path.log_dir={tmp_path}/ace",
        ],
        reduced_gpt2_env,
        tmp_path,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((tmp_path / "ace" / "program_report.json").read_text())
    for task in TASKS:
        assert 0.0 <= report[task]["accuracy"] <= 1.0
