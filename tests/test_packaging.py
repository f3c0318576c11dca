"""A built wheel (non-editable install) ships the configs and the Hydra plugin that finds them."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
FUSION_BENCH = str(Path(sys.executable).with_name("fusion_bench"))


@pytest.fixture(scope="module")
def wheel_install(tmp_path_factory):
    pytest.importorskip("hatchling", reason="the test extra installs hatchling to build offline")
    tmp = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
         "-w", str(tmp / "dist"), str(REPO_ROOT)],
        check=True, capture_output=True, text=True,
    )
    (wheel,) = (tmp / "dist").glob("fusion_bench_ace-*.whl")
    target = tmp / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--target",
            str(target),
            str(wheel),
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    return target


def test_wheel_layout(wheel_install):
    assert (wheel_install / "fusion_bench_ace" / "config" / "method" / "ace.yaml").is_file()
    assert (
        wheel_install / "hydra_plugins" / "fusion_bench_ace_searchpath" / "__init__.py"
    ).is_file()
    # hydra_plugins is a namespace package shared with other plugins
    assert not (wheel_install / "hydra_plugins" / "__init__.py").exists()
    # one-off studies stay in the source checkout
    assert (wheel_install / "fusion_bench_ace" / "engine" / "io" / "writer.py").is_file()
    assert not (wheel_install / "fusion_bench_ace" / "studies").exists()


def test_wheel_configs_are_on_the_search_path(wheel_install, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(wheel_install), "HF_HUB_OFFLINE": "1"}
    info = subprocess.run(
        [FUSION_BENCH, "--info", "searchpath"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert f"file://{wheel_install}/fusion_bench_ace/config" in info.stdout
    job = subprocess.run(
        [FUSION_BENCH, "method=ace_gpt2", "--cfg", "job"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert "_target_: fusion_bench_ace.algorithms.ace.ACEMerging" in job.stdout
    assert "eps: 0.04" in job.stdout


def test_wheel_bench_finds_its_settings(wheel_install, tmp_path):
    # a plain (non-editable) install has no repository around it: the settings must come from
    # the configs shipped inside the package, whatever the working directory
    env = {**os.environ, "PYTHONPATH": str(wheel_install)}
    code = (
        "import json, fusion_bench_ace.bench as bench; path, settings = bench.load_settings(); "
        "print(json.dumps({'module': bench.__file__, 'path': str(path), "
        "'modes': list(settings['modes'])}))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert found["module"].startswith(str(wheel_install))
    assert found["path"] == str(
        wheel_install / "fusion_bench_ace" / "config" / "bench" / "ace.yaml"
    )
    assert {"quick", "full", "tiny"} <= set(found["modes"])
