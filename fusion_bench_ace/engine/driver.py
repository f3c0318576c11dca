"""The engine's driver: walk the parameters, merge each with the method's per-tensor unit.

MergeKit-style: a merge method is a :class:`~fusion_bench_ace.methods.base.TensorMergeMethod`
(each parameter merged, averaged or kept; one parameter's task vectors merged at a time). This
module plans which parameters are merged how, checks the experts against the pretrained model
before any heavy work, runs the method's statistics passes, and streams tensor by tensor over
``Mapping[str, Tensor]`` checkpoints (in-memory state dicts or lazy ones), so a lazy source keeps
only one parameter's task vectors in memory. Each merged tensor goes where it belongs as soon as it
is computed: into the pretrained model's own storage (:func:`merge_in_place`) or into a checkpoint
directory (:func:`merge_into_directory`, the merge split across torchrun processes when there are
several), so no second model is ever built. No FusionBench import.
"""

from __future__ import annotations

import math
import os
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import (
    Callable,
    Dict,
    FrozenSet,
    Iterable,
    Iterator,
    List,
    Mapping,
    Optional,
    Sequence,
    Tuple,
)

import torch
from torch import Tensor

from ..atomic import staged_path
from ..methods.base import AVERAGE, KEEP, MERGE, TensorMergeMethod
from ..methods.tensors import check_finite, compute_dtype_for
from .distributed import Ranks, balanced_owners, plan_costs, work_per_rank
from .io.writer import DEFAULT_MAX_SHARD_SIZE, ShardedSafetensorsWriter, TensorSpec

StateDict = Mapping[str, Tensor]
Progress = Callable[[Iterable[str]], Iterable[str]]


@dataclass(frozen=True)
class ParameterPlan:
    """How each parameter of the pretrained model is merged."""

    merge: Tuple[str, ...] = ()
    """Merged by the method's :meth:`~fusion_bench_ace.methods.base.TensorMergeMethod.merge`."""
    average: Tuple[str, ...] = ()
    """Merged by averaging their task vectors."""
    skip: Tuple[str, ...] = ()
    """Kept at their pretrained value (excluded by the method's options, integer buffers)."""
    transpose: FrozenSet[str] = frozenset()
    """Weights stored ``d_in x d_out`` (GPT-2 Conv1D) that are transposed for the merge."""


def plan_parameters(
    pretrained: StateDict, method: TensorMergeMethod, *, transpose_keys: Iterable[str] = ()
) -> ParameterPlan:
    """Sort the pretrained model's parameters (real or meta tensors) by the method's
    :meth:`~fusion_bench_ace.methods.base.TensorMergeMethod.treatment`."""
    groups: Dict[str, List[str]] = {MERGE: [], AVERAGE: [], KEEP: []}
    for name, tensor in pretrained.items():
        how = method.treatment(name, tuple(tensor.shape), tensor.dtype)
        if how not in groups:
            raise ValueError(f"{type(method).__name__}.treatment('{name}') returned {how!r}")
        groups[how].append(name)
    if not groups[MERGE] and not groups[AVERAGE]:
        raise ValueError(
            "no parameter left to merge: the method keeps every parameter at its pretrained "
            "value (check its exclude_keys / remove_keys) or none is floating point"
        )
    method.planned({name: (tuple(pretrained[name].shape), compute_dtype_for(pretrained[name].dtype))
                    for name in groups[MERGE]})
    return ParameterPlan(tuple(groups[MERGE]), tuple(groups[AVERAGE]), tuple(groups[KEEP]),
                         frozenset(transpose_keys))


def check_experts_match(
    pretrained: StateDict,
    experts: Mapping[str, StateDict],
    *,
    ignore: Iterable[str] = (),
    max_listed: int = 5,
) -> None:
    """Raise ``ValueError`` unless every expert has the pretrained model's names and shapes.

    The message names the expert and lists its first mismatches (missing, unexpected, shape).
    Names in ``ignore`` (parameters kept at their pretrained value, never read from the experts)
    may be missing or have another shape, e.g. an embedding with more rows than the pretrained
    vocabulary that the exclusions keep out of the merge.
    """
    ignore = set(ignore)
    if len(experts) < 2:
        raise ValueError(
            f"merging needs at least two fine-tuned experts; the pool has {len(experts)}: "
            f"{list(experts)}"
        )
    reference = {name: tuple(t.shape) for name, t in pretrained.items() if name not in ignore}
    problems = []
    for expert_name, state in experts.items():
        shapes = {name: tuple(t.shape) for name, t in state.items()}
        issues = [f"missing {name}" for name in reference if name not in shapes]
        issues += [f"unexpected {name}" for name in shapes
                   if name not in reference and name not in ignore]
        issues += [
            f"{name}: shape {shapes[name]} vs pretrained {reference[name]}"
            for name in reference
            if name in shapes and shapes[name] != reference[name]
        ]
        if issues:
            listed = "; ".join(issues[:max_listed])
            more = f" (+{len(issues) - max_listed} more)" if len(issues) > max_listed else ""
            problems.append(f"expert '{expert_name}': {listed}{more}")
    if problems:
        raise ValueError(
            "the experts do not match the pretrained model's architecture:\n  "
            + "\n  ".join(problems)
            + "\n(parameters kept at their pretrained value by the method's exclusions are not "
            "compared: exclude a tensor whose shape differs, e.g. an embedding with added tokens, "
            "to merge the rest)"
        )


def stacked_task_vectors(
    name: str,
    pretrained: Tensor,
    experts: Mapping[str, StateDict],
    *,
    device: torch.device,
    dtype: torch.dtype,
) -> Tensor:
    """``(T, *shape)`` task vectors of one parameter, checked for NaN/Inf per expert."""
    base = pretrained.to(device=device, dtype=dtype)
    # filled in place: with lazy experts only one expert's tensor is held besides the stack
    stacked = torch.empty((len(experts), *base.shape), dtype=dtype, device=device)
    for index, state in enumerate(experts.values()):
        torch.sub(state[name].to(device=device, dtype=dtype), base, out=stacked[index])
    if math.isfinite(float(stacked.sum())):  # NaN and Inf survive a sum: one pass, no mask
        return stacked
    try:
        check_finite(stacked, what="expert", names=list(experts))
    except ValueError as error:
        if not bool(torch.isfinite(base).all()):
            raise ValueError(f"non-finite values in the pretrained parameter '{name}'") from None
        raise ValueError(f"parameter '{name}': {error}") from None
    return stacked  # finite, but the sum overflowed


def _task_vectors(name: str, base: Tensor, experts, plan: ParameterPlan, device
                  ) -> Tuple[Tensor, Tensor]:
    """``(task vectors (T, *shape), pretrained)`` of one parameter in the compute dtype on
    ``device``, transposed when planned."""
    dtype = compute_dtype_for(base.dtype)
    task_vectors = stacked_task_vectors(name, base, experts, device=device, dtype=dtype)
    base = base.to(device=device, dtype=dtype)
    if name in plan.transpose:
        return task_vectors.transpose(1, 2), base.T
    return task_vectors, base


def compute_statistics(
    method: TensorMergeMethod,
    pretrained: StateDict,
    experts: Mapping[str, StateDict],
    plan: ParameterPlan,
    *,
    names: Optional[Sequence[str]] = None,
    device: str | torch.device = "cpu",
    ranks: Optional[Ranks] = None,
    progress: Optional[Progress] = None,
) -> None:
    """Run the method's statistics passes over the merged parameters among ``names`` (default:
    all; under torchrun, this process's share) and hand it each pass's totals.

    Integer statistics are summed as they come (exact in any order); floating ones are summed in
    the order of the parameters' names, after gathering every process's, so a merge split across
    processes, or reading the parameters in another order (a checkpoint's instead of a model's),
    sees the same totals bit for bit.
    """
    device = torch.device(device)
    merged = set(plan.merge)
    visited = [name for name in (plan.merge if names is None else names) if name in merged]
    pass_index = 0
    while pass_index < method.statistics_passes:  # a method may add passes as it learns

        def local_pass():
            exact: Dict[str, Tensor] = {}
            ordered: List[Tuple[str, Dict[str, Tensor]]] = []
            for name in progress(visited) if progress is not None else visited:
                task_vectors, base = _task_vectors(name, pretrained[name], experts, plan, device)
                contribution = method.statistics(pass_index, name, task_vectors, base)
                del task_vectors, base
                floating = {}
                for key, value in contribution.items():
                    value = value.detach().to("cpu")
                    if value.is_floating_point():
                        # kept as Python numbers: small tensors living across the walk would
                        # pin the allocator's heap under every parameter's freed buffers
                        floating[key] = (value.dtype, tuple(value.shape), value.tolist())
                    elif key in exact:
                        exact[key] += value
                    else:
                        exact[key] = value.clone()
                if floating:
                    ordered.append((name, floating))
            return exact, ordered

        if ranks is None:
            exact, ordered = local_pass()
        else:  # an error on one process stops every process before they meet below
            exact, ordered = ranks.together(local_pass)
            exact = ranks.all_reduce_sum(exact)
            ordered = [item for share in ranks.all_gather(ordered) for item in share]
        totals = dict(exact)
        for _, floating in sorted(ordered, key=lambda item: item[0]):
            for key, (dtype, shape, values) in floating.items():
                value = torch.tensor(values, dtype=dtype).reshape(shape)
                totals[key] = totals[key] + value if key in totals else value
        method.absorb(pass_index, totals)
        pass_index += 1


def merged_tensors(
    pretrained: StateDict,
    experts: Mapping[str, StateDict],
    method: TensorMergeMethod,
    plan: ParameterPlan,
    *,
    names: Optional[Sequence[str]] = None,
    device: str | torch.device = "cpu",
    progress: Optional[Progress] = None,
) -> Iterator[Tuple[str, Tensor]]:
    """Yield ``(name, pretrained + scaling_factor * merged task vector)`` one parameter at a time.

    ``names`` (default: every pretrained name, in order) are visited one by one; only the
    visited parameter's task vectors are in memory. Merged parameters go through the method
    (transposed first if planned), averaged ones through the mean of their task vectors; skipped
    ones yield ``pretrained[name]`` itself. Each result has the pretrained dtype and lies on
    ``device``; consumers copy it where it goes (:func:`merge_in_place`, or a checkpoint writer)
    before asking for the next. The method's statistics passes must have run
    (:func:`compute_statistics`).
    """
    device = torch.device(device)
    names = list(pretrained.keys()) if names is None else list(names)
    iterator = progress(names) if progress is not None else names
    merge, average = set(plan.merge), set(plan.average)
    scaling_factor = method.scaling_factor
    for name in iterator:
        original = pretrained[name]
        if name not in merge and name not in average:
            yield name, original
            continue
        task_vectors, base = _task_vectors(name, original, experts, plan, device)
        if name in merge:
            merged_tv = method.merge(name, task_vectors, base)
        else:
            merged_tv = task_vectors.mean(dim=0)
        del task_vectors
        if name in plan.transpose:
            merged_tv, base = merged_tv.T, base.T
        result = (base + scaling_factor * merged_tv).to(original.dtype)
        if not bool(torch.isfinite(result).all()):  # finite in the compute dtype, not in base's
            raise ValueError(
                f"parameter '{name}': the merged weights do not fit in {original.dtype} "
                f"(max |task vector| {float(merged_tv.abs().max()):.3g}, scaling factor "
                f"{scaling_factor}); lower the scaling or merge in float32"
            )
        del merged_tv, base
        yield name, result
        del result


def distinct_storage_names(state: StateDict, plan: ParameterPlan) -> List[str]:
    """The names of ``state`` minus the aliases of an earlier name (tied weights share storage).

    Writing the merged value of the first name of a tied group writes every name of the group.
    Raises ``ValueError`` when tied names are planned differently (one excluded, one merged: no
    single value satisfies both) or when parameters overlap in memory without being the same view.
    """
    category = {name: "merged" for name in plan.merge}
    category.update({name: "averaged" for name in plan.average})
    first_view: Dict[Tuple, str] = {}
    first_storage: Dict[int, Tuple[Tuple, str]] = {}
    names = []
    for name, tensor in state.items():
        if tensor.device.type == "meta" or tensor.numel() == 0:
            names.append(name)
            continue
        pointer = tensor.untyped_storage().data_ptr()
        view = (pointer, tensor.storage_offset(), tuple(tensor.shape), tensor.stride(),
                tensor.dtype)
        twin = first_view.get(view)
        if twin is not None:
            if category.get(twin, "skip") != category.get(name, "skip"):
                raise ValueError(
                    f"'{name}' and '{twin}' are tied (one tensor) but planned differently "
                    f"({category.get(name, 'kept pretrained')} vs "
                    f"{category.get(twin, 'kept pretrained')}): exclude both or neither"
                )
            continue
        if pointer in first_storage:
            raise ValueError(
                f"'{name}' and '{first_storage[pointer][1]}' overlap in memory as different views; "
                "they cannot be merged in place"
            )
        first_view[view] = name
        first_storage[pointer] = (view, name)
        names.append(name)
    return names


def merge_in_place(
    pretrained: StateDict,
    experts: Mapping[str, StateDict],
    method: TensorMergeMethod,
    plan: ParameterPlan,
    *,
    device: str | torch.device = "cpu",
    progress: Optional[Progress] = None,
) -> None:
    """Overwrite ``pretrained``'s tensors with the merge, each as soon as it is computed.

    ``pretrained`` is the state dict of the model that becomes the merged model
    (``model.state_dict()`` shares its parameters' storage), so the merge holds that one model,
    the experts' tensors of one parameter and the merged tensor, never a second model. Tied
    weights are merged once (:func:`distinct_storage_names`). The statistics passes read the
    untouched model first; each parameter is read before it is written and no parameter depends
    on another's pretrained value, so the result is the merge of the untouched pretrained model.
    If an error is raised, the parameters before it are already merged: discard the model.
    """
    names = distinct_storage_names(pretrained, plan)
    compute_statistics(method, pretrained, experts, plan, names=names, device=device)
    for name, merged in merged_tensors(
        pretrained, experts, method, plan, names=names, device=device, progress=progress,
    ):
        target = pretrained[name]
        if merged is not target:
            target.copy_(merged)


def write_merged_checkpoint(
    directory: str | os.PathLike,
    pretrained: StateDict,
    experts: Mapping[str, StateDict],
    method: TensorMergeMethod,
    plan: ParameterPlan,
    *,
    specs: Sequence[TensorSpec],
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    device: str | torch.device = "cpu",
    progress: Optional[Progress] = None,
    names: Optional[Sequence[str]] = None,
    create_files: bool = True,
    write_index: bool = True,
) -> List[str]:
    """Merge into safetensors shards in ``directory``, each tensor written as it is computed.

    ``specs`` lists every tensor of the checkpoint (name, shape, dtype) in the order they are
    merged and written (usually the pretrained checkpoint's, from its headers). With lazy
    ``pretrained`` and ``experts`` (:mod:`fusion_bench_ace.engine.io.reader`), memory holds one
    parameter's task vectors and its merged tensor, whatever the model size. The method's
    statistics passes must have run. Returns the files written
    (:class:`fusion_bench_ace.engine.io.writer.ShardedSafetensorsWriter`).

    One share of a merge split across processes: ``names`` (in the order of ``specs``) are the
    tensors this process merges and writes into files another process created
    (``create_files=False``); one of them writes the index.
    """
    writer = ShardedSafetensorsWriter(directory, specs, max_shard_size, names=names,
                                      create_files=create_files)
    try:
        for name, merged in merged_tensors(
            pretrained, experts, method, plan, names=[spec.name for spec in writer.specs],
            device=device, progress=progress,
        ):
            writer.write(name, merged)
        return writer.finish(write_index=write_index)
    finally:
        writer.abort()


def create_checkpoint_files(
    directory: str | os.PathLike, specs: Sequence[TensorSpec],
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
) -> None:
    """The shards :func:`write_merged_checkpoint` writes into, created at their full size (headers
    written, zeros where the tensors go), for processes that each write a share of them."""
    ShardedSafetensorsWriter(directory, specs, max_shard_size, names=[]).finish(write_index=False)


@dataclass(frozen=True)
class Share:
    """This process's part of a merge split across processes."""

    names: Tuple[str, ...]
    """The tensors it merges and writes, in checkpoint order."""
    work_per_rank: Tuple[float, ...]
    """Every process's estimated work (:meth:`TensorMergeMethod.cost`)."""


def share_of(ranks: Ranks, specs: Sequence[TensorSpec], plan: ParameterPlan,
             method: TensorMergeMethod, num_tasks: int) -> Share:
    """The tensors ``ranks.rank`` merges: every parameter to one process, the estimated work
    balanced (:func:`fusion_bench_ace.engine.distributed.balanced_owners`)."""
    costs = plan_costs([(spec.name, spec.shape) for spec in specs], plan, method, num_tasks)
    owners = balanced_owners(costs, ranks.world_size)
    mine = tuple(spec.name for spec, owner in zip(specs, owners) if owner == ranks.rank)
    return Share(mine, tuple(work_per_rank(costs, owners, ranks.world_size)))


def merge_into_directory(
    path: str | os.PathLike,
    pretrained: StateDict,
    experts: Mapping[str, StateDict],
    method: TensorMergeMethod,
    plan: ParameterPlan,
    *,
    specs: Sequence[TensorSpec],
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    device: str | torch.device = "cpu",
    overwrite: bool = False,
    ranks: Optional[Ranks] = None,
    model_files: Optional[Callable[[Path], None]] = None,
    progress: Optional[Callable[[str], Progress]] = None,
) -> Optional[Share]:
    """Merge into a checkpoint directory at ``path``: statistics passes, every tensor written as
    it is computed, ``model_files(directory)`` (config, tokenizer: what the caller's framework
    writes beside the weights) last, then the directory renamed into place
    (:func:`fusion_bench_ace.atomic.staged_path`; an existing ``path`` is an error unless
    ``overwrite``).

    Under torchrun (``ranks``), each process merges and writes its :class:`Share` into the files
    rank 0 created at their full size (the layout of one process's), so the bytes equal one
    process's; rank 0 writes the index and the model files and renames the directory. A failure
    on any rank stops all (:meth:`Ranks.together`) and the staging directory is removed. Returns
    this process's share (``None`` in one process).
    """
    label = progress or (lambda what: None)
    if ranks is None:
        compute_statistics(method, pretrained, experts, plan, device=device,
                           progress=label("statistics"))
        with staged_path(path, overwrite=overwrite) as staging:
            staging.mkdir()
            write_merged_checkpoint(staging, pretrained, experts, method, plan, specs=specs,
                                    max_shard_size=max_shard_size, device=device,
                                    progress=label("merging"))
            if model_files is not None:
                model_files(staging)
        return None

    share = share_of(ranks, specs, plan, method, len(experts))
    main = ranks.is_main
    with ExitStack() as stack:

        def stage() -> Optional[Path]:
            if not main:
                return None
            staging = stack.enter_context(staged_path(path, overwrite=overwrite))
            staging.mkdir()
            create_checkpoint_files(staging, specs, max_shard_size)
            return staging

        staging = Path(ranks.broadcast(str(ranks.together(stage))))
        compute_statistics(method, pretrained, experts, plan, names=share.names, device=device,
                           ranks=ranks, progress=label(f"statistics (rank {ranks.rank})"))
        ranks.together(lambda: write_merged_checkpoint(
            staging, pretrained, experts, method, plan, specs=specs,
            max_shard_size=max_shard_size, device=device, names=share.names,
            create_files=False, write_index=main, progress=label(f"merging (rank {ranks.rank})")))
        ranks.together(lambda: model_files(staging) if main and model_files else None)
        ranks.together(stack.close)  # rank 0 renames the directory into place
    return share
