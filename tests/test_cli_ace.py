"""End to end through the real ``fusion_bench`` CLI on a tiny random GPT-2 pool (no download)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import GPT2Model

from fusion_bench_ace import ace_merge_layer

from tiny_gpt2 import TASKS, build_tiny_gpt2_pool

REPO_ROOT = Path(__file__).resolve().parents[1]
FUSION_BENCH = str(Path(sys.executable).with_name("fusion_bench"))
OFFLINE = {
    **os.environ,
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
}


@pytest.fixture(scope="module")
def tiny_pool(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_gpt2")
    return root, build_tiny_gpt2_pool(root)


def run_cli(args, cwd, timeout=600):
    result = subprocess.run(
        [FUSION_BENCH, *args], cwd=cwd, env=OFFLINE, capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return result


def expected_ace_gpt2_backbone(root: Path, eps: float, **options) -> dict:
    """The merge computed directly with the core function, as the method config describes it."""
    pretrained = GPT2Model.from_pretrained(root / "pretrained").state_dict()
    experts = [GPT2Model.from_pretrained(root / task).state_dict() for task in TASKS]
    expected = {}
    for name, base in pretrained.items():
        task_vectors = torch.stack([e[name] - base for e in experts])
        if base.dim() == 2:
            merged = ace_merge_layer(task_vectors, eps=eps, tau=0.3, k_frac=0.3, **options)
        else:
            merged = task_vectors.mean(dim=0)
        expected[name] = base + merged
    return expected


def test_ace_cli_merges_and_evaluates(tiny_pool, tmp_path):
    root, config_dir = tiny_pool
    out = tmp_path / "out"
    run_cli(
        [
            "--config-dir",
            str(config_dir),
            "method=ace_gpt2",
            "modelpool=tiny_gpt2_test",
            "taskpool=tiny_gpt2_test",
            f"merged_model_save_path={out}/merged.pt",
            f"path.log_dir={out}/logs",
        ],
        cwd=tmp_path,
    )
    report = json.loads((out / "logs" / "program_report.json").read_text())
    for task in TASKS:
        assert 0.0 <= report[task]["accuracy"] <= 1.0
    merged = torch.load(out / "merged.pt")
    expected = expected_ace_gpt2_backbone(root, eps=4e-2)
    assert merged.keys() == expected.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(merged[name], tensor, rtol=1e-5, atol=1e-6, msg=name)
    diagnostics = json.loads((out / "logs" / "ace_diagnostics.json").read_text())
    assert diagnostics["eps"] == 4e-2
    assert any(layer["heterogeneous"] for layer in diagnostics["layers"])


def test_ace_cli_relative_eps_and_scale_free_gamma(tiny_pool, tmp_path):
    root, config_dir = tiny_pool
    out = tmp_path / "out"
    run_cli(
        [
            "--config-dir", str(config_dir),
            "method=ace_gpt2", "modelpool=tiny_gpt2_test", "taskpool=tiny_gpt2_test",
            "method.eps_mode=relative", "method.eps_rel=0.05",
            "method.gamma_mode=scale_free", "method.tau_scale_free=0.5",
            f"merged_model_save_path={out}/merged.pt", f"path.log_dir={out}/logs",
        ],
        cwd=tmp_path,
    )
    merged = torch.load(out / "merged.pt")
    options = {"eps_mode": "relative", "eps_rel": 0.05, "gamma_mode": "scale_free",
               "tau_scale_free": 0.5}
    expected = expected_ace_gpt2_backbone(root, eps=4e-2, **options)
    assert merged.keys() == expected.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(merged[name], tensor, rtol=1e-5, atol=1e-6, msg=name)
    diagnostics = json.loads((out / "logs" / "ace_diagnostics.json").read_text())
    assert {k: diagnostics[k] for k in options} == options
    layers = diagnostics["layers"]
    assert all(row["heterogeneous"] == (row["gamma"] > 0.5) for row in layers)
    assert len({row["eps"] for row in layers}) > 1  # the ridge follows each layer's scale


def test_ace_cli_from_repository_root(tiny_pool, tmp_path):
    """FusionBench takes $CWD/config as its primary config dir; ours must not break the run."""
    assert (REPO_ROOT / "config").is_dir()
    _, config_dir = tiny_pool
    result = run_cli(
        [
            "--config-dir",
            str(config_dir),
            "method=ace",
            "modelpool=tiny_gpt2_test",
            "taskpool=tiny_gpt2_test",
            f"path.log_dir={tmp_path}/logs",
        ],
        cwd=REPO_ROOT,
    )
    assert "fusion_bench_ace.algorithms.ace.ACEMerging" in result.stdout
    assert (tmp_path / "logs" / "program_report.json").exists()


def test_ace_multirun_sweep_keeps_every_report(tiny_pool, tmp_path):
    _, config_dir = tiny_pool
    sweep_dir = tmp_path / "sweep"
    run_cli(
        [
            "-m",
            "--config-dir",
            str(config_dir),
            "method=ace_gpt2",
            "method.eps=1e-5,1e-2",
            "modelpool=tiny_gpt2_test",
            "taskpool=tiny_gpt2_test",
            f"hydra.sweep.dir={sweep_dir}",
            "path.log_dir=${hydra:runtime.output_dir}",
        ],
        cwd=tmp_path,
    )
    reports = sorted(sweep_dir.glob("*/program_report.json"))
    assert len(reports) == 2
    eps_seen = sorted(
        json.loads((r.parent / "ace_diagnostics.json").read_text())["eps"] for r in reports
    )
    assert eps_seen == [1e-5, 1e-2]


@pytest.mark.parametrize(
    "override, message",
    [
        ("method=acee", "Could not find 'method/acee'"),
        ("method.epss=1", "Could not override 'method.epss'"),
        ("+method.epss=1", "unexpected keyword argument 'epss'"),
        ("method.k_frac=1.5", "k_frac must lie in [0, 1]"),
        ("method.eps_mode=relativ", "eps_mode must be one of absolute, relative"),
        ("method.eps_rel=0", "eps_rel must be a finite number > 0"),
        ("method.gamma_mode=scalefree", "gamma_mode must be one of paper, scale_free"),
    ],
)
def test_bad_names_and_values_fail_clearly_through_the_cli(tiny_pool, tmp_path, override, message):
    _, config_dir = tiny_pool
    args = [
        "--config-dir",
        str(config_dir),
        "method=ace_gpt2",
        "modelpool=tiny_gpt2_test",
        "taskpool=tiny_gpt2_test",
        f"path.log_dir={tmp_path}/logs",
        override,
    ]
    result = subprocess.run(
        [FUSION_BENCH, *args],
        cwd=tmp_path,
        env=OFFLINE,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode != 0
    assert message in result.stdout + result.stderr
    assert not (tmp_path / "logs" / "program_report.json").exists()
