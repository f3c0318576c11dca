"""The "individual" row of a comparison: every expert evaluated on every task, in one run."""

from __future__ import annotations

from typing import Dict

from fusion_bench import BaseAlgorithm, BaseModelPool
from torch import nn


class IndividualExperts(BaseAlgorithm):
    """Return ``{expert name: expert}``; FusionBench then evaluates each on the whole task pool.

    The report maps each expert to its per-task results; the comparison runner reads the
    diagonal (expert ``t`` on task ``t``) as the "individual" accuracy.
    """

    def run(self, modelpool: BaseModelPool) -> Dict[str, nn.Module]:
        if not isinstance(modelpool, BaseModelPool):
            modelpool = BaseModelPool(modelpool)
        return {name: modelpool.load_model(name) for name in modelpool.model_names}
