"""fusion_bench_ace: data-free and test-time model merging methods for FusionBench.

Every name below is imported on first access (PEP 562): importing the package (or a light
submodule such as :mod:`fusion_bench_ace.paths`, which the Hydra plugin reads) imports neither
torch nor FusionBench, and importing the merge math never imports FusionBench.
"""

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

# name -> module holding it
_LAZY = {
    "ace_merge_layer": "fusion_bench_ace.methods.ace",
    "ace_merge_layer_with_info": "fusion_bench_ace.methods.ace",
    "heterogeneity": "fusion_bench_ace.methods.ace",
    "ACEMerging": "fusion_bench_ace.algorithms.ace",
    "TaskArithmeticNANAlgorithm": "fusion_bench_ace.algorithms.nan",
    "TiesMergingNANAlgorithm": "fusion_bench_ace.algorithms.nan",
    "SyMergeAlgorithm": "fusion_bench_ace.algorithms.symerge",
    "SyMergeCLIPVisionModel": "fusion_bench_ace.algorithms.symerge",
}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'fusion_bench_ace' has no attribute {name!r}")
