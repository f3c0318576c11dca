"""SyMerge (arXiv 2412.19098) math: expert-guided self-labelling, task heads, coefficients.

Pure torch (no FusionBench import). What the authors' code does and what we chose:
``docs/symerge.md``.

SyMerge adapts a merged encoder at test time on unlabelled inputs. It learns layer-wise merging
coefficients ``Λ`` (one per parameter tensor and task; merged tensor
``θ^l = θ_0^l + Σ_k clip(Λ_{l,k}, 0, 1) τ_k^l``) together with one task-specific layer per task,
the task's classification head ``h_k(z) = W_k z/‖z‖ + b_k`` initialised from the expert's
(frozen) head. A batch of task ``k`` is labelled by expert ``k`` (fine-tuned encoder + frozen
head): hard labels ``ŷ = argmax q``, confidence ``c_exp = max q``. The loss is the cross-entropy
of the merged model's logits against ``ŷ`` over the samples kept by the confidence filter: keep a
sample unless the merged model disagrees with the expert *and* is more confident than it
(``losstype: crosspseudoconf`` of the authors' code).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

LOSSES = ("crosspseudoconf", "crosspseudo", "selfentropy")
"""``crosspseudoconf``: CE on expert labels with the confidence filter (SyMerge, the default);
``crosspseudo``: CE on every expert label (the ablation without the filter, "Model Tinting");
``selfentropy``: the merged model's prediction entropy (AdaMerging's objective; an ablation)."""


# --- coefficients ---------------------------------------------------------------------------------


def initial_coefficients(num_models: int, num_tensors: int, init_value: float) -> Tensor:
    """``Λ`` as FusionBench's layer-wise wrapper stores it: ``(num_models, num_tensors)``."""
    if num_models < 1 or num_tensors < 1:
        raise ValueError(f"need at least one model and one tensor; got {num_models}, {num_tensors}")
    if not torch.isfinite(torch.tensor(float(init_value))):
        raise ValueError(f"init_value must be finite; got {init_value!r}")
    return torch.full((num_models, num_tensors), float(init_value))


def effective_coefficients(raw: Tensor, clamp: bool, low: float = 0.0, high: float = 1.0) -> Tensor:
    """The coefficients the merge uses: ``clip(Λ, low, high)`` (zero gradient outside), or ``Λ``."""
    return raw.clamp(low, high) if clamp else raw


# --- self-labelling -------------------------------------------------------------------------------


def expert_pseudo_labels(expert_logits: Tensor) -> Tuple[Tensor, Tensor]:
    """Hard labels and confidences of the expert: ``argmax q`` and ``max q``, ``q = softmax``."""
    confidence, labels = expert_logits.detach().float().softmax(dim=-1).max(dim=-1)
    return labels, confidence


def confidence_filter(
    merged_logits: Tensor, expert_labels: Tensor, expert_confidence: Tensor
) -> Tensor:
    """Samples kept by SyMerge's filter: the merged model agrees with the expert, or the expert
    is at least as confident (dropped: a disagreement where the merged model is more confident)."""
    merged_confidence, merged_labels = merged_logits.detach().float().softmax(dim=-1).max(dim=-1)
    return (merged_labels == expert_labels) | (expert_confidence >= merged_confidence)


@dataclass
class SelfLabellingLoss:
    loss: Optional[Tensor]
    """``None`` when the filter kept no sample (the step is skipped)."""
    kept: int
    total: int
    agreement: float
    """Fraction of the batch where the merged model's argmax equals the expert's."""


def entropy(logits: Tensor) -> Tensor:
    """Mean Shannon entropy of the softmax of ``logits``."""
    log_probs = logits.float().log_softmax(dim=-1)
    return -(log_probs.exp() * log_probs).sum(dim=-1).mean()


def self_labelling_loss(
    merged_logits: Tensor, expert_logits: Tensor, loss: str = "crosspseudoconf"
) -> SelfLabellingLoss:
    """SyMerge's loss of one task's batch (hard labels, no label smoothing, no entropy term)."""
    if loss not in LOSSES:
        raise ValueError(f"unknown loss {loss!r}: expected one of {LOSSES}")
    if merged_logits.shape != expert_logits.shape:
        raise ValueError(
            f"merged logits {tuple(merged_logits.shape)} vs expert {tuple(expert_logits.shape)}"
        )
    labels, confidence = expert_pseudo_labels(expert_logits)
    total = labels.numel()
    agreement = (
        float((merged_logits.detach().argmax(dim=-1) == labels).float().mean()) if total else 0.0
    )
    if loss == "selfentropy":
        return SelfLabellingLoss(entropy(merged_logits), total, total, agreement)
    if loss == "crosspseudoconf":
        keep = confidence_filter(merged_logits, labels, confidence)
    else:
        keep = torch.ones_like(labels, dtype=torch.bool)
    kept = int(keep.sum())
    if kept == 0:
        return SelfLabellingLoss(None, 0, total, agreement)
    value = F.cross_entropy(merged_logits[keep].float(), labels[keep])
    return SelfLabellingLoss(value, kept, total, agreement)


# --- task-specific layer --------------------------------------------------------------------------


class TaskHead(nn.Module):
    """``h(z) = W z/‖z‖ + b``, the task-specific layer (the task's classification head)."""

    def __init__(self, weight: Tensor, bias: Optional[Tensor] = None, normalize: bool = True):
        super().__init__()
        self.weight = nn.Parameter(weight.detach().clone())
        self.bias = nn.Parameter(
            bias.detach().clone()
            if bias is not None
            else torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device)
        )
        self.normalize = normalize

    @classmethod
    def from_zero_shot(cls, class_embeddings: Tensor, logit_scale: float) -> "TaskHead":
        """A head equal to CLIP's zero-shot head: ``logit_scale · E z/‖z‖``, bias 0."""
        return cls(class_embeddings.detach().float() * float(logit_scale))

    def forward(self, features: Tensor) -> Tensor:
        if self.normalize:
            features = features / features.norm(p=2, dim=-1, keepdim=True)
        return F.linear(features, self.weight.to(features.dtype), self.bias.to(features.dtype))


def readout_through_text_head(
    class_embeddings: Tensor, logit_scale: float, atol: float = 1e-4
) -> Tensor:
    """``R`` (C x d) with ``(y R) (s E)^T = y`` for every logit row ``y``.

    A CLIP classifier computes ``s · u E^T`` from a feature ``u``; feeding it ``u = y R`` gives
    back the logits ``y`` of another head. ``R = pinv(s E)^T`` (computed in float64); exact
    when ``E`` (C x d) has full row rank, which is checked.
    """
    scaled = class_embeddings.detach().double() * float(logit_scale)
    readout = torch.linalg.pinv(scaled).T.contiguous()
    identity = readout @ scaled.T
    error = float((identity - torch.eye(identity.shape[0], dtype=identity.dtype)).abs().max())
    if error > atol:
        raise ValueError(
            f"the {scaled.shape[0]} class embeddings (dim {scaled.shape[1]}) are not linearly "
            f"independent (max error {error:.2e}), so another head cannot be read out through "
            "the zero-shot head exactly"
        )
    return readout.to(class_embeddings.dtype)


# --- schedule -------------------------------------------------------------------------------------


def task_schedule(
    tasks: Sequence[str], rounds: int, shuffle: bool, seed: Optional[int]
) -> Iterator[Tuple[int, str]]:
    """``(round, task)`` pairs: each round visits every task once, in a fresh random order."""
    if rounds < 0:
        raise ValueError(f"rounds must be >= 0; got {rounds}")
    rng = random.Random(seed)
    order: List[str] = list(tasks)
    for round_index in range(rounds):
        if shuffle:
            rng.shuffle(order)
        for task in order:
            yield round_index, task
