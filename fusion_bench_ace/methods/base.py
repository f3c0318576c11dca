"""The per-tensor interface every merge method implements, and the registry of methods.

MergeKit-style: a method is a small unit that says how each parameter is merged and merges one
parameter's task vectors at a time. The engine (:mod:`fusion_bench_ace.engine`) walks the
parameters, streams the experts, writes the result and splits the work across processes; it
never needs to know which method it runs. Methods whose merge needs a statistic of the whole
model (NAN's global norms, TIES' per-task magnitude threshold) declare statistics passes: the
engine feeds them every parameter's task vectors once per pass, sums what they return over the
parameters (and over the processes of a distributed merge), and hands back the totals before the
next pass, so memory never holds more than one parameter's task vectors.

No FusionBench import, no I/O.
"""

from __future__ import annotations

from typing import ClassVar, Dict, Mapping, Optional, Sequence, Tuple, Type

import torch
from torch import Tensor

__all__ = ["AVERAGE", "KEEP", "MERGE", "METHODS", "TensorMergeMethod", "register"]

MERGE = "merge"
"""The parameter is merged by the method's :meth:`TensorMergeMethod.merge`."""
AVERAGE = "average"
"""The parameter's task vectors are averaged."""
KEEP = "keep"
"""The parameter keeps its pretrained value (its task vectors are never read)."""


class TensorMergeMethod:
    """A merge method as a per-tensor unit: ``θ = θ_0 + scaling_factor · merge(τ_1..τ_T)``.

    Subclasses set :attr:`name` and implement :meth:`merge`; the rest has defaults: every
    floating-point parameter is merged, no statistics pass, work proportional to the elements.
    """

    name: ClassVar[str] = ""
    statistics_passes: int = 0
    """How many times the engine walks every parameter before merging (:meth:`statistics`); read
    again after each pass, so a method may add passes once it has seen the data."""
    scaling_factor: float = 1.0

    def treatment(self, name: str, shape: Sequence[int], dtype: torch.dtype) -> str:
        """:data:`MERGE`, :data:`AVERAGE` or :data:`KEEP` for one parameter of the pretrained
        model (decided from its name, shape and dtype: no tensor is read)."""
        return MERGE if dtype.is_floating_point else KEEP

    def planned(self, merged: Mapping[str, Tuple[Tuple[int, ...], torch.dtype]]) -> None:
        """The parameters it will merge, ``{name: (shape, compute dtype)}``, known before any
        tensor is read (every process of a distributed merge gets all of them)."""

    def statistics(self, pass_index: int, name: str, task_vectors: Tensor, base: Tensor
                   ) -> Dict[str, Tensor]:
        """Pass ``pass_index``'s contribution of one merged parameter (``task_vectors``:
        ``(T, *shape)`` in the compute dtype, ``base`` its pretrained value). The engine sums the
        returned tensors over every merged parameter (and every process) in a fixed order."""
        return {}

    def absorb(self, pass_index: int, totals: Mapping[str, Tensor]) -> None:
        """Receive pass ``pass_index``'s totals (the sums of :meth:`statistics`)."""

    def merge(self, name: str, task_vectors: Tensor, base: Tensor) -> Tensor:
        """The merged task vector of one parameter (``task_vectors``: ``(T, *shape)`` in the
        compute dtype, transposed first if the engine was asked to)."""
        raise NotImplementedError

    def cost(self, shape: Sequence[int], num_tasks: int) -> float:
        """Estimated work of :meth:`merge` on one parameter, for splitting a merge across
        processes (relative units: only ratios matter)."""
        numel = 1
        for size in shape:
            numel *= size
        return float(num_tasks * numel)

    def diagnostics(self) -> Optional[dict]:
        """What the method records about the merge (written beside the run's report), or
        ``None``. Under torchrun each process reports its own parameters' rows."""
        return None


METHODS: Dict[str, Type[TensorMergeMethod]] = {}
"""Every registered method by :attr:`TensorMergeMethod.name`."""


def register(cls: Type[TensorMergeMethod]) -> Type[TensorMergeMethod]:
    """Class decorator: make ``cls`` findable by its name in :data:`METHODS`."""
    if not cls.name or cls.name in METHODS:
        raise ValueError(f"a method needs a unique name; got {cls.name!r}")
    METHODS[cls.name] = cls
    return cls

