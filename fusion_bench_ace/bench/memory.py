"""Peak memory of :class:`fusion_bench_ace.ACEMerging` against the number of experts ``T``.

Synthetic GPT-2-style experts are written as ``save_pretrained`` safetensors checkpoints; the
merge runs in a fresh subprocess per ``T`` with ``streaming=true`` and ``streaming=false``; the
peak RSS is sampled every millisecond (``resource.getrusage`` for the process's own peak).
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import List

import torch

from ..paths import PACKAGE_DIR
from .measure import PeakSampler


def write_memory_pool(root: Path, num_tasks: int, spec: dict, seed: int) -> None:
    from transformers import GPT2Config, GPT2Model

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=spec["vocab_size"], n_positions=spec["n_positions"],
                        n_embd=spec["n_embd"], n_layer=spec["n_layer"],
                        n_head=max(1, spec["n_embd"] // 64))
    pretrained = GPT2Model(config).eval()
    pretrained.save_pretrained(root / "pretrained")
    state = pretrained.state_dict()
    for t in range(num_tasks):
        scale = 10 ** (-3 + 2 * (t % 4) / 3)  # mixed scales: both branches occur
        expert = {k: (v + scale * torch.randn_like(v)) if v.is_floating_point() else v
                  for k, v in state.items()}
        pretrained.load_state_dict(expert)
        pretrained.save_pretrained(root / f"expert_{t:02d}")
        pretrained.load_state_dict(state)


def run_worker(command: List[str], what: str) -> dict:
    """Run a measuring worker in a fresh process (offline, from the directory holding this
    package, so it imports this copy); its last stdout line is its JSON result."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env,
                          cwd=PACKAGE_DIR.parent, timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(f"{what} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def memory_worker(root: str, num_tasks: int, streaming: str, settings: dict) -> dict:
    """Run in a fresh process: ACEMerging over ``num_tasks`` experts; peak RSS (getrusage)."""
    from fusion_bench import BaseModelPool
    from omegaconf import OmegaConf

    from ..algorithms.ace import ACEMerging

    loader = "transformers.GPT2Model.from_pretrained"
    names = ["pretrained"] + [f"expert_{t:02d}" for t in range(num_tasks)]
    models = {("_pretrained_" if n == "pretrained" else n):
              {"_target_": loader, "pretrained_model_name_or_path": str(Path(root) / n)}
              for n in names}
    pool = BaseModelPool(OmegaConf.create(models))
    algorithm = ACEMerging(eps=settings["eps"], tau=settings["tau"], k_frac=settings["k_frac"],
                           diagnostics=False, streaming=streaming)
    with PeakSampler() as sampler:
        start = time.perf_counter()
        merged = algorithm.run(pool)
        seconds = time.perf_counter() - start
    max_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    model_bytes = sum(p.numel() * p.element_size() for p in merged.state_dict().values())
    layer_bytes = num_tasks * max(
        p.numel() * p.element_size() for p in merged.state_dict().values()
    )
    return {
        "layer_task_vectors_bytes": layer_bytes,
        "tasks": num_tasks,
        "streaming": streaming,
        "peak_rss": sampler.peak["rss"],
        "peak_anon": sampler.peak["anon"],
        "baseline_rss": sampler.start["rss"],
        "baseline_anon": sampler.start["anon"],
        "ru_maxrss": max_rss,
        "seconds": seconds,
        "model_bytes": model_bytes,
    }


def memory_curve(spec: dict, settings: dict, log=print) -> List[dict]:
    rows = []
    with tempfile.TemporaryDirectory(prefix="ace_bench_mem_") as root:
        write_memory_pool(Path(root), max(spec["tasks"]), spec, settings["seed"])
        for num_tasks in spec["tasks"]:
            for streaming in ("true", "false"):
                command = [
                    sys.executable,
                    "-m",
                    "fusion_bench_ace.bench",
                    "--memory-worker",
                    root,
                    str(num_tasks),
                    streaming,
                    "--threads",
                    str(settings["threads"]),
                ]
                row = run_worker(command, "memory worker")
                rows.append(row)
                log(
                    f"  memory T={num_tasks} streaming={streaming}: peak RSS "
                    f"{row['peak_rss'] / 2**20:.0f} MiB, baseline "
                    f"{row['baseline_rss'] / 2**20:.0f} MiB ({row['seconds']:.1f}s)"
                )
    return rows
