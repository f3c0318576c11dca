"""Deterministic builds: fixed threads and kernels in-process, fixed instruction sets per process.

Float sums depend on the order of operations, which depends on the number of threads and on the
vector instructions a kernel uses (AVX2 vs AVX-512); training amplifies a last-bit difference
into different weights. ``deterministic_torch`` fixes the first inside a process;
``PINNED_INSTRUCTION_SETS`` fixes the second, but only for a process started with it in its
environment (MKL and ATen read it once, at their first call), so builds run in a child process
(:func:`fusion_bench_ace.mini.build`).
"""

from __future__ import annotations

import hashlib
from contextlib import contextmanager
from typing import Iterator

PINNED_INSTRUCTION_SETS = {
    # ATen's vectorised kernels (softmax, layer norm, GELU, reductions): the AVX2 build
    "ATEN_CPU_CAPABILITY": "avx2",
    # MKL's conditional numerical reproducibility: the same AVX2 code path on every x86 CPU
    # that has AVX2 (Intel or AMD), whatever newer instructions it also has
    "MKL_CBWR": "AVX2",
    "MKL_ENABLE_INSTRUCTIONS": "AVX2",
    # oneDNN kernels, where torch uses them
    "ONEDNN_MAX_CPU_ISA": "AVX2",
    "DNNL_MAX_CPU_ISA": "AVX2",
}


@contextmanager
def deterministic_torch(num_threads: int) -> Iterator[None]:
    """Deterministic kernels on a fixed number of CPU threads (float sums do not depend on the
    machine's core count), and torch's global RNG (model init, dropout) and thread count restored
    afterwards, so building does not disturb the caller. Every stage reseeds with ``stage_seed``."""
    import torch

    previous = torch.are_deterministic_algorithms_enabled(), torch.get_num_threads()
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(num_threads)
    try:
        with torch.random.fork_rng(devices=[]):
            yield
    finally:
        torch.use_deterministic_algorithms(previous[0])
        torch.set_num_threads(previous[1])


def stage_seed(seed: int, stage: str) -> int:
    """An independent, stable seed per stage: adding a task does not change the others."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{stage}".encode()).digest()[:4], "little")
