"""Greedy-generation exact match: the embedded LLM track's evaluation (and its task pool).

A task is a set of ``(prompt, answer)`` pairs. The model sees ``<bos> prompt`` and generates
greedily until ``<eos>`` or ``max_new_tokens``; an example counts when the generated tokens before
``<eos>`` are exactly the answer's tokens (gsm8k-style "exact match", on the whole completion).
Prompts are left-padded into batches so every row generates from the same position.

:func:`greedy_exact_match` is plain ``transformers``; :class:`GreedyExactMatchTaskPool` wraps it as
a FusionBench task pool (``evaluate(model) -> {task: {"accuracy": ..}, "average": {..}}``, as
FusionBench's own pools report), with each task's dataset a ``datasets`` split with ``prompt``
and ``answer`` columns, instantiated from its config.
"""

from __future__ import annotations

import logging
from typing import Dict, List, Optional, Sequence, Union

import torch
from fusion_bench.mixins import LightningFabricMixin
from fusion_bench.taskpool import BaseTaskPool
from fusion_bench.utils import instantiate
from omegaconf import DictConfig

from .data import load_tokenizer

log = logging.getLogger(__name__)


def encode_prompt(tokenizer, prompt: str) -> List[int]:
    """``<bos>`` then the prompt's tokens (how every prompt is fed, in training and evaluation)."""
    return [tokenizer.bos_token_id, *tokenizer.encode(prompt, add_special_tokens=False)]


@torch.no_grad()
def greedy_generate(model, tokenizer, prompts: Sequence[str], max_new_tokens: int,
                    batch_size: int) -> List[List[int]]:
    """Greedy completions of ``prompts`` (token ids, cut before the first ``<eos>``)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    completions: List[List[int]] = []
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    for start in range(0, len(prompts), batch_size):
        encoded = [encode_prompt(tokenizer, p) for p in prompts[start:start + batch_size]]
        width = max(len(ids) for ids in encoded)
        input_ids = torch.full((len(encoded), width), pad, dtype=torch.long)
        attention_mask = torch.zeros((len(encoded), width), dtype=torch.long)
        for row, ids in enumerate(encoded):  # left padding: every prompt ends at `width`
            input_ids[row, width - len(ids):] = torch.tensor(ids)
            attention_mask[row, width - len(ids):] = 1
        output = model.generate(
            input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
            max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, eos_token_id=eos,
            pad_token_id=pad,
        )
        for generated in output[:, width:].tolist():
            completions.append(generated[: generated.index(eos)] if eos in generated
                               else generated)
    model.train(was_training)
    return completions


def greedy_exact_match(model, tokenizer, prompts: Sequence[str], answers: Sequence[str], *,
                       max_new_tokens: int, batch_size: int) -> Dict[str, float]:
    """``{"accuracy": share of exact matches, "num_samples": n}``."""
    completions = greedy_generate(model, tokenizer, prompts, max_new_tokens, batch_size)
    correct = sum(
        completion == tokenizer.encode(answer, add_special_tokens=False)
        for completion, answer in zip(completions, answers)
    )
    return {"accuracy": correct / max(len(prompts), 1), "num_samples": len(prompts)}


class GreedyExactMatchTaskPool(BaseTaskPool, LightningFabricMixin):
    """Evaluate a causal LM by greedy generation and exact match on each task's test set.

    Args:
        test_datasets: task name -> dataset config (instantiated; ``prompt``, ``answer`` columns).
        tokenizer: name or path for ``AutoTokenizer.from_pretrained``, or a config to instantiate.
        max_new_tokens: generation budget (longer than every answer plus ``<eos>``).
        batch_size: prompts generated together.
        fast_dev_run: evaluate one batch per task only.
    """

    _config_mapping = BaseTaskPool._config_mapping | {
        "_test_datasets": "test_datasets",
        "_tokenizer": "tokenizer",
        "max_new_tokens": "max_new_tokens",
        "batch_size": "batch_size",
        "fast_dev_run": "fast_dev_run",
    }

    def __init__(
        self,
        test_datasets: DictConfig,
        tokenizer: Union[str, DictConfig],
        max_new_tokens: int = 32,
        batch_size: int = 64,
        fast_dev_run: bool = False,
        **kwargs,
    ):
        self._test_datasets = test_datasets
        self._tokenizer = tokenizer
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self.fast_dev_run = fast_dev_run
        super().__init__(**kwargs)
        self._tokenizer_instance = None
        self._data: Dict[str, object] = {}

    @property
    def tokenizer(self):
        if self._tokenizer_instance is None:
            self._tokenizer_instance = load_tokenizer(self._tokenizer)
        return self._tokenizer_instance

    def dataset(self, name: str):
        if name not in self._data:
            data = instantiate(self._test_datasets[name])
            missing = {"prompt", "answer"} - set(data.column_names)
            if missing:
                raise ValueError(f"task {name!r}: the dataset lacks the columns {sorted(missing)}")
            self._data[name] = data
        return self._data[name]

    def evaluate_single_task(self, name: str, model) -> Dict[str, float]:
        data = self.dataset(name)
        count = min(len(data), self.batch_size) if self.fast_dev_run else len(data)
        result = greedy_exact_match(
            model, self.tokenizer, data["prompt"][:count], data["answer"][:count],
            max_new_tokens=self.max_new_tokens, batch_size=self.batch_size,
        )
        log.info("%s: exact match %.4f (%d prompts)", name, result["accuracy"], count)
        return result

    def evaluate(self, model, name: Optional[str] = None, **kwargs):
        if self.fabric is not None:  # generate() needs the plain module: only place it
            model = model.to(self.fabric.device)
        report: Dict[str, object] = {} if name is None else {"name": name}
        for task in self._test_datasets:
            report[task] = self.evaluate_single_task(task, model)
        accuracies = [report[t]["accuracy"] for t in self._test_datasets]
        report["average"] = {"accuracy": sum(accuracies) / len(accuracies)}
        log.info("Evaluation result: %s", report)
        return report
