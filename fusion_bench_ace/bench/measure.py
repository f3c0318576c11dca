"""Timing and peak memory of one call (CPU: RSS sampled every millisecond; CUDA: the allocator)."""

from __future__ import annotations

import time
from typing import Callable

import torch
from torch import Tensor

from ..memory import MemorySampler


class PeakSampler(MemorySampler):
    """Peak RSS above the value at entry (bytes), sampled every millisecond in a thread (CPU);
    anonymous memory alongside (:class:`fusion_bench_ace.memory.MemorySampler`)."""

    def __init__(self):
        super().__init__(interval=0.001)

    @property
    def extra(self) -> int:
        return self.peak["rss"] - self.start["rss"]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fn: Callable[[], Tensor], device: torch.device):
    """``(result, seconds, peak extra bytes)`` of one call."""
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        start = time.perf_counter()
        result = fn()
        sync(device)
        seconds = time.perf_counter() - start
        return result, seconds, torch.cuda.max_memory_allocated(device) - before
    with PeakSampler() as sampler:
        start = time.perf_counter()
        result = fn()
        seconds = time.perf_counter() - start
    return result, seconds, sampler.extra

