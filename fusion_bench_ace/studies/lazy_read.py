"""Peak memory of reading ``T`` experts parameter by parameter, by reader.

``python -m fusion_bench_ace.studies.lazy_read [--mode memory|quick|full|tiny] [--out DIR]``: the
same synthetic GPT-2-style safetensors experts as the memory curve (``memory`` settings of the mode
in ``config/bench/ace.yaml``), read as the merge driver reads them
(:func:`fusion_bench_ace.engine.driver.stacked_task_vectors`: one parameter's task vectors of every
expert, dropped before the next) through each reader, one fresh subprocess per reader and ``T``;
peak RSS above the RSS before the experts are opened, sampled every millisecond.

Readers: ``streaming`` (:func:`fusion_bench_ace.engine.io.reader.open_checkpoint`), FusionBench's
``LazyStateDict`` as its pools create it (``cache_state_dict=False``) and with
``cache_state_dict=True``, and ``loaded`` (every expert's whole state dict read first, as the
in-memory path holds them).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional

import torch

from .. import provenance
from ..bench.cli import load_settings
from ..bench.measure import PeakSampler
from ..bench.memory import run_worker, write_memory_pool
from ..engine.driver import stacked_task_vectors


def _readers() -> Dict[str, Callable[[str], Mapping[str, torch.Tensor]]]:
    """``{reader: open(expert directory)}``, in the report's order."""
    from fusion_bench.utils.lazy_state_dict import LazyStateDict
    from safetensors.torch import load_file

    from ..engine.io.reader import open_checkpoint

    return {
        "streaming": open_checkpoint,
        "lazy_state_dict": lambda path: LazyStateDict(path, cache_state_dict=False),
        "lazy_state_dict_cached": lambda path: LazyStateDict(path, cache_state_dict=True),
        "loaded": lambda path: load_file(os.path.join(path, "model.safetensors")),
    }


def read_worker(root: str, num_tasks: int, reader: str) -> dict:
    """Run in a fresh process: read every parameter of ``num_tasks`` experts through ``reader``."""
    cpu = torch.device("cpu")
    readers = _readers()  # every reader's module imported before the baseline: reading alone
    if reader not in readers:
        raise ValueError(f"unknown reader {reader!r}; one of {list(readers)}")
    paths = [str(Path(root) / f"expert_{t:02d}") for t in range(num_tasks)]
    pretrained = readers["streaming"](str(Path(root) / "pretrained"))  # one tensor at a time
    largest = 0
    with PeakSampler() as sampler:
        start = time.perf_counter()
        experts = {path: readers[reader](path) for path in paths}
        for name in pretrained:
            base = pretrained[name]
            # the merge driver's own read: that parameter of every expert, minus the pretrained
            stacked = stacked_task_vectors(name, base, experts, device=cpu, dtype=base.dtype)
            largest = max(largest, stacked.numel() * stacked.element_size())
            del stacked, base
        seconds = time.perf_counter() - start
    return {
        "tasks": num_tasks,
        "reader": reader,
        "peak_rss": sampler.peak["rss"],
        "baseline_rss": sampler.start["rss"],
        "seconds": seconds,
        "stacked_bytes": largest,
    }


def read_curve(spec: dict, seed: int, log=print) -> List[dict]:
    rows = []
    with tempfile.TemporaryDirectory(prefix="ace_bench_lazy_") as root:
        write_memory_pool(Path(root), max(spec["tasks"]), spec, seed)
        model_bytes = os.path.getsize(Path(root) / "pretrained" / "model.safetensors")
        for num_tasks in spec["tasks"]:
            for reader in _readers():
                command = [
                    sys.executable,
                    "-m",
                    "fusion_bench_ace.studies.lazy_read",
                    "--worker",
                    root,
                    str(num_tasks),
                    reader,
                ]
                row = run_worker(command, "read worker")
                row["model_file_bytes"] = model_bytes
                rows.append(row)
                extra = (row["peak_rss"] - row["baseline_rss"]) / 2**20
                log(
                    f"  T={num_tasks} {reader}: peak - baseline {extra:.0f} MiB "
                    f"({row['seconds']:.1f}s)"
                )
    return rows


def render(header: dict, spec: dict, rows: List[dict]) -> str:
    lines = [
        "# Reading experts parameter by parameter: peak memory by reader",
        "",
        *provenance.markdown_lines(header),
        "",
        f"Synthetic GPT-2-style experts (n_embd={spec['n_embd']}, n_layer={spec['n_layer']}, "
        f"vocab={spec['vocab_size']}, n_positions={spec['n_positions']}; one model.safetensors = "
        f"{rows[0]['model_file_bytes'] / 2**20:.1f} MiB). Each parameter of all T experts read "
        "as the merge driver reads it (`merging.stacked_task_vectors`: the T task vectors of "
        "one parameter, then the next); peak RSS above the RSS before the "
        "experts are opened, sampled every ms, one subprocess per row. `T × largest param` = the "
        "largest stack.",
        "",
        "| T | reader | peak − baseline MiB | T × largest param MiB | read s |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['tasks']} | {row['reader']} | "
            f"{(row['peak_rss'] - row['baseline_rss']) / 2**20:.0f} | "
            f"{row['stacked_bytes'] / 2**20:.0f} | {row['seconds']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m fusion_bench_ace.studies.lazy_read", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--mode", default="memory", help="mode of the settings (default memory)")
    parser.add_argument("--config", default=None, help="settings file (default bench/ace.yaml)")
    parser.add_argument("--out", default=None, help="output folder (default: config's out)")
    parser.add_argument(
        "--worker", nargs=3, metavar=("ROOT", "T", "READER"), help=argparse.SUPPRESS
    )
    args = parser.parse_args(argv)
    config_path, config = load_settings(args.config)
    torch.set_num_threads(config["threads"])
    if args.worker:
        root, num_tasks, reader = args.worker
        print(json.dumps(read_worker(root, int(num_tasks), reader)))
        return
    if args.mode not in config["modes"]:
        raise SystemExit(f"unknown mode {args.mode!r}; {config_path} has {sorted(config['modes'])}")
    spec = config["modes"][args.mode]["memory"]
    argv_used = sys.argv[1:] if argv is None else list(argv)
    header = provenance.collect(
        " ".join(["python -m fusion_bench_ace.studies.lazy_read", *argv_used]), "cpu"
    )
    rows = read_curve(spec, config["seed"])
    text = render(header, spec, rows)
    print(text)
    out = Path(args.out or config["out"]).resolve()
    out.mkdir(parents=True, exist_ok=True)
    (out / f"lazy_read_{args.mode}.md").write_text(text)
    print(f"wrote {out / f'lazy_read_{args.mode}.md'}")


if __name__ == "__main__":
    main()
