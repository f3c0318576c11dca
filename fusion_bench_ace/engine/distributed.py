"""One merge across processes: which rank merges which parameter, and the ranks' rendezvous.

Under ``torchrun --nproc-per-node N`` every process runs the same merge; :func:`balanced_owners`
gives each parameter to one rank so that the ranks' estimated work is as even as a greedy
longest-first assignment makes it (each method estimates its own work per parameter, e.g. ACE's
``T d_out d_in²`` covariances; averaged parameters cost one pass over their ``T`` copies). The
assignment depends only on the names, shapes and ``N``, so every rank computes the same one
without talking to the others.

:class:`Ranks` is the process group torchrun's environment describes (``torch.distributed``,
gloo on CPUs, NCCL on GPUs): barriers and gathering small Python objects (the diagnostics), no
tensors. No FusionBench import.
"""

from __future__ import annotations

import heapq
import os
from dataclasses import dataclass
from typing import Callable, List, Mapping, Optional, Sequence, Tuple, TypeVar

import torch

T = TypeVar("T")

__all__ = ["Ranks", "balanced_owners", "plan_costs", "work_per_rank", "world_from_env"]


def plan_costs(named_shapes: Sequence[Tuple[str, Sequence[int]]], plan, method,
               num_tasks: int) -> List[float]:
    """Estimated work of every ``(name, shape)`` (in its order) merged as ``plan`` says: the
    method's :meth:`~fusion_bench_ace.methods.base.TensorMergeMethod.cost` for merged parameters
    (times its statistics passes plus one, which read the parameter again), one pass over the
    ``T`` copies for averaged ones, the pretrained value copied for kept ones."""
    merge, average = set(plan.merge), set(plan.average)
    reads = method.statistics_passes + 1
    costs = []
    for name, shape in named_shapes:
        numel = 1
        for size in shape:
            numel *= size
        if name in merge:
            costs.append(max(method.cost(shape, num_tasks), float(num_tasks * numel) * reads))
        elif name in average:
            costs.append(float(num_tasks * numel))
        else:
            costs.append(float(numel))
    return costs


def balanced_owners(costs: Sequence[float], world_size: int) -> List[int]:
    """The rank of each item: largest cost first, each to the least-loaded rank (the lowest rank
    among equals), ties between items broken by their order. Deterministic."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1; got {world_size}")
    owners = [0] * len(costs)
    loads = [(0.0, rank) for rank in range(world_size)]
    for index in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        load, rank = heapq.heappop(loads)
        owners[index] = rank
        heapq.heappush(loads, (load + costs[index], rank))
    return owners


def work_per_rank(costs: Sequence[float], owners: Sequence[int], world_size: int) -> List[float]:
    loads = [0.0] * world_size
    for cost, owner in zip(costs, owners):
        loads[owner] += cost
    return loads


def world_from_env(environ: Mapping[str, str] = os.environ) -> Tuple[int, int, int]:
    """``(rank, local_rank, world_size)`` that torchrun (or SLURM's ``srun`` with torchrun's
    variables) sets; ``(0, 0, 1)`` in a plain process."""
    world = int(environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 0, 1
    return int(environ["RANK"]), int(environ.get("LOCAL_RANK", environ["RANK"])), world


@dataclass
class Ranks:
    """This process's place among the processes of one merge."""

    rank: int
    world_size: int
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def join(cls, device: torch.device) -> Optional["Ranks"]:
        """The process group of torchrun's environment (initialised here if it is not yet:
        NCCL when ``device`` is a GPU, else gloo), or ``None`` in a single process. On a GPU each
        rank takes ``cuda:<LOCAL_RANK>`` unless ``device`` names an index."""
        import torch.distributed as dist

        rank, local_rank, world = world_from_env()
        if world == 1:
            return None
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", local_rank)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        if dist.get_world_size() != world or dist.get_rank() != rank:
            raise RuntimeError(
                f"the process group (rank {dist.get_rank()} of {dist.get_world_size()}) is not "
                f"the one torchrun's environment describes (rank {rank} of {world})"
            )
        return cls(rank=rank, world_size=world, local_rank=local_rank, device=device)

    def barrier(self) -> None:
        import torch.distributed as dist

        if self.device.type == "cuda":
            dist.barrier(device_ids=[self.device.index])
        else:
            dist.barrier()

    def broadcast(self, value):
        """Rank 0's ``value`` (picklable) on every rank."""
        import torch.distributed as dist

        holder = [value if self.is_main else None]
        dist.broadcast_object_list(holder, src=0)
        return holder[0]

    def together(self, step: Callable[[], T]) -> T:
        """``step()`` on every rank, then agree: if it raised on any rank, it raises on all (the
        rank's own error, elsewhere a RuntimeError naming the failed ranks), so that no rank
        waits for one that has stopped."""
        import torch.distributed as dist

        error = None
        try:
            result = step()
        except Exception as caught:  # re-raised below, after the other ranks know
            error, result = caught, None
        failed = [None] * self.world_size
        dist.all_gather_object(failed, None if error is None else repr(error))
        if error is not None:
            raise error
        others = {rank: why for rank, why in enumerate(failed) if why is not None}
        if others:
            raise RuntimeError(f"rank(s) {sorted(others)} of the merge failed: "
                               + "; ".join(f"{rank}: {why}" for rank, why in others.items()))
        return result

    def all_gather(self, value) -> list:
        """Every rank's ``value`` (picklable) on every rank, in rank order."""
        import torch.distributed as dist

        gathered = [None] * self.world_size
        dist.all_gather_object(gathered, value)
        return gathered

    def all_reduce_sum(self, tensors: Mapping[str, "torch.Tensor"]) -> dict:
        """``{key: the sum over ranks}`` of integer tensors (exact whatever the order); a key
        some rank lacks (it had nothing to add) counts as zeros there. On the CPU."""
        import torch.distributed as dist

        layouts = {}
        for held in self.all_gather({key: (tuple(value.shape), value.dtype)
                                     for key, value in tensors.items()}):
            layouts.update(held)
        summed = {}
        for key in sorted(layouts):
            shape, dtype = layouts[key]
            value = tensors[key] if key in tensors else torch.zeros(shape, dtype=dtype)
            value = value.to(self.device).clone()
            dist.all_reduce(value, op=dist.ReduceOp.SUM)
            summed[key] = value.to("cpu")
        return summed

    def gather(self, value) -> Optional[list]:
        """Every rank's ``value`` (picklable) on rank 0, in rank order; ``None`` elsewhere."""
        import torch.distributed as dist

        gathered = [None] * self.world_size if self.is_main else None
        dist.gather_object(value, gathered, dst=0)
        return gathered
