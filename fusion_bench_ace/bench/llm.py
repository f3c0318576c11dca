"""Merging causal LMs at the scale people merge: time against the floor, memory as it fails.

``python -m fusion_bench_ace.bench.llm [--mode scale|peer|memory|tiny] [--models NAME ...]
[--out DIR] [--scratch DIR] [--mergekit PATH]`` (settings: ``config/bench/llm.yaml``) writes
synthetic Llama-shaped bf16 experts as sharded safetensors checkpoints (random weights, expert
``t`` = pretrained + noise of its own scale; generated and written tensor by tensor) into a scratch
directory it creates, then runs, each in a fresh process with its resident (RSS) and anonymous
(``RssAnon``) memory sampled every 5 ms from outside (:mod:`fusion_bench_ace.memory`):

- ``stream``: the command users run, ``fusion_bench --config-name ace_model_fusion
  method=ace_llama modelpool=<the pool> '~taskpool' merged_model_save_path=DIR`` (every model read
  tensor by tensor, every merged tensor written to its shard at once), one torch thread; its
  ``merge_stats.json`` gives the merge's own time and memory;
- ``floor``: the operations no ACE implementation avoids, timed in the same run: reading every
  tensor the merge reads (bf16 to float32 task vectors), the ``T`` Gram products ``WᵀW``
  (``torch.mm``, float32) and the Cholesky factorisation of one ``d_in x d_in`` system for every
  matrix ACE merges;
- ``mergekit_ties`` (mode ``peer``, with ``--mergekit``): MergeKit's TIES through its own
  ``mergekit-yaml`` (its own virtual environment), ``--lazy-unpickle --out-shard-size 1B``, one
  thread, the same experts; each tool also runs on a tiny model, whose peak is its start-up.

Mode ``memory`` runs ``stream`` on Llamas of one width and growing depth: anonymous memory must
not grow with the model. Results go to ``--out`` (default ``outputs/bench/llm/<mode>-<time>``; an
existing directory is refused), the scratch directory is removed at the end unless
``--keep-scratch``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch

from .. import provenance
from ..memory import ProcessTreeSampler
from ..paths import PACKAGE_DIR, config_dir
from .output import new_output_dir

MIB = 2**20
RUNS = ("stream", "floor", "mergekit_ties")


def load_settings(path: Optional[str | Path] = None) -> dict:
    from omegaconf import OmegaConf

    path = Path(path) if path else config_dir() / "bench" / "llm.yaml"
    try:  # results name the settings file relative to the checkout, never the machine's path
        shown = str(path.resolve().relative_to(PACKAGE_DIR.parent))
    except ValueError:
        shown = path.name
    return {"config_file": shown, **OmegaConf.to_container(OmegaConf.load(path), resolve=True)}


def llama_config(spec: dict):
    from transformers import LlamaConfig

    return LlamaConfig(**spec, max_position_embeddings=2048, tie_word_embeddings=False,
                       architectures=["LlamaForCausalLM"])


def state_shapes(spec: dict) -> Dict[str, tuple]:
    """``{name: shape}`` of the Llama ``spec`` (a meta-device model: no memory)."""
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        state = LlamaForCausalLM(llama_config(spec)).state_dict()
    return {name: tuple(tensor.shape) for name, tensor in state.items()}


def _numel(shape) -> int:
    count = 1
    for size in shape:
        count *= size
    return count


def ace_unit(settings: dict):
    """The :class:`~fusion_bench_ace.methods.ace.ACE` unit of the bench's method preset (its
    plan and its costs: which matrices the floor times)."""
    from ..bench.tracks import method_settings
    from ..engine.selection import NamePatterns
    from ..methods.ace import ACE, ACEOptions

    preset = method_settings(settings["method"])
    options = ACEOptions(**{key: preset[key] for key in (
        "eps", "tau", "k_frac", "eps_mode", "eps_rel", "gamma_mode", "tau_scale_free",
        "precision")})
    return ACE(options, exclude=NamePatterns.compile(preset["exclude_keys"], "exclude_keys"),
               average=NamePatterns.compile(preset["average_keys"], "average_keys"))


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


# --- the floor (a worker process) -----------------------------------------------------------------


def floor(paths: Dict[str, str], settings: dict) -> dict:
    """Seconds of reading every tensor the merge reads, of the ``T`` Gram products and of one
    Cholesky factorisation per ACE matrix (one thread, float32)."""
    from ..engine.driver import plan_parameters, stacked_task_vectors
    from ..engine.io.reader import open_checkpoint

    dtype = getattr(torch, settings["dtype"])
    pretrained = open_checkpoint(paths["_pretrained_"], dtype)
    experts = {name: open_checkpoint(path, dtype) for name, path in paths.items()
               if name != "_pretrained_"}
    unit = ace_unit(settings)
    plan = plan_parameters(pretrained.meta(), unit)
    seconds = {"read": 0.0, "gram": 0.0, "factor": 0.0}
    ridge = unit.options.eps
    for name in pretrained:
        start = time.perf_counter()
        base = pretrained[name]
        if name in plan.skip:
            seconds["read"] += time.perf_counter() - start
            continue
        stacked = stacked_task_vectors(name, base, experts, device=torch.device("cpu"),
                                       dtype=torch.float32)
        seconds["read"] += time.perf_counter() - start
        if name not in plan.merge:
            continue
        start = time.perf_counter()
        n = stacked.shape[2]
        gram = torch.zeros(n, n)
        for task_vector in stacked.unbind(0):
            gram.add_(torch.mm(task_vector.T, task_vector))
        seconds["gram"] += time.perf_counter() - start
        gram.diagonal().add_(ridge * float(gram.diagonal().mean()) + ridge)
        start = time.perf_counter()
        torch.linalg.cholesky_ex(gram)
        seconds["factor"] += time.perf_counter() - start
        del stacked, gram
    return {**seconds, "seconds": sum(seconds.values()), "matrices": len(plan.merge)}


# --- the runs (each a fresh process, memory sampled from outside) --------------------------------


def _sampled(command: List[str], env: dict, cwd: Optional[str] = None,
             timeout: Optional[float] = None) -> dict:
    """Run ``command`` with its process tree's memory sampled; its last stdout line (JSON, if
    any) is merged into the result."""
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env=env, cwd=cwd)
    with ProcessTreeSampler(process.pid) as memory:
        stdout, stderr = process.communicate(timeout=timeout)
    wall = time.perf_counter() - start
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(command[:3])} ... failed:\n{(stdout + stderr)[-4000:]}")
    row = {"wall_seconds": wall, "peak_rss_mib": memory.peak["rss"] / MIB,
           "peak_anon_mib": (memory.peak["anon"] or 0) / MIB}
    lines = stdout.strip().splitlines()
    if lines and lines[-1].startswith("{"):
        row.update(json.loads(lines[-1]))
    return row


def _env(settings: dict) -> dict:
    threads = str(settings["threads"])
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
            "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}


def run_stream(paths: Dict[str, str], settings: dict, root: Path) -> dict:
    """The streamed ACE merge through ``fusion_bench`` (the command users run)."""
    pool = {"_target_": "fusion_bench.modelpool.CausalLMPool", "models": paths,
            "tokenizer": None, "model_kwargs": {"torch_dtype": settings["dtype"]}}
    configs = root / "config"
    (configs / "modelpool").mkdir(parents=True, exist_ok=True)
    (configs / "modelpool" / "bench_llm_pool.yaml").write_text(json.dumps(pool))
    log_dir, merged = root / "stream_log", root / "merged"
    command = [str(Path(sys.executable).with_name("fusion_bench")), "--config-name",
               "ace_model_fusion", "--config-dir", str(configs), f"method={settings['method']}",
               "modelpool=bench_llm_pool", "~taskpool", f"path.log_dir={log_dir}",
               f"merged_model_save_path={merged}",
               f"+merged_model_save_kwargs.max_shard_size={settings['max_shard_size']}",
               *[f"method.{item}" for item in settings.get("method_overrides", [])]]
    row = _sampled(command, _env(settings), timeout=settings["worker_timeout_s"])
    stats = json.loads((log_dir / "merge_stats.json").read_text())
    row.update({"merge_seconds": stats["merge_seconds"],
                "merge_peak_anon_mib": stats["peak_anon_mib"],
                "merge_start_anon_mib": stats["start_anon_mib"],
                "merge_peak_rss_mib": stats["peak_rss_mib"],
                "merge_start_rss_mib": stats["start_rss_mib"]})
    shutil.rmtree(merged, ignore_errors=True)
    shutil.rmtree(log_dir, ignore_errors=True)
    return row


def run_floor(paths: Dict[str, str], settings: dict) -> dict:
    command = [sys.executable, "-m", "fusion_bench_ace.bench.llm", "--worker", "floor",
               json.dumps(paths), json.dumps(settings)]
    return _sampled(command, _env(settings), cwd=str(PACKAGE_DIR.parent),
                    timeout=settings["worker_timeout_s"])


MERGEKIT_TIES = """merge_method: ties
base_model: {base}
models:
{models}
parameters: {{normalize: false}}
dtype: {dtype}
"""


def run_mergekit(mergekit: str, paths: Dict[str, str], settings: dict, root: Path) -> dict:
    """MergeKit's TIES (weight 0.3 and density 0.2 per expert: FusionBench's TIES defaults)."""
    models = "\n".join(f"  - model: {path}\n    parameters: {{weight: 0.3, density: 0.2}}"
                       for name, path in paths.items() if name != "_pretrained_")
    config = root / "mergekit_ties.yml"
    config.write_text(MERGEKIT_TIES.format(base=paths["_pretrained_"], models=models,
                                           dtype=settings["dtype"]))
    out = root / "mergekit_out"
    command = [mergekit, str(config), str(out), "--lazy-unpickle", "--out-shard-size", "1B",
               "--no-copy-tokenizer"]
    row = _sampled(command, _env(settings), timeout=settings["worker_timeout_s"])
    row["merge_seconds"] = row["wall_seconds"]
    shutil.rmtree(out, ignore_errors=True)
    return row


def bench_model(name: str, runs: List[str], settings: dict, scratch: Path, mergekit=None,
                log=print) -> dict:
    spec = settings["models"][name]
    shapes = state_shapes(spec)
    unit = ace_unit(settings)
    num_params = sum(_numel(shape) for shape in shapes.values())
    merged = [shapes[n] for n in shapes if len(shapes[n]) == 2 and
              unit.treatment(n, shapes[n], torch.float32) == "merge"]
    result = {"model": name, "spec": spec, "num_parameters": num_params,
              "ace_matrices": len(merged), "largest_merged_shape": max(merged, key=_numel),
              "tasks": settings["tasks"], "rows": {}}
    root = scratch / name
    start = time.perf_counter()
    paths = write_synthetic_pool(root / "pool", spec, settings["tasks"], settings)
    log(f"[bench llm] {name}: {num_params / 1e9:.2f} B parameters, wrote "
        f"{settings['tasks'] + 1} checkpoints in {time.perf_counter() - start:.0f} s")
    for run in runs:
        if run == "stream":
            row = run_stream(paths, settings, root)
        elif run == "floor":
            row = run_floor(paths, settings)
        elif run == "mergekit_ties":
            if mergekit is None:
                continue
            row = run_mergekit(mergekit, paths, settings, root)
        else:
            raise ValueError(f"unknown run {run!r}; expected one of {RUNS}")
        result["rows"][run] = row
        log(f"[bench llm]   {run}: {row.get('merge_seconds', row.get('seconds', 0)):.1f} s, "
            f"peak anonymous {row['peak_anon_mib']:.0f} MiB, RSS {row['peak_rss_mib']:.0f} MiB")
    shutil.rmtree(root, ignore_errors=True)
    return result


# --- the report --------------------------------------------------------------------------------


def _cell(value, digits=1) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def render(report: dict) -> str:
    header, settings = report["header"], report["settings"]
    lines = [
        f"# Merging causal LMs ({header['mode']}): time against the floor, memory as it fails",
        "",
        *provenance.markdown_lines(header),
        f"- settings: `{settings['config_file']}`, mode `{header['mode']}`; method "
        f"`{settings['method']}` {settings.get('method_overrides') or ''}, T = "
        f"{settings['tasks']} synthetic experts in {settings['dtype']}, "
        f"{settings['threads']} torch thread(s) per process",
        f"- load average (1, 5, 15 min) at start {header['load_start']}, at end "
        f"{header['load_end']}",
        "",
        "Memory is the process tree's, sampled every 5 ms from outside: RSS counts the file pages "
        "of memory-mapped checkpoints, which the kernel can drop; anonymous memory (`RssAnon`) is "
        "what runs a machine out of memory. `merge s` is the merge alone (`merge_stats.json`: "
        "reading, merging, writing; not the start-up); the floor is reading + the T Gram "
        "products + one Cholesky factorisation per ACE matrix.",
        "",
        "| model | parameters | ACE matrices | run | merge s | wall s | merge / floor | "
        "peak anon MiB | peak RSS MiB | in-process anon at start / peak MiB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for result in report["models"]:
        rows = result["rows"]
        floor_s = rows.get("floor", {}).get("seconds")
        for run, row in rows.items():
            seconds = row.get("merge_seconds", row.get("seconds"))
            inside = ("–" if "merge_start_anon_mib" not in row else
                      f"{row['merge_start_anon_mib']:.0f} / {row['merge_peak_anon_mib']:.0f}")
            ratio = (f"{seconds / floor_s:.2f}" if floor_s and run != "floor" and seconds
                     else "–")
            lines.append(
                f"| {result['model']} | {result['num_parameters'] / 1e9:.2f} B | "
                f"{result['ace_matrices']} | {run} | {_cell(seconds)} | "
                f"{_cell(row['wall_seconds'])} | {ratio} | {row['peak_anon_mib']:.0f} | "
                f"{row['peak_rss_mib']:.0f} | {inside} |")
    floors = [(r["model"], r["rows"]["floor"]) for r in report["models"] if "floor" in r["rows"]]
    if floors:
        lines += ["", "The floor's parts (s):", "", "| model | read | T Gram products | "
                  "factorisations | total |", "|---|---|---|---|---|"]
        for model, row in floors:
            lines.append(f"| {model} | {row['read']:.1f} | {row['gram']:.1f} | "
                         f"{row['factor']:.1f} | {row['seconds']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[List[str]] = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m fusion_bench_ace.bench.llm",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", default="scale", help="a mode of the settings (scale, peer, "
                        "memory, tiny)")
    parser.add_argument("--models", nargs="*", help="only these models of the mode")
    parser.add_argument("--config", default=None, help="default: bench/llm.yaml of the configs")
    parser.add_argument("--out", default=None,
                        help="output folder (default outputs/bench/llm/<mode>-<time>)")
    parser.add_argument("--scratch", default=None, help="where the synthetic checkpoints go "
                        "(a new folder is made inside; default: the system's temp dir)")
    parser.add_argument("--keep-scratch", action="store_true")
    parser.add_argument("--mergekit", default=None,
                        help="mergekit-yaml of a MergeKit environment (mode peer)")
    parser.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        kind, paths, settings = args.worker
        settings = json.loads(settings)
        torch.set_num_threads(settings["threads"])
        if kind != "floor":
            raise ValueError(f"unknown worker {kind!r}")
        print(json.dumps(floor(json.loads(paths), settings)))
        return {}
    settings = load_settings(args.config)
    mode = settings["modes"][args.mode]
    settings.update(mode.get("settings", {}))
    out = new_output_dir(args.out, "llm", args.mode)
    header = {
        "mode": args.mode,
        **provenance.collect(" ".join(["python -m fusion_bench_ace.bench.llm",
                                       *(sys.argv[1:] if argv is None else argv)]), "cpu"),
        "load_start": " ".join(f"{x:.2f}" for x in os.getloadavg()),
    }
    scratch = Path(tempfile.mkdtemp(prefix="ace_bench_llm_", dir=args.scratch))
    results = []
    try:
        for run in mode["runs"]:
            if args.models and run["model"] not in args.models:
                continue
            results.append(bench_model(run["model"], run["paths"], settings, scratch,
                                       mergekit=args.mergekit))
            report = {"header": {**header, "load_end": " ".join(
                f"{x:.2f}" for x in os.getloadavg())}, "settings": settings, "models": results}
            # written after every model: a long run that is stopped keeps what it measured
            (out / "llm_bench.json").write_text(json.dumps(report, indent=1) + "\n")
            (out / "llm_bench.md").write_text(render(report))
    finally:
        if not args.keep_scratch:
            shutil.rmtree(scratch, ignore_errors=True)
    print((out / "llm_bench.md").read_text() if results else "nothing run")
    print(f"wrote {out}")
    return report if results else {}


if __name__ == "__main__":
    main()
