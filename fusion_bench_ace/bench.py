"""Speed and memory benchmark of ACE-Merging: ``python -m fusion_bench_ace.bench [--quick|--full]``.

One run, one machine, one table (saved to ``results/perf/``):

- **Merge time** on random task vectors with the real 2-D layer shapes of ViT-B/32, ViT-L/14 and
  GPT-2 (``config/bench/ace.yaml``), for ``T`` tasks, of

  - ``ours``: :func:`fusion_bench_ace.ace.ace_merge_layer`;
  - ``reference``: :mod:`fusion_bench_ace.bench_reference`, structured like the authors' code
    (per-task products, explicit inverse, traces via full ``WᵀW``, full SVD);
  - ``tsvm``: FusionBench's TSV-M merge math (``TSVM_utils.compute_and_sum_svd_mem_reduction``),
    a different method, timed on the same task vectors;
  - ``floor``: the unavoidable operations alone: one ``n x n`` Gram product per task, one
    Cholesky solve of the ``n x n`` system for the ``m x n`` right-hand side, one thin SVD per
    heterogeneous layer;
  - ``floor_wsigma``: ``floor`` plus one ``W_t Σ_t`` product per task, which Eq. 14's numerator
    ``Σ_t W̃_t Σ_t,reg`` needs and no algebra removes (``W̃_t Σ̂_t = W̃_t W̃_tᵀ W̃_t`` is cubic per task).

  All implementations run interleaved on the same tensors (rotating order, ``repeats`` times,
  median). Each unique shape is merged once homogeneous (equal task scales) and once
  heterogeneous (scales spread over two decades, γ > τ); a model's time is
  ``Σ count × mean(homogeneous, heterogeneous)`` over its unique shapes. Also reported: peak extra
  memory during one layer's merge (RSS sampled every ms on CPU; ``max_memory_allocated`` on CUDA)
  and the max over layers of ``‖X - ours‖_F / ‖ours‖_F``.
- **Memory against T**: synthetic GPT-2-style experts written as ``save_pretrained`` safetensors
  checkpoints; :class:`fusion_bench_ace.ACEMerging` run in a fresh subprocess per ``T`` with
  ``streaming=true`` and ``streaming=false``; peak RSS from ``resource.getrusage``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor

from .paths import PACKAGE_DIR, config_dir

IMPLS = ("ours", "reference", "tsvm", "floor", "floor_wsigma")
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


# --------------------------------------------------------------------------- implementations


def _ours(stacked: Tensor, eps: float, tau: float, k_frac: float) -> Tensor:
    from .ace import ace_merge_layer

    return ace_merge_layer(stacked, eps, tau, k_frac)


def _reference(stacked: Tensor, eps: float, tau: float, k_frac: float) -> Tensor:
    from .bench_reference import reference_ace_layer

    return reference_ace_layer(list(stacked.unbind(0)), eps, tau, k_frac, stacked.device)


def _tsvm(stacked: Tensor, eps: float, tau: float, k_frac: float) -> Tensor:
    from fusion_bench.method.task_singular_vector.utils.TSVM_utils import (
        compute_and_sum_svd_mem_reduction,
    )

    task_vectors = [{"weight": tv} for tv in stacked.unbind(0)]
    with contextlib.redirect_stdout(io.StringIO()):  # it prints one line per layer
        merged = compute_and_sum_svd_mem_reduction(task_vectors, accelerator=stacked.device)
    return merged["weight"]


def _floor(stacked: Tensor, eps: float, tau: float, k_frac: float, *, wsigma=False,
           heterogeneous=False) -> Tensor:
    _, m, n = stacked.shape
    sigma = torch.zeros(n, n, dtype=stacked.dtype, device=stacked.device)
    numerator = torch.zeros(m, n, dtype=stacked.dtype, device=stacked.device) if wsigma else None
    for x in stacked.unbind(0):
        if not wsigma:
            sigma.addmm_(x.T, x)  # the Gram product, accumulated
        elif 2 * m < n:  # as ours: column Gram into the sum, W Σ as (W Wᵀ) W
            sigma.addmm_(x.T, x)
            numerator.addmm_(x @ x.T, x)
        else:
            gram = x.T @ x
            sigma.add_(gram)
            numerator.addmm_(x, gram)
    sigma.diagonal().add_(eps * stacked.shape[0])
    rhs = numerator if wsigma else stacked[0]  # any m x n right-hand side: same cost
    factor, _ = torch.linalg.cholesky_ex(sigma)
    solved = torch.cholesky_solve(rhs.T, factor).T
    if heterogeneous:
        u, s, vh = torch.linalg.svd(solved, full_matrices=False)
        k = int(min(m, n) * k_frac)
        solved = solved + s[:k].mean() * (u[:, :k] @ vh[:k])
    return solved


IMPL_FUNCS: Dict[str, Callable] = {"ours": _ours, "reference": _reference, "tsvm": _tsvm}


# --------------------------------------------------------------------------- measurement


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * _PAGE
    except OSError:  # not Linux: the process peak (coarser)
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class _PeakSampler:
    """Peak RSS above the value at entry, sampled every millisecond in a thread (CPU)."""

    def __init__(self):
        self.peak = 0
        self._stop = threading.Event()

    def __enter__(self):
        self.start = _rss_bytes()
        self.peak = self.start
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_bytes())
            time.sleep(0.001)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_bytes())

    @property
    def extra(self) -> int:
        return self.peak - self.start


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _measure(fn: Callable[[], Tensor], device: torch.device):
    """``(result, seconds, peak extra bytes)`` of one call."""
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        start = time.perf_counter()
        result = fn()
        _sync(device)
        seconds = time.perf_counter() - start
        return result, seconds, torch.cuda.max_memory_allocated(device) - before
    with _PeakSampler() as sampler:
        start = time.perf_counter()
        result = fn()
        seconds = time.perf_counter() - start
    return result, seconds, sampler.extra


def _task_vectors(shape, num_tasks, heterogeneous, seed, device) -> Tensor:
    generator = torch.Generator(device=device).manual_seed(seed)
    if heterogeneous:  # three decades of scale: gamma ~ 2-7 >> tau = 0.3 on these shapes
        scales = torch.logspace(-4, -1, num_tasks)
    else:
        scales = torch.full((num_tasks,), 1e-2)
    stacked = torch.randn(num_tasks, *shape, generator=generator, device=device)
    return stacked.mul_(scales.to(device).view(-1, 1, 1))


def _relative_difference(x: Tensor, ours: Tensor) -> float:
    x, ours = x.double(), ours.double()
    return float(torch.linalg.norm(x - ours) / torch.linalg.norm(ours))


def bench_model(model: str, shapes, num_tasks: int, impls: List[str], repeats: int,
                settings: dict, device: torch.device, log=print) -> dict:
    """Interleaved timings of ``impls`` on every unique shape of ``model``, both branches."""
    from .ace import heterogeneity

    eps, tau, k_frac = settings["eps"], settings["tau"], settings["k_frac"]
    warm = _task_vectors((8, 6), 3, True, 0, device)  # imports and first-call set-up, untimed
    for impl in impls:
        IMPL_FUNCS.get(impl, _floor)(warm, eps, tau, k_frac)
    per_impl = {impl: {"seconds": 0.0, "peak_bytes": 0, "rel_diff": 0.0, "rel_diff_by_shape": {},
                       "rel_err_f64": 0.0} for impl in impls}
    with_truth = "reference" in impls  # float64 ours (checked against the naive float64 tests)
    branches = {"homogeneous": 0, "heterogeneous": 0}
    for index, (label, shape, count) in enumerate(shapes):
        for het in (False, True):
            seed = settings["seed"] * 1000 + index * 2 + int(het)
            stacked = _task_vectors(tuple(shape), num_tasks, het, seed, device)
            gamma = heterogeneity(stacked)
            branch_het = gamma > tau
            branches["heterogeneous" if branch_het else "homogeneous"] += count
            funcs = {
                impl: (lambda impl=impl: IMPL_FUNCS[impl](stacked, eps, tau, k_frac))
                if impl in IMPL_FUNCS
                else (lambda impl=impl: _floor(stacked, eps, tau, k_frac,
                                               wsigma=impl == "floor_wsigma",
                                               heterogeneous=branch_het))
                for impl in impls
            }
            times = {impl: [] for impl in impls}
            results = {}
            for repeat in range(repeats):
                order = impls[repeat % len(impls):] + impls[: repeat % len(impls)]
                for impl in order:
                    result, seconds, peak = _measure(funcs[impl], device)
                    times[impl].append(seconds)
                    per_impl[impl]["peak_bytes"] = max(per_impl[impl]["peak_bytes"], peak)
                    if repeat == 0:
                        results[impl] = result
                    del result
            truth = _ours(stacked.double(), eps, tau, k_frac) if with_truth else None
            for impl in impls:
                median = statistics.median(times[impl])
                row = per_impl[impl]
                row["seconds"] += count * median / 2  # mean of the two branches
                if impl in IMPL_FUNCS and impl != "ours":
                    diff = _relative_difference(results[impl], results["ours"])
                    row["rel_diff"] = max(row["rel_diff"], diff)
                    row["rel_diff_by_shape"][label] = max(row["rel_diff_by_shape"].get(label, 0), diff)
                if truth is not None and impl in IMPL_FUNCS:
                    row["rel_err_f64"] = max(row["rel_err_f64"],
                                             _relative_difference(results[impl], truth))
            log(f"  {model} T={num_tasks} {label} {tuple(shape)} "
                f"{'het' if branch_het else 'hom'} (gamma={gamma:.3g}): "
                + ", ".join(f"{i} {statistics.median(times[i]):.3f}s" for i in impls))
            del stacked, results, truth
    return {"model": model, "tasks": num_tasks, "impls": per_impl, "branches": branches,
            "repeats": repeats}


# --------------------------------------------------------------------------- memory vs T


def _write_memory_pool(root: Path, num_tasks: int, spec: dict, seed: int) -> None:
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


def _memory_worker(root: str, num_tasks: int, streaming: str, settings: dict) -> dict:
    """Run in a fresh process: ACEMerging over ``num_tasks`` experts; peak RSS (getrusage)."""
    from fusion_bench import BaseModelPool
    from omegaconf import OmegaConf

    from .algorithms.ace import ACEMerging

    loader = "transformers.GPT2Model.from_pretrained"
    names = ["pretrained"] + [f"expert_{t:02d}" for t in range(num_tasks)]
    models = {("_pretrained_" if n == "pretrained" else n):
              {"_target_": loader, "pretrained_model_name_or_path": str(Path(root) / n)}
              for n in names}
    pool = BaseModelPool(OmegaConf.create(models))
    algorithm = ACEMerging(eps=settings["eps"], tau=settings["tau"], k_frac=settings["k_frac"],
                           diagnostics=False, streaming=streaming)
    with _PeakSampler() as sampler:
        start = time.perf_counter()
        merged = algorithm.run(pool)
        seconds = time.perf_counter() - start
    max_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    model_bytes = sum(p.numel() * p.element_size() for p in merged.state_dict().values())
    layer_bytes = num_tasks * max(p.numel() * p.element_size() for p in merged.state_dict().values())
    return {"layer_task_vectors_bytes": layer_bytes,"tasks": num_tasks, "streaming": streaming, "peak_rss": sampler.peak,
            "baseline_rss": sampler.start, "ru_maxrss": max_rss, "seconds": seconds,
            "model_bytes": model_bytes}


def memory_curve(spec: dict, settings: dict, log=print) -> List[dict]:
    rows = []
    with tempfile.TemporaryDirectory(prefix="ace_bench_mem_") as root:
        _write_memory_pool(Path(root), max(spec["tasks"]), spec, settings["seed"])
        for num_tasks in spec["tasks"]:
            for streaming in ("true", "false"):
                command = [sys.executable, "-m", "fusion_bench_ace.bench", "--memory-worker",
                           root, str(num_tasks), streaming, "--threads", str(settings["threads"])]
                env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
                # run from the directory holding this package, so the worker imports this copy
                done = subprocess.run(command, capture_output=True, text=True, env=env,
                                      cwd=PACKAGE_DIR.parent, timeout=1800)
                if done.returncode != 0:
                    raise RuntimeError(f"memory worker failed:\n{done.stderr[-3000:]}")
                row = json.loads(done.stdout.strip().splitlines()[-1])
                rows.append(row)
                log(f"  memory T={num_tasks} streaming={streaming}: peak RSS "
                    f"{row['peak_rss'] / 2**20:.0f} MiB ({row['seconds']:.1f}s)")
    return rows


# --------------------------------------------------------------------------- report


def machine_info(threads: int, device: torch.device) -> dict:
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__,
            "threads": threads, "device": str(device), "python": platform.python_version()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def git_commit() -> str:
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=PACKAGE_DIR.parent, capture_output=True,
                                text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "fusion_bench_ace"],
                               cwd=PACKAGE_DIR.parent, capture_output=True, text=True).stdout.strip()
        return commit + (" (fusion_bench_ace/ has uncommitted changes)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _mib(n: float) -> str:
    return f"{n / 2**20:.1f}"


def render(report: dict) -> str:
    """The Markdown report (also what is printed)."""
    h = report["header"]
    lines = [
        f"# ACE-Merging benchmark ({h['mode']})",
        "",
        f"- command: `{h['command']}`",
        f"- git commit: {h['commit']}",
        f"- machine: {h['machine']['cpu']}, {h['machine']['cores']} cores, torch "
        f"{h['machine']['torch']}, {h['machine']['threads']} torch thread(s), device "
        f"{h['machine']['device']}" + (f" ({h['machine']['gpu']})" if "gpu" in h["machine"] else ""),
        f"- load average (1/5/15 min) at start: {h['load_start']}, at end: {h['load_end']}",
        f"- date: {h['date']}",
        f"- eps={h['eps']}, tau={h['tau']}, k_frac={h['k_frac']}, float32",
        "",
        "## Merge time (all 2-D layers of the model; interleaved, median of repeats)",
        "",
        "Model time = Σ over unique layer shapes of count × mean(homogeneous instance, "
        "heterogeneous instance): half of each shape's layers in each branch. `rel diff` = max "
        "over layers of ‖X − ours‖_F / ‖ours‖_F (tsvm is a different method: its difference is "
        "not an error). `rel err f64` = the same against ours computed in float64 (runs with "
        "the reference only). `peak MiB` = peak extra memory during one layer's merge "
        + ("(CUDA max_memory_allocated)." if h["machine"]["device"].startswith("cuda")
           else "(RSS sampled every ms)."),
        "",
        "| model | T | impl | time s | × ours | ours / impl | peak MiB | rel diff vs ours "
        "| rel err f64 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for run in report["runs"]:
        ours = run["impls"]["ours"]["seconds"]
        for impl, row in run["impls"].items():
            rel = "" if impl in ("ours", "floor", "floor_wsigma") else f"{row['rel_diff']:.2e}"
            f64 = f"{row['rel_err_f64']:.2e}" if "reference" in run["impls"] and impl in IMPL_FUNCS else ""
            lines.append(
                f"| {run['model']} | {run['tasks']} | {impl} | {row['seconds']:.2f} | "
                f"{row['seconds'] / ours:.2f} | {ours / row['seconds']:.2f} | "
                f"{_mib(row['peak_bytes'])} | {rel} | {f64} |"
            )
    lines += ["", "### Ratios against the targets", ""]
    for run in report["runs"]:
        impls = run["impls"]
        ours = impls["ours"]["seconds"]
        parts = [f"{run['model']} T={run['tasks']}:"]
        if "reference" in impls:
            by_shape = ", ".join(f"{k} {v:.1e}"
                                 for k, v in impls["reference"]["rel_diff_by_shape"].items())
            parts.append(f"reference/ours = {impls['reference']['seconds'] / ours:.2f}x "
                         f"(target >= 2), rel diff {impls['reference']['rel_diff']:.1e} "
                         f"(target <= 1e-4; by shape: {by_shape}; ours vs float64 "
                         f"{impls['ours']['rel_err_f64']:.1e}, reference vs float64 "
                         f"{impls['reference']['rel_err_f64']:.1e});")
        if "tsvm" in impls:
            parts.append(f"tsvm/ours = {impls['tsvm']['seconds'] / ours:.2f}x (target > 1);")
        if "floor" in impls:
            parts.append(f"ours/floor = {ours / impls['floor']['seconds']:.2f} (target <= 1.3);")
        if "floor_wsigma" in impls:
            parts.append(f"ours/floor_wsigma = {ours / impls['floor_wsigma']['seconds']:.2f};")
        parts.append(f"branches: {run['branches']['homogeneous']} hom / "
                     f"{run['branches']['heterogeneous']} het layer instances")
        lines.append("- " + " ".join(parts))
    if report.get("memory"):
        spec = report["memory_spec"]
        lines += [
            "",
            "## Peak memory against the number of experts (ACEMerging, one subprocess each)",
            "",
            f"Synthetic GPT-2-style experts (n_embd={spec['n_embd']}, n_layer={spec['n_layer']}, "
            f"vocab={spec['vocab_size']}; one model = "
            f"{_mib(report['memory'][0]['model_bytes'])} MiB) saved with `save_pretrained` "
            "(safetensors). Peak RSS during `ACEMerging.run` (loading included), sampled every ms; "
            "baseline = RSS after imports, before the run (`getrusage`'s ru_maxrss is not used: "
            "a child started from the benchmark inherits the parent's peak). `T × largest "
            "param` = the task vectors of the largest parameter (the embedding), which the "
            "driver stacks.",
            "",
            "| T | streaming | peak RSS MiB | peak − baseline MiB | (peak − baseline) / model "
            "| T × largest param MiB | merge s |",
            "|---|---|---|---|---|---|---|",
        ]
        for row in report["memory"]:
            extra = row["peak_rss"] - row["baseline_rss"]
            lines.append(
                f"| {row['tasks']} | {row['streaming']} | {_mib(row['peak_rss'])} | {_mib(extra)} "
                f"| {extra / row['model_bytes']:.2f} | {_mib(row['layer_task_vectors_bytes'])} "
                f"| {row['seconds']:.1f} |"
            )
    return "\n".join(lines) + "\n"


def load_settings(path: Optional[str | Path] = None) -> Tuple[Path, dict]:
    """``(settings file, its contents)``; default: ``bench/ace.yaml`` of the package's configs."""
    from omegaconf import OmegaConf

    path = Path(path) if path else config_dir() / "bench" / "ace.yaml"
    return path, OmegaConf.to_container(OmegaConf.load(path), resolve=True)


def main(argv: Optional[List[str]] = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m fusion_bench_ace.bench",
                                     description=__doc__.split("\n\n")[0])
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--quick", dest="mode", action="store_const", const="quick",
                       help="default: ViT-B/32 x 8 all implementations, larger models ours+floor")
    group.add_argument("--full", dest="mode", action="store_const", const="full",
                       help="8, 14, 20 tasks everywhere (long)")
    group.add_argument("--tiny", dest="mode", action="store_const", const="tiny",
                       help="tiny shapes, for tests")
    parser.add_argument("--config", default=None,
                        help="settings file (default: bench/ace.yaml of the package's configs)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: config)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: config)")
    parser.add_argument("--repeats", type=int, default=None, help="override every run's repeats")
    parser.add_argument("--out", default=None, help="output folder (default: config's out)")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory-vs-T curve")
    parser.add_argument("--memory-worker", nargs=3, metavar=("ROOT", "T", "STREAMING"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    config_path, config = load_settings(args.config)
    settings = {k: config[k] for k in ("eps", "tau", "k_frac", "seed", "threads")}
    if args.threads is not None:
        settings["threads"] = args.threads
    torch.set_num_threads(settings["threads"])
    if args.memory_worker:
        root, num_tasks, streaming = args.memory_worker
        print(json.dumps(_memory_worker(root, int(num_tasks), streaming, settings)))
        return {}

    mode = args.mode or "quick"
    device = torch.device(args.device or config["device"])
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda asked for but CUDA is not available")
    spec = config["modes"][mode]
    argv_used = sys.argv[1:] if argv is None else list(argv)
    header = {
        "mode": mode,
        "command": " ".join(["python -m fusion_bench_ace.bench", *argv_used]).strip(),
        "config": str(config_path),
        "commit": git_commit(),
        "machine": machine_info(settings["threads"], device),
        "load_start": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        **{k: settings[k] for k in ("eps", "tau", "k_frac")},
    }
    print(f"ACE benchmark ({mode}) on {header['machine']['cpu']}, threads "
          f"{settings['threads']}, device {device}, load {header['load_start']}", flush=True)
    runs = []
    with torch.no_grad():
        for run in spec["runs"]:
            impls = [i for i in run["impls"] if i in IMPLS]
            repeats = args.repeats or run["repeats"]
            excluded = set(run.get("exclude", ()))
            shapes = [s for s in config["models"][run["model"]] if s[0] not in excluded]
            label = run["model"] + (f" (without {', '.join(sorted(excluded))})" if excluded else "")
            for num_tasks in run["tasks"]:
                runs.append(bench_model(label, shapes, num_tasks, impls, repeats, settings,
                                        device))
    memory = [] if args.no_memory else memory_curve(spec["memory"], settings)
    header["load_end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    report = {"header": header, "runs": runs, "memory": memory, "memory_spec": spec["memory"]}
    text = render(report)
    print()
    print(text)
    out = Path(args.out or config["out"]).resolve()  # relative to the working directory
    out.mkdir(parents=True, exist_ok=True)
    (out / f"ace_bench_{mode}.md").write_text(text)
    (out / f"ace_bench_{mode}.json").write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {out / f'ace_bench_{mode}.md'} and .json")
    return report


if __name__ == "__main__":
    main()
