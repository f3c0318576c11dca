"""Merging causal LMs: peak memory against model size and ``T``, merge time against the floor.

``python -m fusion_bench_ace.bench.llm [--tiny] [--out DIR]`` (settings: ``config/bench/llm.yaml``)
writes synthetic Llama-shaped experts as sharded bf16 safetensors checkpoints (random weights,
each expert the pretrained ones plus noise of its own scale; generated and written tensor by
tensor), then runs, each in a fresh subprocess with its resident memory sampled every
millisecond:

- ``stream``: ``ACEMerging.merge_to_checkpoint`` (``method=ace_llama`` with no task pool): every
  model read tensor by tensor, every merged tensor written to its shard at once;
- ``in_memory``: ``ACEMerging.run`` (the path a task pool evaluates): the experts streamed, the
  merge written into the pretrained model's own tensors, which the run returns;
- ``fusion_bench_ta``: FusionBench's Task Arithmetic (``CausalLMPool``, models loaded whole);
- ``fusion_bench_ta_lazy``: the same with ``enable_lazy_loading=true`` (FusionBench's
  ``LazyStateDict``);

and, per model, the two lazy readers alone (``SafetensorsStateDict`` of
:mod:`fusion_bench_ace.engine.io.reader`, FusionBench's ``LazyStateDict``: open, then read every
tensor once). The merge time is compared with the floor of unavoidable operations
(:func:`fusion_bench_ace.bench.layers.bench_model`, ``floor``) summed over the model's layers.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch

from .. import provenance
from ..paths import PACKAGE_DIR, config_dir
from .measure import PeakSampler

PATHS = ("stream", "in_memory", "fusion_bench_ta", "fusion_bench_ta_lazy")
READERS = ("safetensors_state_dict", "lazy_state_dict")


def load_settings(path: Optional[str | Path] = None) -> dict:
    from omegaconf import OmegaConf

    path = Path(path) if path else config_dir() / "bench" / "llm.yaml"
    return {"config_file": str(path), **OmegaConf.to_container(OmegaConf.load(path), resolve=True)}


def llama_config(spec: dict):
    from transformers import LlamaConfig

    return LlamaConfig(**spec, max_position_embeddings=2048, tie_word_embeddings=False)


def state_shapes(spec: dict) -> Dict[str, tuple]:
    """``{name: shape}`` of the Llama ``spec`` (a meta-device model: no memory)."""
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        state = LlamaForCausalLM(llama_config(spec)).state_dict()
    return {name: tuple(tensor.shape) for name, tensor in state.items()}


def merged_shapes(spec: dict, exclude) -> List[list]:
    """``[label, [d_out, d_in], count]`` of every 2-D weight ACE merges (layer bench format)."""
    from ..engine.selection import NamePatterns

    patterns = NamePatterns.compile(exclude, "exclude_keys")
    counts: Dict[tuple, int] = {}
    labels: Dict[tuple, str] = {}
    for name, shape in state_shapes(spec).items():
        if len(shape) == 2 and not patterns.matches(name):
            counts[shape] = counts.get(shape, 0) + 1
            labels.setdefault(shape, name.split(".", 3)[-1].rsplit(".", 1)[0])
    return [[labels[s], list(s), c] for s, c in counts.items()]


def _numel(shape) -> int:
    count = 1
    for size in shape:
        count *= size
    return count


# --- synthetic experts ----------------------------------------------------------------------------


def write_synthetic_pool(root: Path, spec: dict, num_tasks: int, settings: dict) -> Dict[str, str]:
    """``pretrained/`` and ``expert_<t>/`` under ``root``, tensor by tensor; returns the paths."""
    return write_synthetic_checkpoints(root, state_shapes(spec), llama_config(spec), num_tasks,
                                       settings)


def write_synthetic_checkpoints(root: Path, shapes: Dict[str, tuple], config, num_tasks: int,
                                settings: dict) -> Dict[str, str]:
    """Checkpoints of the tensors ``shapes`` (``settings``: ``dtype``, ``seed``, ``noise``,
    ``max_shard_size``) with the Hugging Face ``config``: ``pretrained/`` and ``expert_<t>/``
    under ``root``; returns the paths."""
    from ..engine.io.reader import open_checkpoint
    from ..engine.io.writer import ShardedSafetensorsWriter, TensorSpec

    dtype = getattr(torch, settings["dtype"])
    specs = [TensorSpec(name, shape, dtype) for name, shape in shapes.items()]
    paths = {"_pretrained_": str(root / "pretrained"),
             **{f"expert_{t}": str(root / f"expert_{t}") for t in range(num_tasks)}}
    generator = torch.Generator().manual_seed(settings["seed"])
    for index, (name, path) in enumerate(paths.items()):
        Path(path).mkdir(parents=True)
        writer = ShardedSafetensorsWriter(path, specs, settings["max_shard_size"])
        base = None if index == 0 else open_checkpoint(paths["_pretrained_"], torch.float32)
        # relative noise spread over a decade across experts: both ACE branches occur
        scale = settings["noise"] * 10 ** (index % 3 / 2)
        for spec_ in specs:
            if base is None:
                tensor = (torch.ones(spec_.shape) if len(spec_.shape) == 1 else
                          0.02 * torch.randn(spec_.shape, generator=generator))
            else:
                tensor = base[spec_.name]
                tensor += scale * tensor.abs().mean() * torch.randn(spec_.shape,
                                                                    generator=generator)
            writer.write(spec_.name, tensor.to(dtype))
            del tensor
        writer.finish()
        config.save_pretrained(path)
    return paths


# --- workers (one fresh process each) -------------------------------------------------------------


def _pool(paths: Dict[str, str], dtype: str, lazy: bool = False):
    from fusion_bench.modelpool import CausalLMPool

    return CausalLMPool(models=dict(paths), tokenizer=None, model_kwargs={"torch_dtype": dtype},
                        enable_lazy_loading=lazy)


def worker(path_kind: str, paths: Dict[str, str], settings: dict, out: Optional[str]) -> dict:
    from ..algorithms.ace import ACEMerging

    def ace():
        return ACEMerging(eps=settings["eps"], tau=settings["tau"], k_frac=settings["k_frac"],
                          exclude_keys=settings["exclude_keys"], average_keys=[],
                          diagnostics=False, streaming="true")

    if path_kind == "stream":
        def run():
            return ace().merge_to_checkpoint(_pool(paths, settings["dtype"]), out,
                                             max_shard_size=settings["max_shard_size"])
    elif path_kind == "in_memory":
        def run():
            return ace().run(_pool(paths, settings["dtype"]))
    elif path_kind.startswith("fusion_bench_ta"):
        from fusion_bench.method import TaskArithmeticAlgorithm

        def run():
            return TaskArithmeticAlgorithm(scaling_factor=settings["ta_scaling_factor"]).run(
                _pool(paths, settings["dtype"], lazy=path_kind.endswith("lazy")))
    elif path_kind in READERS:
        def run():
            return read_every_tensor(path_kind, paths["_pretrained_"], settings["dtype"])
    else:
        raise ValueError(f"unknown path {path_kind!r}")
    # imported before the baseline, so that the import does not count as the run's memory
    import transformers.models.llama.modeling_llama  # noqa: F401

    gc.collect()
    with PeakSampler() as sampler:
        start = time.perf_counter()
        result = run()
        seconds = time.perf_counter() - start
    row = {"path": path_kind, "peak_rss": sampler.peak, "baseline_rss": sampler.start,
           "seconds": seconds}
    if isinstance(result, dict):
        row.update(result)
    return row


def read_every_tensor(reader: str, path: str, dtype: str) -> dict:
    """Open a checkpoint with ``reader`` and read each tensor once (summing them, so each read
    is used and then freed)."""
    start = time.perf_counter()
    if reader == "safetensors_state_dict":
        from ..engine.io.reader import open_checkpoint

        state = open_checkpoint(path, getattr(torch, dtype))
    else:
        from fusion_bench.utils.lazy_state_dict import LazyStateDict
        from transformers import AutoModelForCausalLM

        state = LazyStateDict(path, meta_module_class=AutoModelForCausalLM,
                              torch_dtype=getattr(torch, dtype))
    opened = time.perf_counter() - start
    total = 0.0
    for name in list(state.keys()):
        total += float(state[name].float().sum())
    return {"open_seconds": opened, "checksum": total}


# --- the benchmark ------------------------------------------------------------------------------


def _run_worker(kind: str, paths: Dict[str, str], settings: dict, out: Optional[str]) -> dict:
    command = [sys.executable, "-m", "fusion_bench_ace.bench.llm", "--worker", kind,
               json.dumps(paths), json.dumps(settings), out or ""]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "OMP_NUM_THREADS": str(settings["threads"])}
    done = subprocess.run(command, capture_output=True, text=True, env=env,
                          cwd=PACKAGE_DIR.parent, timeout=settings["worker_timeout_s"])
    if done.returncode != 0:
        raise RuntimeError(f"{kind} worker failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def bench_size(name: str, run: dict, settings: dict, log=print) -> dict:
    from .layers import bench_model

    spec = settings["models"][name]
    num_params = sum(_numel(shape) for shape in state_shapes(spec).values())
    shapes = merged_shapes(spec, settings["exclude_keys"])
    largest = max((shape for _, shape, _ in shapes), key=_numel)
    result = {"model": name, "spec": spec, "num_parameters": num_params,
              "largest_merged_shape": largest, "rows": []}
    log(f"[bench llm] {name}: {num_params / 1e9:.2f} B parameters")
    layer_settings = {k: settings[k] for k in ("eps", "tau", "k_frac", "seed")}
    for num_tasks in run["tasks"]:
        with tempfile.TemporaryDirectory(prefix="ace_bench_llm_",
                                         dir=settings.get("scratch")) as scratch:
            root = Path(scratch)
            start = time.perf_counter()
            paths = write_synthetic_pool(root / "pool", spec, num_tasks, settings)
            log(f"[bench llm]   T={num_tasks}: wrote {num_tasks + 1} checkpoints in "
                f"{time.perf_counter() - start:.0f} s")
            if num_tasks == run["tasks"][0]:
                for reader in READERS:
                    row = _run_worker(reader, paths, settings, None)
                    result.setdefault("readers", []).append(row)
                    log(f"[bench llm]   reader {reader}: open {row['open_seconds']:.2f} s, "
                        f"all tensors {row['seconds']:.1f} s, peak - baseline "
                        f"{(row['peak_rss'] - row['baseline_rss']) / 2**20:.0f} MiB")
            for kind in run["paths"]:
                out = str(root / "merged") if kind == "stream" else None
                row = {"tasks": num_tasks, **_run_worker(kind, paths, settings, out)}
                result["rows"].append(row)
                log(f"[bench llm]   T={num_tasks} {kind}: peak - baseline "
                    f"{(row['peak_rss'] - row['baseline_rss']) / 2**20:.0f} MiB, "
                    f"{row['seconds']:.1f} s")
        with torch.no_grad():
            layers = bench_model(name, shapes, num_tasks, ["ours", "floor"], 1, layer_settings,
                                 torch.device("cpu"), log=lambda *a: None)
        times = {impl: layers["impls"][impl]["seconds"] for impl in ("ours", "floor")}
        result.setdefault("layer_times", {})[num_tasks] = times
        log(f"[bench llm]   T={num_tasks} layer bench: ours {times['ours']:.1f} s, floor "
            f"{times['floor']:.1f} s")
    return result


def render(report: dict) -> str:
    header = report["header"]
    machine = header["machine"]
    lines = [
        "# Merging causal LMs: peak memory and merge time",
        "",
        f"- command: `{header['command']}` (settings `{header['settings_file']}`)",
        f"- git commit: {header['git_commit']}"
        + (" (with uncommitted changes)" if header["git_dirty"] else ""),
        f"- machine: {machine['cpu']}, {machine['cpu_count']} cores, {machine['memory']}, "
        f"{header['threads']} torch thread(s); shared with other jobs (load average at start "
        f"{header['load_start']}, at end {header['load_end']})",
        f"- date: {header['date_utc']} UTC",
        f"- ACE eps={header['eps']}, tau={header['tau']}, k_frac={header['k_frac']}, "
        f"exclude_keys={header['exclude_keys']}; experts in {header['dtype']}, shards of "
        f"{header['max_shard_size']}",
        "",
        "Synthetic Llama-shaped experts (random weights; expert t = pretrained + noise), written "
        "as sharded safetensors. Each row is one fresh process; `peak − baseline` = resident "
        "memory sampled every ms during the run minus the value after imports. `T × largest` = "
        "the task vectors of the largest merged parameter in float32, which the driver stacks. "
        "`floor` = Σ over the model's merged layers of the unavoidable operations "
        "(one Gram product per task, one Cholesky solve, one SVD for heterogeneous layers), "
        "timed on random task vectors of the same shapes; `merge / floor` compares the whole "
        "run (reading, merging, writing) with it.",
        "",
        "| model | params | T | path | peak − baseline MiB | model MiB | T × largest MiB | "
        "run s | floor s | run / floor |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for size in report["sizes"]:
        model_mib = size["num_parameters"] * 2 / 2**20
        numel = _numel(size["largest_merged_shape"])
        for row in size["rows"]:
            t = row["tasks"]
            floor = size.get("layer_times", {}).get(t, {}).get("floor")
            merged = row["path"] in ("stream", "in_memory")
            lines.append(
                f"| {size['model']} | {size['num_parameters'] / 1e9:.2f} B | {t} | {row['path']} "
                f"| {(row['peak_rss'] - row['baseline_rss']) / 2**20:.0f} | {model_mib:.0f} | "
                f"{t * numel * 4 / 2**20:.0f} | {row['seconds']:.1f} | "
                + (f"{floor:.1f} | {row['seconds'] / floor:.2f} |" if merged and floor else
                   " | |"))
    lines += ["", "Lazy readers alone: open the pretrained checkpoint, read every tensor once.",
              "", "| model | reader | open s | read all s | peak − baseline MiB |",
              "|---|---|---|---|---|"]
    for size in report["sizes"]:
        for row in size.get("readers", []):
            lines.append(f"| {size['model']} | {row['path']} | {row['open_seconds']:.2f} | "
                         f"{row['seconds']:.1f} | "
                         f"{(row['peak_rss'] - row['baseline_rss']) / 2**20:.0f} |")
    skipped = report.get("skipped") or []
    if skipped:
        lines += ["", "Not run: " + "; ".join(skipped)]
    return "\n".join(lines) + "\n"


def main(argv: Optional[List[str]] = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m fusion_bench_ace.bench.llm",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny shapes, for tests")
    parser.add_argument("--config", default=None, help="default: bench/llm.yaml of the configs")
    parser.add_argument("--out", default=None, help="output folder (default: config's out)")
    parser.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        kind, paths, settings, out = args.worker
        settings = json.loads(settings)
        torch.set_num_threads(settings["threads"])
        print(json.dumps(worker(kind, json.loads(paths), settings, out or None)))
        return {}
    settings = load_settings(args.config)
    mode = "tiny" if args.tiny else "llm"
    torch.set_num_threads(settings["threads"])
    argv_used = sys.argv[1:] if argv is None else list(argv)
    header = {
        "mode": mode,
        **provenance.collect(" ".join(["python -m fusion_bench_ace.bench.llm", *argv_used]),
                             "cpu"),
        "settings_file": settings["config_file"],
        "load_start": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        **{k: settings[k] for k in ("eps", "tau", "k_frac", "exclude_keys", "dtype",
                                    "max_shard_size", "threads")},
    }
    sizes = [bench_size(run["model"], run, settings) for run in settings["modes"][mode]["runs"]]
    header["load_end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    report = {"header": header, "sizes": sizes,
              "skipped": settings["modes"][mode].get("not_run", [])}
    text = render(report)
    print(text)
    out = Path(args.out or settings["out"]).resolve()
    out.mkdir(parents=True, exist_ok=True)
    (out / f"llm_bench_{mode}.md").write_text(text)
    (out / f"llm_bench_{mode}.json").write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {out / f'llm_bench_{mode}.md'} and .json")
    return report


if __name__ == "__main__":
    main()
