"""Speed and memory benchmark of ACE-Merging: ``python -m fusion_bench_ace.bench [--quick|--full]``.

One run, one machine, one table (``results/perf/`` by default, relative to the working
directory; settings in ``config/bench/ace.yaml``):

- **merge time** (:mod:`.layers`) on random task vectors with the real 2-D layer shapes of
  ViT-B/32, ViT-L/14 and GPT-2, of our ACE against a reference-style implementation
  (:mod:`.reference`), FusionBench's TSV-M and the floor of unavoidable operations;
- **memory against T** (:mod:`.memory`): ACEMerging over synthetic GPT-2-style safetensors experts,
  streamed and in memory, one subprocess per number of experts.

``python -m fusion_bench_ace.bench.llm`` (:mod:`.llm`, ``config/bench/llm.yaml``) merges synthetic
Llama-shaped experts of growing size: peak memory of the streamed write, the in-memory path and
FusionBench's Task Arithmetic, and the merge time against the floor.

:mod:`.measure` times calls and samples memory, :mod:`.report` renders the Markdown report,
:mod:`.cli` is the command.
"""

from .cli import load_settings, main
from .layers import IMPLS, bench_model
from .memory import memory_curve
from .reference import reference_ace_layer, reference_ace_merge
from .report import render

__all__ = [
    "IMPLS",
    "bench_model",
    "load_settings",
    "main",
    "memory_curve",
    "reference_ace_layer",
    "reference_ace_merge",
    "render",
]
