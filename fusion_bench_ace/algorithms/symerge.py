"""SyMerge (arXiv 2412.19098) as a FusionBench algorithm, for CLIP vision pools.

    fusion_bench method=symerge modelpool=<pool with test_datasets> taskpool=<CLIP task pool>
    fusion_bench method=symerge_mini modelpool=ace_mini_clip_tta taskpool=ace_mini_clip

Test-time adaptation on the pool's *unlabelled* test inputs (``test_datasets`` of the model pool,
labels never read), as FusionBench's AdaMerging does. Built from FusionBench's own machinery:

- the merged encoder is FusionBench's ``LayerWiseMergedModel`` (one coefficient per parameter
  tensor and expert, clamped to [0, 1] in the forward pass, pretrained weight fixed at 1);
- data, zero-shot heads and expert logits come from ``CLIPClassificationMixin`` (the mixin
  AdaMerging's CLIP variant uses): shuffled infinite test loaders, the heads built from class-name
  prompts through the CLIP text tower, ``compute_logits`` for the experts;
- Lightning Fabric (``LightningFabricMixin``) places modules and data and runs ``backward``, so
  ``fabric.precision=16-mixed`` gives the paper's fp16 autocast with a gradient scaler.

What SyMerge adds (the math is in :mod:`fusion_bench_ace.methods.symerge`): one trainable copy of
each expert's classification head (the task-specific layer), optimised jointly with the coefficients
by Adam on the expert-guided self-labelling loss, one task per step, tasks shuffled every round.

The result is a :class:`SyMergeCLIPVisionModel`: the merged ``CLIPVisionModel`` plus the trained
heads. FusionBench's ``CLIPVisionModelTaskPool`` evaluates it task by task through the per-task
hook its classifier offers (``is_surgery_model`` / ``compute_surgery_features(features,
dataset_name)``, the hook Representation Surgery uses): given the task name, the wrapper turns the
normalised image embedding into the feature whose zero-shot logits equal the trained head's logits.
The coefficients are written to ``symerge_coefficients.json`` beside the report.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence

import torch
from fusion_bench import BaseAlgorithm, BaseModelPool
from fusion_bench.mixins import CLIPClassificationMixin, SimpleProfilerMixin, auto_register_config
from fusion_bench.models.wrappers.layer_wise_fusion import LayerWiseMergedModel
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from tqdm.auto import tqdm
from transformers import CLIPModel, CLIPVisionModel

from ..methods.symerge import (
    LOSSES,
    TaskHead,
    effective_coefficients,
    initial_coefficients,
    readout_through_text_head,
    self_labelling_loss,
    task_schedule,
)
from .common import write_json_beside_report

log = logging.getLogger(__name__)

TASK_SPECIFIC_LAYERS = ("classification_head",)
"""The paper's main setting (``classifier_train: true``). Fig. 5's other single layers are not
implemented: which one to use outside the head is not specified."""

TASK_LAYERS_FILE = "symerge_task_layers.safetensors"
TASK_LAYERS_INDEX = "symerge_task_layers.json"


class SyMergeCLIPVisionModel(nn.Module):
    """A merged CLIP vision encoder with one trained classification head per task.

    - ``forward`` is the merged ``CLIPVisionModel`` (the encoder is shared by all tasks);
    - ``task_logits(pixel_values, task)``: the task's logits ``W_k ẑ + b_k``, ``ẑ`` the normalised
      projected image embedding;
    - ``compute_surgery_features(image_embeds, dataset_name)``: FusionBench's per-task hook
      (``is_surgery_model``). ``HFCLIPClassifier`` calls it with the normalised embedding and the
      task name, then computes ``s · u E_k^T`` with its zero-shot class embeddings ``E_k``; the
      hook returns ``u = (W_k ẑ + b_k) R_k`` with ``R_k = pinv(s E_k)^T``, so the task pool's
      logits are the trained head's (exactly, up to rounding, when the task pool builds ``E_k``
      from the same CLIP model; checked at construction that ``E_k`` has full row rank).

    Saved by ``save_pretrained(path)`` as the merged encoder's own ``save_pretrained`` output (a
    plain ``CLIPVisionModel`` checkpoint that any CLIP loader reads) plus
    ``symerge_task_layers.safetensors`` (per task ``<task>.weight``, ``<task>.bias``,
    ``<task>.readout``; and ``visual_projection.weight``) and ``symerge_task_layers.json`` (task
    order, logit scale). ``SyMergeCLIPVisionModel.from_pretrained(path)`` loads both back.
    """

    is_surgery_model = True

    def __init__(
        self,
        encoder: CLIPVisionModel,
        visual_projection: nn.Linear,
        heads: Mapping[str, TaskHead],
        readouts: Mapping[str, Tensor],
        logit_scale: float,
    ):
        super().__init__()
        if set(heads) != set(readouts):
            raise ValueError(f"heads for {sorted(heads)} but readouts for {sorted(readouts)}")
        self.encoder = encoder
        self.visual_projection = visual_projection
        self.heads = nn.ModuleDict(dict(heads))
        for task, readout in readouts.items():
            self.heads[task].register_buffer("readout", readout.detach().clone())
        self.logit_scale = float(logit_scale)

    @property
    def task_names(self) -> List[str]:
        return list(self.heads)

    def forward(self, *args, **kwargs):
        return self.encoder(*args, **kwargs)

    def _head(self, task: Optional[str]) -> TaskHead:
        if task not in self.heads:
            raise KeyError(
                f"no task-specific layer for task {task!r}; this model has {self.task_names}"
            )
        return self.heads[task]

    def task_logits(self, pixel_values: Tensor, task: str) -> Tensor:
        pooled = self.encoder(pixel_values)[1]
        return self._head(task)(self.visual_projection(pooled))

    def compute_surgery_features(self, image_embeds: Tensor, dataset_name: Optional[str] = None):
        head = self._head(dataset_name)
        logits = head(image_embeds)
        # (features, ...) as Representation Surgery's wrapper returns them to HFCLIPClassifier
        return logits @ head.readout.to(logits.dtype), None, None

    # --- saving -----------------------------------------------------------------------------------

    def save_pretrained(self, save_directory: str, **kwargs) -> None:
        os.makedirs(save_directory, exist_ok=True)
        self.encoder.save_pretrained(save_directory, **kwargs)
        tensors = {"visual_projection.weight": self.visual_projection.weight}
        for task, head in self.heads.items():
            tensors.update(
                {
                    f"{task}.weight": head.weight,
                    f"{task}.bias": head.bias,
                    f"{task}.readout": head.readout,
                }
            )
        save_file(
            {k: v.detach().cpu().contiguous() for k, v in tensors.items()},
            os.path.join(save_directory, TASK_LAYERS_FILE),
        )
        index = {
            "tasks": self.task_names,
            "logit_scale": self.logit_scale,
            "task_specific_layer": "classification_head",
            "head": "weight @ (z / |z|) + bias",
        }
        Path(save_directory, TASK_LAYERS_INDEX).write_text(json.dumps(index, indent=1))

    @classmethod
    def from_pretrained(cls, path: str) -> "SyMergeCLIPVisionModel":
        encoder = CLIPVisionModel.from_pretrained(path)
        index = json.loads(Path(path, TASK_LAYERS_INDEX).read_text())
        tensors = load_file(os.path.join(path, TASK_LAYERS_FILE))
        projection = tensors["visual_projection.weight"]
        visual_projection = nn.Linear(projection.shape[1], projection.shape[0], bias=False)
        visual_projection.weight.data.copy_(projection)
        visual_projection.requires_grad_(False)
        heads = {t: TaskHead(tensors[f"{t}.weight"], tensors[f"{t}.bias"]) for t in index["tasks"]}
        readouts = {t: tensors[f"{t}.readout"] for t in index["tasks"]}
        return cls(encoder, visual_projection, heads, readouts, index["logit_scale"])


class _SyMergeTrainable(nn.Module):
    """What the optimiser sees: the layer-wise merged encoder and the trainable heads."""

    def __init__(
        self, merged: LayerWiseMergedModel, visual_projection: nn.Module, heads: nn.ModuleDict
    ):
        super().__init__()
        self.merged = merged
        self.visual_projection = visual_projection
        self.heads = heads

    def forward(self, images: Tensor, task: str) -> Tensor:
        self.merged.merge_weights()  # θ from the current (clamped) Λ, with its graph
        pooled = self.merged(images)[1]
        return self.heads[task](self.visual_projection(pooled))


@auto_register_config
class SyMergeAlgorithm(CLIPClassificationMixin, SimpleProfilerMixin, BaseAlgorithm):
    """SyMerge: layer-wise coefficients + one task-specific head per task, adapted at test time.

    Args:
        rounds: outer rounds; each visits every task once (one Adam step per task), so the run
            takes ``rounds x num_tasks`` steps (paper: 500 rounds).
        batch_size: unlabelled test images per step (paper: 32).
        lr, betas, weight_decay: Adam, one parameter group, no schedule (paper: 1e-2 with the heads
            trained, 1e-3 when only the coefficients are; (0.9, 0.999); 0).
        init_value: initial value of every coefficient (paper: 0.3).
        clamp_weights: clamp the coefficients to [0, 1] in the forward pass (paper: yes).
        task_specific_layer: ``classification_head`` (the paper's main setting).
        train_heads: train the task-specific layers (``false``: coefficients only, an ablation).
        loss: ``crosspseudoconf`` (SyMerge), ``crosspseudo`` or ``selfentropy`` (ablations).
        shuffle_tasks: shuffle the task order every round (paper: yes).
        seed: seed of the task order and the data order (``None``: the program's ``seed``).
        num_workers: data loader workers.
        zero_shot_clip_model: the full CLIP model whose text tower builds the zero-shot heads, i.e.
            the experts' frozen heads (the task pool's ``base_model``); ``null``: the pool's
            ``_pretrained_`` model, FusionBench's default.
        tie_weights, strict: passed to ``functional_call`` by FusionBench's layer-wise wrapper.
        coefficients_file: JSON written beside the report (coefficients and the loss curve).
    """

    def __init__(
        self,
        rounds: int = 500,
        batch_size: int = 32,
        lr: float = 1e-2,
        betas: Sequence[float] = (0.9, 0.999),
        weight_decay: float = 0.0,
        init_value: float = 0.3,
        clamp_weights: bool = True,
        task_specific_layer: str = "classification_head",
        train_heads: bool = True,
        loss: str = "crosspseudoconf",
        shuffle_tasks: bool = True,
        seed: Optional[int] = 0,
        num_workers: int = 0,
        zero_shot_clip_model: Optional[str] = None,
        tie_weights: bool = True,
        strict: bool = False,
        coefficients_file: str = "symerge_coefficients.json",
    ):
        # No **kwargs: a misspelt option must fail, not be logged and ignored.
        super().__init__()
        if loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}; got {loss!r}")
        if task_specific_layer not in TASK_SPECIFIC_LAYERS:
            raise ValueError(
                f"task_specific_layer must be one of {TASK_SPECIFIC_LAYERS}; "
                f"got {task_specific_layer!r}"
            )
        if int(rounds) < 0 or int(batch_size) < 1 or not float(lr) > 0:
            raise ValueError(
                f"need rounds >= 0, batch_size >= 1, lr > 0; got {rounds}, {batch_size}, {lr}"
            )
        self.zeroshot_weights: Dict[str, Tensor] = {}  # the mixin's is a class attribute
        self.history: Dict[str, list] = {}

    # --- setup ------------------------------------------------------------------------------------

    def _check_pool(self, modelpool: BaseModelPool) -> List[str]:
        tasks = list(modelpool.model_names)
        if not modelpool.has_pretrained:
            raise ValueError(
                "SyMerge merges task vectors and needs the pool's '_pretrained_' model"
            )
        missing = [t for t in tasks if t not in (modelpool.test_dataset_names or [])]
        if missing:
            raise ValueError(
                "SyMerge adapts on each task's unlabelled test inputs, read from the model pool's "
                f"test_datasets, which lacks {missing}; use a pool that lists them (for the "
                "embedded benchmark: modelpool=ace_mini_clip_tta)"
            )
        return tasks

    def _setup_heads(self, tasks: List[str]) -> None:
        for task in tasks:  # loading a test set may register its class names (embedded benchmark)
            self.get_shuffled_test_loader_iter(
                task, batch_size=self.batch_size, num_workers=self.num_workers
            )
        clip_model = None
        if self.zero_shot_clip_model:
            clip_model = CLIPModel.from_pretrained(str(self.zero_shot_clip_model))
        self.setup_zero_shot_classification_head(clip_model=clip_model, task_names=tasks)

    def _build_merged(self, modelpool: BaseModelPool, tasks: List[str]) -> LayerWiseMergedModel:
        pretrained = modelpool.load_pretrained_model()
        finetuned = [modelpool.load_model(t) for t in tasks]  # become task vectors in place
        # one coefficient per trainable tensor, in the wrapper's order
        self._tensor_names = [n for n, p in pretrained.named_parameters() if p.requires_grad]
        return LayerWiseMergedModel(
            layer_wise_weight=initial_coefficients(
                len(tasks), len(self._tensor_names), self.init_value
            ),
            pretrained_model=pretrained,
            finetuned_models=finetuned,
            clamp_weights=self.clamp_weights,
            tie_weights=self.tie_weights,
            strict=self.strict,
        )

    def _load_experts(self, modelpool: BaseModelPool, tasks: List[str]) -> Dict[str, nn.Module]:
        experts = {}
        for task in tasks:
            expert = modelpool.load_model(task).eval().requires_grad_(False)
            experts[task] = self.fabric.to_device(expert)
        return experts

    # --- run --------------------------------------------------------------------------------------

    def run(self, modelpool: BaseModelPool) -> SyMergeCLIPVisionModel:
        self.modelpool = modelpool
        if self.seed is not None:  # the data order (shuffled test loaders) and anything else random
            torch.manual_seed(self.seed)
        tasks = self._check_pool(modelpool)
        with self.profile("zero-shot heads"):
            self._setup_heads(tasks)
        with self.profile("load models"):
            merged = self._build_merged(modelpool, tasks)
            experts = self._load_experts(modelpool, tasks)
        heads = nn.ModuleDict(
            {
                t: TaskHead.from_zero_shot(self.zeroshot_weights[t], float(self.logit_scale_exp))
                for t in tasks
            }
        )
        heads.requires_grad_(bool(self.train_heads))
        trainable = _SyMergeTrainable(merged, self.visual_projection, heads)
        parameters = [merged.merge_weight] + (list(heads.parameters()) if self.train_heads else [])
        optimizer = torch.optim.Adam(
            parameters, lr=self.lr, betas=tuple(self.betas), weight_decay=self.weight_decay
        )
        trainable, optimizer = self.fabric.setup(trainable, optimizer)

        with self.profile("test-time adaptation"):
            self._adapt(trainable, optimizer, experts, tasks)

        with torch.no_grad():
            encoder = merged.merge_and_unload().eval()
        readouts = {
            t: readout_through_text_head(
                self.zeroshot_weights[t].detach().cpu(), float(self.logit_scale_exp)
            )
            for t in tasks
        }
        model = SyMergeCLIPVisionModel(
            encoder,
            self.visual_projection,
            {t: heads[t] for t in tasks},
            readouts,
            float(self.logit_scale_exp),
        ).requires_grad_(False)
        self._report(merged, tasks)
        self.print_profile_summary("SyMerge profile")
        return model

    def _adapt(self, trainable, optimizer, experts: Dict[str, nn.Module], tasks: List[str]) -> None:
        rounds = 1 if self.is_debug_mode else int(self.rounds)
        history = {
            "round_loss": [],
            "round_kept_fraction": [],
            "round_agreement": [],
            "skipped_steps": 0,
        }
        trainable.train()
        current: Dict[str, List[float]] = {"loss": [], "kept": [], "agree": []}
        bar = tqdm(
            task_schedule(tasks, rounds, self.shuffle_tasks, self.seed),
            total=rounds * len(tasks),
            desc="SyMerge test-time adaptation",
            dynamic_ncols=True,
        )
        last_round = 0

        def close_round():
            if current["loss"]:
                history["round_loss"].append(sum(current["loss"]) / len(current["loss"]))
                history["round_kept_fraction"].append(sum(current["kept"]) / len(current["kept"]))
                history["round_agreement"].append(sum(current["agree"]) / len(current["agree"]))
            for values in current.values():
                values.clear()

        for step, (round_index, task) in enumerate(bar):
            if round_index != last_round:
                close_round()
                last_round = round_index
            with self.profile("data loading"):
                images = next(
                    self.get_shuffled_test_loader_iter(
                        task, batch_size=self.batch_size, num_workers=self.num_workers
                    )
                )[0]  # labels unused
            with self.profile("expert labels"), torch.no_grad(), self.fabric.autocast():
                expert_logits = self.compute_logits(experts[task], images, task)
            with self.profile("forward pass"):
                merged_logits = trainable(images, task)
                result = self_labelling_loss(merged_logits, expert_logits, self.loss)
            current["agree"].append(result.agreement)
            current["kept"].append(result.kept / max(result.total, 1))
            if (
                result.loss is None
            ):  # nothing kept: the authors' code would step on NaN (skipped by AMP)
                history["skipped_steps"] += 1
                continue
            with self.profile("backward pass"):
                optimizer.zero_grad()
                self.fabric.backward(result.loss)
                optimizer.step()
            current["loss"].append(float(result.loss.detach()))
            weight = trainable.merged.merge_weight.detach()
            metrics = {
                "train/loss": current["loss"][-1],
                "train/kept": current["kept"][-1],
                "train/weight_mean": float(weight.mean()),
            }
            self.fabric.log_dict(metrics, step=step)
            bar.set_postfix(
                {
                    "round": round_index,
                    "loss": f"{sum(current['loss']) / len(current['loss']):.4f}",
                    "agree": f"{sum(current['agree']) / len(current['agree']):.2f}",
                    "λ": f"{float(weight.mean()):.3f}",
                }
            )
        close_round()
        self.history = history
        if history["round_loss"]:
            log.info(
                "SyMerge self-labelling loss: first round %.4f, last round %.4f "
                "(%d rounds, %d skipped steps)",
                history["round_loss"][0],
                history["round_loss"][-1],
                rounds,
                history["skipped_steps"],
            )

    def _report(self, merged: LayerWiseMergedModel, tasks: List[str]) -> None:
        raw = merged.merge_weight.detach().float().cpu()
        used = effective_coefficients(raw, self.clamp_weights)
        names = self._tensor_names
        data = {
            "method": "symerge",
            "tasks": tasks,
            "hyperparameters": {
                k: (list(v) if isinstance(v, (tuple, list)) else v)
                for k, v in {
                    "rounds": self.rounds,
                    "batch_size": self.batch_size,
                    "lr": self.lr,
                    "betas": list(self.betas),
                    "weight_decay": self.weight_decay,
                    "init_value": self.init_value,
                    "clamp_weights": self.clamp_weights,
                    "train_heads": self.train_heads,
                    "loss": self.loss,
                    "task_specific_layer": self.task_specific_layer,
                    "seed": self.seed,
                }.items()
            },
            "coefficients": {
                name: dict(zip(tasks, used[:, j].tolist())) for j, name in enumerate(names)
            },
            "raw_coefficients": {
                name: dict(zip(tasks, raw[:, j].tolist())) for j, name in enumerate(names)
            },
            "mean_coefficient_per_task": dict(zip(tasks, used.mean(dim=1).tolist())),
            **self.history,
        }
        write_json_beside_report(self, self.coefficients_file, data)
