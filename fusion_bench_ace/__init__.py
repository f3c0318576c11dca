"""fusion_bench_ace: data-free and test-time model merging methods for FusionBench.

The merge math (``fusion_bench_ace.ace`` and friends) imports only torch. The FusionBench
algorithm classes are exported lazily, so importing the math never imports FusionBench.
"""

from importlib import import_module
from typing import Any

from .ace import ace_merge_layer, ace_merge_layer_with_info, heterogeneity

__version__ = "0.1.0"

# name -> module holding it; imported on first access (PEP 562)
_LAZY = {
    "ACEMerging": "fusion_bench_ace.algorithms.ace",
    "TaskArithmeticNANAlgorithm": "fusion_bench_ace.algorithms.nan",
    "TiesMergingNANAlgorithm": "fusion_bench_ace.algorithms.nan",
    "SyMergeAlgorithm": "fusion_bench_ace.algorithms.symerge",
    "SyMergeCLIPVisionModel": "fusion_bench_ace.algorithms.symerge",
}

__all__ = ["ace_merge_layer", "ace_merge_layer_with_info", "heterogeneity", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'fusion_bench_ace' has no attribute {name!r}")
