"""SyMerge: the self-labelling math, and a few steps on the reduced embedded CLIP benchmark."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from fusion_bench_ace.methods.symerge import (
    TaskHead,
    confidence_filter,
    effective_coefficients,
    entropy,
    expert_pseudo_labels,
    initial_coefficients,
    readout_through_text_head,
    self_labelling_loss,
    task_schedule,
)

from conftest import patched_environ

FUSION_BENCH = str(Path(sys.executable).with_name("fusion_bench"))
TASKS = ("shapes", "colors", "position", "sizes", "counting", "orientation", "textures", "digits")


# --- pseudo-labels and the confidence filter ------------------------------------------------------


def test_expert_pseudo_labels_are_argmax_and_max_probability():
    expert = torch.tensor([[0.0, 3.0, 0.0], [2.0, 0.0, 0.0]])
    labels, confidence = expert_pseudo_labels(expert)
    assert labels.tolist() == [1, 0]
    e3, e2 = torch.exp(torch.tensor(3.0)), torch.exp(torch.tensor(2.0))
    assert torch.allclose(confidence, torch.stack([e3 / (e3 + 2), e2 / (e2 + 2)]))


def test_confidence_filter_drops_only_confident_disagreements():
    expert = torch.tensor([[4.0, 0.0], [4.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    merged = torch.tensor([[5.0, 0.0], [0.0, 1.0], [0.0, 1.0], [0.0, 6.0]])
    labels, confidence = expert_pseudo_labels(expert)
    keep = confidence_filter(merged, labels, confidence)
    # agree | disagree, expert surer | disagree, equally sure | disagree, merged surer
    assert keep.tolist() == [True, True, True, False]


def test_loss_is_cross_entropy_on_kept_expert_labels():
    expert = torch.tensor([[4.0, 0.0, 0.0], [0.0, 0.0, 4.0], [1.0, 0.0, 0.0]])
    merged = torch.tensor([[1.0, 2.0, 0.0], [0.0, 0.0, 1.0], [0.0, 9.0, 0.0]], requires_grad=True)
    result = self_labelling_loss(merged, expert, "crosspseudoconf")
    assert (result.kept, result.total) == (2, 3)
    expected = F.cross_entropy(merged[:2], torch.tensor([0, 2]))
    assert torch.allclose(result.loss, expected)
    assert result.agreement == pytest.approx(1 / 3)
    unfiltered = self_labelling_loss(merged, expert, "crosspseudo")
    assert unfiltered.kept == 3
    assert torch.allclose(unfiltered.loss, F.cross_entropy(merged, torch.tensor([0, 2, 0])))
    assert torch.allclose(self_labelling_loss(merged, expert, "selfentropy").loss, entropy(merged))


def test_no_sample_kept_gives_no_loss():
    expert = torch.tensor([[0.1, 0.0]])
    merged = torch.tensor([[0.0, 8.0]])
    result = self_labelling_loss(merged, expert)
    assert result.loss is None and result.kept == 0


# --- coefficients, heads, schedule ----------------------------------------------------------------


def test_coefficients_init_clamp_and_merge():
    raw = initial_coefficients(3, 5, 0.3)
    assert raw.shape == (3, 5) and torch.all(raw == 0.3)
    raw = torch.tensor([-0.5, 0.4, 1.7], requires_grad=True)
    used = effective_coefficients(raw, clamp=True)
    assert used.tolist() == pytest.approx([0.0, 0.4, 1.0])
    used.sum().backward()
    assert raw.grad.tolist() == [0.0, 1.0, 0.0]  # no gradient while outside [0, 1]
    with pytest.raises(ValueError):
        initial_coefficients(2, 2, float("nan"))


def test_zero_shot_head_and_readout_through_the_text_head():
    torch.manual_seed(0)
    embeddings = F.normalize(torch.randn(5, 16), dim=-1)
    head = TaskHead.from_zero_shot(embeddings, 100.0)
    z = torch.randn(7, 16)
    z_hat = F.normalize(z, dim=-1)
    assert torch.allclose(head(z), 100.0 * z_hat @ embeddings.T, atol=1e-4)
    with torch.no_grad():  # a trained head, read out through the frozen text head
        head.weight.add_(torch.randn_like(head.weight))
        head.bias.add_(torch.randn_like(head.bias))
    readout = readout_through_text_head(embeddings, 100.0)
    through = 100.0 * (head(z_hat) @ readout) @ embeddings.T
    assert torch.allclose(through, head(z), atol=1e-3)
    with pytest.raises(ValueError, match="not linearly independent"):
        readout_through_text_head(torch.randn(20, 16), 100.0)


def test_task_schedule_visits_every_task_once_per_round():
    schedule = list(task_schedule(["a", "b", "c"], 4, shuffle=True, seed=1))
    assert len(schedule) == 12
    for r in range(4):
        assert sorted(t for i, t in schedule if i == r) == ["a", "b", "c"]
    assert schedule == list(task_schedule(["a", "b", "c"], 4, shuffle=True, seed=1))


def test_loss_reduces_and_coefficients_stay_finite_on_a_toy_problem():
    """A linear 'encoder' merged from two task vectors plus per-task heads, adapted by the
    self-labelling loss against two linear experts: the loss falls, coefficients stay in [0, 1]."""
    torch.manual_seed(0)
    d, classes, n = 8, 4, 64
    base = torch.randn(d, d) * 0.1
    task_vectors = [torch.randn(d, d), torch.randn(d, d)]
    expert_heads = [F.normalize(torch.randn(classes, d), dim=-1) for _ in range(2)]
    inputs = [torch.randn(n, d) for _ in range(2)]
    raw = initial_coefficients(2, 1, 0.3).requires_grad_(True)
    heads = [TaskHead.from_zero_shot(h, 10.0) for h in expert_heads]
    optimizer = torch.optim.Adam([raw, *[p for h in heads for p in h.parameters()]], lr=1e-2)

    def expert_logits(k):
        features = F.normalize(inputs[k] @ (base + task_vectors[k]).T, dim=-1)
        return 10.0 * features @ expert_heads[k].T

    def losses():
        used = effective_coefficients(raw[:, 0], clamp=True)
        weight = base + sum(c * tv for c, tv in zip(used, task_vectors))  # the layer-wise merge
        return [
            self_labelling_loss(heads[k](inputs[k] @ weight.T), expert_logits(k)) for k in range(2)
        ]

    first = sum(float(r.loss.detach()) for r in losses())
    for step in range(200):
        result = losses()[step % 2]
        if result.loss is None:
            continue
        optimizer.zero_grad()
        result.loss.backward()
        optimizer.step()
        assert torch.isfinite(raw).all()
    last = sum(float(r.loss.detach()) for r in losses())
    assert last < 0.5 * first
    assert torch.all(
        (effective_coefficients(raw, True) >= 0) & (effective_coefficients(raw, True) <= 1)
    )


# --- through the fusion_bench CLI on the reduced benchmark ----------------------------------------


def test_symerge_runs_on_the_reduced_benchmark(reduced_clip_env, tmp_path):
    log_dir, saved = tmp_path / "symerge", tmp_path / "merged"
    result = subprocess.run(
        [
            FUSION_BENCH,
            "--config-name",
            "ace_model_fusion",
            "method=symerge_mini",
            "method.rounds=6",
            "modelpool=ace_mini_clip_tta",
            "taskpool=ace_mini_clip",
            "print_config=false",
            "seed=0",
            f"path.log_dir={log_dir}",
            f"merged_model_save_path={saved}",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "HF_HUB_OFFLINE": "1", **reduced_clip_env},
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "SyMerge test-time adaptation" in result.stderr + result.stdout  # the progress bar

    report = json.loads((log_dir / "program_report.json").read_text())
    assert set(TASKS) <= set(report)
    info = json.loads((log_dir / "symerge_coefficients.json").read_text())
    assert info["tasks"] == list(TASKS)
    losses = info["round_loss"]
    assert len(losses) == 6 and losses[-1] < losses[0]
    values = [v for per_task in info["coefficients"].values() for v in per_task.values()]
    assert values and all(0.0 <= v <= 1.0 for v in values)

    # the saved model: a plain CLIPVisionModel checkpoint plus the task layers; its own per-task
    # logits reproduce the accuracies the task pool measured through FusionBench's per-task hook
    from datasets import load_from_disk
    from transformers import CLIPProcessor, CLIPVisionModel

    from fusion_bench_ace.algorithms.symerge import SyMergeCLIPVisionModel
    from fusion_bench_ace.mini import track_path

    assert isinstance(CLIPVisionModel.from_pretrained(saved), CLIPVisionModel)
    model = SyMergeCLIPVisionModel.from_pretrained(str(saved)).eval()
    assert model.task_names == list(TASKS)
    with patched_environ(reduced_clip_env):
        root = Path(track_path("clip"))
    processor = CLIPProcessor.from_pretrained(root / "clip")
    for task in TASKS:
        data = load_from_disk(str(root / "data" / task))
        pixels = processor(images=list(data["image"]), return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            predictions = model.task_logits(pixels, task).argmax(dim=-1)
        accuracy = (predictions == torch.tensor(data["label"])).float().mean().item()
        assert accuracy == pytest.approx(report[task]["accuracy"], abs=1e-6), task


def test_symerge_needs_test_datasets_in_the_pool():
    from fusion_bench.modelpool import CLIPVisionModelPool

    from fusion_bench_ace.algorithms.symerge import SyMergeAlgorithm

    pool = CLIPVisionModelPool(models={"_pretrained_": "p", "shapes": "s"}, processor="p")
    with pytest.raises(ValueError, match="ace_mini_clip_tta"):
        SyMergeAlgorithm(rounds=1)._check_pool(pool)
    with pytest.raises(ValueError, match="loss"):
        SyMergeAlgorithm(loss="entropy")


def test_symerge_is_deterministic_given_its_seed(reduced_clip_env, tmp_path):
    """No program-level seed: the method's own ``seed`` fixes the task and data order."""
    coefficients = []
    for run in ("a", "b"):
        log_dir = tmp_path / run
        result = subprocess.run(
            [
                FUSION_BENCH,
                "method=symerge_mini",
                "method.rounds=3",
                "modelpool=ace_mini_clip_tta",
                "taskpool=ace_mini_clip",
                "print_config=false",
                f"path.log_dir={log_dir}",
            ],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=600,
            env={**os.environ, "HF_HUB_OFFLINE": "1", **reduced_clip_env},
        )
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        info = json.loads((log_dir / "symerge_coefficients.json").read_text())
        coefficients.append((info["round_loss"], info["coefficients"]))
    assert coefficients[0] == coefficients[1]
