"""Training loop and data helpers shared by the embedded tracks' builders (GPT-2, LLM)."""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Callable, Dict, Iterator

import datasets
import torch
from torch import Tensor
from tqdm.auto import tqdm

from .determinism import stage_seed

Batch = Dict[str, Tensor]


@contextmanager
def quiet_datasets() -> Iterator[None]:
    """No "Saving the dataset" bar for each of the many small splits."""
    was_enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was_enabled:
            datasets.enable_progress_bars()


def trim_padding(batch: Batch) -> Batch:
    """Drop the columns that are padding in every row: same result (pads are right of every
    real token and masked), less compute."""
    width = int(batch["attention_mask"].sum(dim=1).max())
    return {k: v[:, :width] if v.dim() == 2 else v for k, v in batch.items()}


def train(model: torch.nn.Module, data: Batch, loss_fn: Callable[[torch.nn.Module, Batch], Tensor],
          *, steps: int, batch_size: int, lr: float, settings: dict, stage: str,
          progress: bool, log: Callable[[str], None] = tqdm.write) -> None:
    """AdamW with linear warm-up and decay, on batches in a seeded order (``settings``:
    ``seed``, ``weight_decay``, ``warmup_fraction``, ``max_grad_norm``)."""
    seed = stage_seed(settings["seed"], stage)
    torch.manual_seed(seed)  # dropout
    order = torch.Generator().manual_seed(seed)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=settings["weight_decay"])
    warmup = max(1, int(settings["warmup_fraction"] * steps))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_then_linear_decay(warmup, steps))
    num_rows = len(next(iter(data.values())))
    model.train()
    bar = tqdm(range(steps), desc=stage, disable=not progress, leave=False, dynamic_ncols=True)
    running = math.nan
    for step, rows in zip(bar, shuffled_batches(num_rows, batch_size, order)):
        loss = loss_fn(model, {k: v[rows] for k, v in data.items()})
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), settings["max_grad_norm"])
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        running = loss.item() if math.isnan(running) else 0.95 * running + 0.05 * loss.item()
        if step % 10 == 0 or step == steps - 1:
            bar.set_postfix(loss=f"{running:.3f}")
    model.eval()
    log(f"{stage}: {steps} steps, final loss {running:.3f}")


def warmup_then_linear_decay(warmup: int, steps: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        return min((step + 1) / warmup, max(0.0, (steps - step) / max(1, steps - warmup)))

    return factor


def shuffled_batches(num_rows: int, batch_size: int, generator: torch.Generator
                     ) -> Iterator[Tensor]:
    """Row indices, epoch after epoch, each epoch in a fresh seeded permutation."""
    while True:
        permutation = torch.randperm(num_rows, generator=generator)
        for start in range(0, num_rows - batch_size + 1, batch_size):
            yield permutation[start: start + batch_size]
