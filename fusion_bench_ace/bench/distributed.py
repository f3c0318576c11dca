"""One ACE merge across processes: wall time and load balance against one process.

``python -m fusion_bench_ace.bench.distributed [--model NAME | --tiny] [--out DIR]`` (settings:
``config/bench/distributed.yaml``) writes synthetic GPT-2- or Llama-shaped experts (``T`` of
them, random weights as :func:`fusion_bench_ace.bench.llm.write_synthetic_checkpoints` makes
them), then, for
each number of processes N, runs ``ACEMerging.merge_to_checkpoint`` under
``torchrun --standalone --nproc-per-node N`` (gloo, one torch thread per process, every merged
tensor written straight to its shard) and reports per N: the merge's wall time (the slowest rank's
``merge_to_checkpoint``), the speed-up over one process, per rank the time spent in ACE's per-matrix
math and the number of tensors, the load balance (max/min over ranks of that time, and of the
estimated work that decided the partition), and whether the checkpoint is byte-identical to one
process's, and each rank's peak anonymous memory. The machine's load average before and after
each run says how shared it was. Results go to a new folder (``--out``, default
``outputs/bench/distributed/<model>-<time>``), never over an existing one.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

from .. import provenance
from ..paths import PACKAGE_DIR, config_dir
from .output import new_output_dir


def load_settings(path: Optional[str | Path] = None) -> dict:
    from omegaconf import OmegaConf

    path = Path(path) if path else config_dir() / "bench" / "distributed.yaml"
    try:  # results name the settings file relative to the checkout, never the machine's path
        shown = str(path.resolve().relative_to(PACKAGE_DIR.parent))
    except ValueError:
        shown = path.name
    return {"config_file": shown, **OmegaConf.to_container(OmegaConf.load(path), resolve=True)}


def model_shapes(entry: dict):
    """``({name: shape}, config)`` of a ``models`` entry of the settings (GPT-2 or Llama)."""
    if entry["arch"] == "gpt2":
        return gpt2_shapes(entry["spec"])
    from .llm import llama_config, state_shapes

    return state_shapes(entry["spec"]), llama_config(entry["spec"])


def gpt2_shapes(spec: dict):
    """``({name: shape}, config)`` of a GPT-2 LM of ``spec`` as its checkpoint stores it (the
    head is tied to ``wte``; buffers are not stored)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(**spec)
    with torch.device("meta"):
        model = GPT2LMHeadModel(config)
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}  # no tied duplicate
    return shapes, config


# --- one process of the merge (under torchrun) --------------------------------------------------


def worker(paths: Dict[str, str], settings: dict, out: str, result_dir: str) -> None:
    import torch
    from fusion_bench.modelpool import CausalLMPool

    from ..algorithms.ace import ACEMerging
    from ..memory import MemorySampler

    torch.set_num_threads(settings["threads"])
    method = ACEMerging(eps=settings["eps"], tau=settings["tau"], k_frac=settings["k_frac"],
                        exclude_keys=settings["exclude_keys"], diagnostics=False,
                        streaming="true")
    build, matrix_times = method.build_method, []

    def timed_build(expert_names):
        unit = build(expert_names)
        merge = unit.merge

        def timed_merge(name, task_vectors, base):
            start = time.perf_counter()
            merged = merge(name, task_vectors, base)
            matrix_times.append((list(merged.shape), time.perf_counter() - start))
            return merged

        unit.merge = timed_merge
        return unit

    method.build_method = timed_build
    pool = CausalLMPool(models=dict(paths), tokenizer=None,
                        model_kwargs={"torch_dtype": settings["dtype"]})
    with MemorySampler() as memory:
        start = time.perf_counter()
        method.merge_to_checkpoint(pool, out, max_shard_size=settings["max_shard_size"])
        seconds = time.perf_counter() - start
    rank = int(os.environ.get("RANK", "0"))
    partition = method.partition or {"rank": 0, "world_size": 1, "work_per_rank": None,
                                     "tensors": None}
    record = {**partition, "rank": rank, "merge_seconds": seconds,
              "ace_matrix_seconds": sum(t for _, t in matrix_times), "matrix_times": matrix_times,
              "ace_matrices": len(matrix_times),
              "torch_threads": torch.get_num_threads(), **memory.mib()}
    Path(result_dir, f"rank_{rank}.json").write_text(json.dumps(record))


# --- the benchmark ------------------------------------------------------------------------------


def file_digests(directory: Path) -> Dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.iterdir()) if p.is_file()}


def run_processes(count: int, paths: Dict[str, str], settings: dict, root: Path) -> dict:
    run = tempfile.mkdtemp(prefix=f"{count}_processes_", dir=root)  # a count may be run again
    out, results = Path(run) / "merged", Path(run) / "ranks"
    results.mkdir()
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    command = [torchrun, "--standalone", "--nproc-per-node", str(count), "-m",
               "fusion_bench_ace.bench.distributed", "--worker", json.dumps(paths),
               json.dumps(settings), str(out), str(results)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "OMP_NUM_THREADS": str(settings["threads"])}
    load_before = os.getloadavg()
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env,
                          cwd=PACKAGE_DIR.parent, timeout=settings["worker_timeout_s"])
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"torchrun with {count} process(es) failed:\n"
                           f"{(done.stdout + done.stderr)[-4000:]}")
    ranks = sorted((json.loads(p.read_text()) for p in results.glob("rank_*.json")),
                   key=lambda r: r["rank"])
    return {"processes": count, "command_seconds": wall, "load_before": load_before,
            "load_after": os.getloadavg(), "ranks": ranks,
            "merge_seconds": max(r["merge_seconds"] for r in ranks),
            "digests": file_digests(out)}


def measure(settings: dict, model: str, log=print) -> dict:
    shapes, config = model_shapes(settings["models"][model])
    from .llm import write_synthetic_checkpoints

    with tempfile.TemporaryDirectory(prefix="ace_bench_distributed_",
                                     dir=settings.get("scratch")) as scratch:
        root = Path(scratch)
        start = time.perf_counter()
        paths = write_synthetic_checkpoints(root / "pool", shapes, config, settings["tasks"],
                                            settings)
        log(f"[bench distributed] {model}: {sum(_numel(s) for s in shapes.values()) / 1e6:.0f} M "
            f"parameters, wrote {settings['tasks'] + 1} checkpoints in "
            f"{time.perf_counter() - start:.0f} s")
        runs = []
        for count in settings["processes"]:
            runs.append(run_processes(count, paths, settings, root))
            log(f"[bench distributed]   {count} process(es): merge "
                f"{runs[-1]['merge_seconds']:.1f} s")
    return {"model": model, "spec": settings["models"][model]["spec"], "runs": runs}


def _numel(shape) -> int:
    count = 1
    for size in shape:
        count *= size
    return count


def _ratio(values: List[float]) -> str:
    return "–" if not values or min(values) <= 0 else f"{max(values) / min(values):.3f}"


def render(report: dict) -> str:
    header = report["header"]
    result = report["result"]
    settings = report["settings"]
    first = result["runs"][0]
    lines = [
        f"# One ACE merge across processes: {result['model']}-shaped experts, "
        f"T = {settings['tasks']}",
        "",
        *provenance.markdown_lines(header),
        f"- settings: `{settings['config_file']}`; model `{result['spec']}`, "
        f"{settings['dtype']}, eps {settings['eps']}, tau {settings['tau']}, "
        f"k_frac {settings['k_frac']}, {settings['threads']} torch thread(s) per process, gloo",
        "- the machine is shared with other users: the load average (1, 5, 15 min) before and "
        "after each run says how busy it was; every process ran under that contention",
        "",
        "| processes | merge s | speed-up | ACE math s per rank | tensors per rank | "
        "max/min ACE math s | max/min estimated work | same bytes as 1 process | "
        "peak anon MiB per rank | load before | load after |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for run in result["runs"]:
        ranks = run["ranks"]
        estimated = ranks[0]["work_per_rank"] or []
        lines.append(
            f"| {run['processes']} | {run['merge_seconds']:.1f} | "
            f"{first['merge_seconds'] / run['merge_seconds']:.2f}x | "
            + " / ".join(f"{r['ace_matrix_seconds']:.1f}" for r in ranks) + " | "
            + " / ".join(str(r["tensors"] if r["tensors"] is not None else "all")
                         for r in ranks) + " | "
            + _ratio([r["ace_matrix_seconds"] for r in ranks]) + " | "
            + (_ratio(estimated) if estimated else "–") + " | "
            + ("yes" if run["digests"] == first["digests"] else "**no**") + " | "
            + " / ".join(f"{r.get('peak_anon_mib') or 0:.0f}" for r in ranks) + " | "
            + " / ".join(f"{x:.1f}" for x in run["load_before"]) + " | "
            + " / ".join(f"{x:.1f}" for x in run["load_after"]) + " |"
        )
    lines += [
        "",
        "`merge s`: the slowest rank's `ACEMerging.merge_to_checkpoint` (reading the experts, the "
        "merge, writing the shards; not the processes' start-up). `ACE math s`: time in ACE's "
        "per-matrix function on that rank. `estimated work`: the multiply-adds the partition "
        "balanced (T d_out d_in² per ACE matrix, T numel per averaged tensor). "
        "`same bytes`: every file of the checkpoint has the SHA-256 of one process's.",
        "",
        *_cost_model_lines(result["runs"], settings["tasks"]),
    ]
    return "\n".join(lines)


def _cost_model_lines(runs: List[dict], num_tasks: int) -> List[str]:
    """ACE's time per matrix shape (median over the 1-process runs' matrices) against the
    partition's estimate: the check of :meth:`fusion_bench_ace.methods.ace.ACE.cost`."""
    from ..methods.ace import ACE, ACEOptions

    unit = ACE(ACEOptions())

    def matrix_cost(shape, tasks):
        return unit.cost(shape, tasks)

    times: Dict[tuple, List[float]] = {}
    for run in runs:
        if run["processes"] == 1:
            for shape, seconds in run["ranks"][0].get("matrix_times", []):
                times.setdefault(tuple(shape), []).append(seconds)
    if not times:
        return []
    rates = {shape: statistics.median(t) / matrix_cost(shape, num_tasks) * 1e9
             for shape, t in times.items()}
    reference = statistics.median(rates.values())
    lines = ["Time per ACE matrix (1 process; median over its matrices and runs) against the "
             "estimated work:", "",
             "| shape (d_out x d_in) | matrices per run | s | estimated Gmul-add | "
             "s per estimated Gmul-add | relative to the median |", "|---|---|---|---|---|---|"]
    runs_with_one = sum(1 for run in runs if run["processes"] == 1)
    for shape in sorted(times, key=lambda s: -matrix_cost(s, num_tasks)):
        lines.append(f"| {shape[0]} x {shape[1]} | {len(times[shape]) // runs_with_one} | "
                     f"{statistics.median(times[shape]):.2f} | "
                     f"{matrix_cost(shape, num_tasks) / 1e9:.1f} | {rates[shape]:.4f} | "
                     f"{rates[shape] / reference:.2f} |")
    return [*lines, ""]


def main(argv: Optional[List[str]] = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "--worker":
        worker(json.loads(argv[1]), json.loads(argv[2]), argv[3], argv[4])
        return {}
    parser = argparse.ArgumentParser(prog="python -m fusion_bench_ace.bench.distributed",
                                     description=__doc__)
    parser.add_argument("--settings", help="default: config/bench/distributed.yaml")
    parser.add_argument("--model", help="a model of the settings (default: its `model`)")
    parser.add_argument("--tiny", action="store_true", help="the tiny model (a quick check)")
    parser.add_argument("--out", help="a new folder (default outputs/bench/distributed/...)")
    parser.add_argument("--processes", type=int, nargs="+",
                        help="numbers of processes, in the order run (default: the settings'); "
                        "repeat one (1 2 1) to see how much the machine's load moved")
    args = parser.parse_args(argv)
    settings = load_settings(args.settings)
    if args.processes:
        settings["processes"] = args.processes
    model = args.model or settings["tiny_model" if args.tiny else "model"]
    settings.update(settings["models"][model].get("settings", {}))
    out = new_output_dir(args.out, "distributed", model)
    header = provenance.collect(
        " ".join(["python -m fusion_bench_ace.bench.distributed", *argv]))
    report = {"header": header, "settings": settings, "result": measure(settings, model)}
    text = render(report)
    stem = f"distributed_{model}_T{settings['tasks']}"
    (out / f"{stem}.json").write_text(json.dumps(report, indent=1))
    (out / f"{stem}.md").write_text(text)
    print(text)
    return report


if __name__ == "__main__":
    main()
