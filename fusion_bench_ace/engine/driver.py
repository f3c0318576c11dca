"""Model-level merging driver: walk the parameters, merge each one with a per-tensor function.

MergeKit-style: a merge method is a per-tensor function ``(task_vectors (T, *shape), name) ->
merged task vector``; this module decides which parameters are merged how, checks the experts
against the pretrained model before any heavy work, and streams tensor by tensor over
``Mapping[str, Tensor]`` checkpoints (in-memory state dicts or lazy ones), so a lazy source keeps
only one parameter's task vectors in memory. Each merged tensor goes where it belongs as soon as it
is computed: into the pretrained model's own storage (:func:`merge_in_place`) or into a checkpoint
file (:mod:`fusion_bench_ace.engine.io.writer`), so no second model is ever built. No FusionBench
import.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
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

from ..methods.tensors import check_finite, compute_dtype_for
from .io.writer import DEFAULT_MAX_SHARD_SIZE, ShardedSafetensorsWriter, TensorSpec
from .selection import NamePatterns

StateDict = Mapping[str, Tensor]
TensorMerge = Callable[[Tensor, str], Tensor]
"""``(task vectors stacked as (T, *shape) in the compute dtype, parameter name) -> merged``."""


@dataclass(frozen=True)
class ParameterPlan:
    """How each parameter of the pretrained model is merged."""

    matrix: Tuple[str, ...] = ()
    """2-D weights merged by the matrix method (ACE)."""
    average: Tuple[str, ...] = ()
    """Merged by averaging their task vectors (1-D, >2-D, and ``average_keys``)."""
    skip: Tuple[str, ...] = ()
    """Kept at their pretrained value (``exclude_keys``, integer buffers)."""
    transpose: FrozenSet[str] = frozenset()
    """Matrix weights stored ``d_in x d_out`` (GPT-2 Conv1D) that are transposed for the merge."""


def plan_parameters(
    pretrained: StateDict,
    *,
    exclude_keys: NamePatterns | Sequence[str] = (),
    average_keys: NamePatterns | Sequence[str] = (),
    transpose_keys: Iterable[str] = (),
) -> ParameterPlan:
    """Sort the pretrained model's parameters into matrix / average / skip.

    ``exclude_keys`` and ``average_keys`` (regexes, or compiled :class:`NamePatterns`) select
    names as :mod:`fusion_bench_ace.engine.selection` says.
    """
    exclude = NamePatterns.compile(exclude_keys, "exclude_keys")
    average = NamePatterns.compile(average_keys, "average_keys")
    matrix, averaged, skip = [], [], []
    for name, tensor in pretrained.items():
        if not tensor.is_floating_point() or exclude.matches(name):
            skip.append(name)
        elif tensor.dim() == 2 and not average.matches(name):
            matrix.append(name)
        else:
            averaged.append(name)
    if not matrix and not averaged:
        raise ValueError(
            "no parameter left to merge: every parameter is excluded by exclude_keys "
            f"{list(exclude.patterns)} or is not floating point"
        )
    return ParameterPlan(tuple(matrix), tuple(averaged), tuple(skip), frozenset(transpose_keys))


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
    try:
        check_finite(stacked, what="expert", names=list(experts))
    except ValueError as error:
        if not bool(torch.isfinite(base).all()):
            raise ValueError(f"non-finite values in the pretrained parameter '{name}'") from None
        raise ValueError(f"parameter '{name}': {error}") from None
    return stacked


def merged_tensors(
    pretrained: StateDict,
    experts: Mapping[str, StateDict],
    matrix_merge: TensorMerge,
    plan: ParameterPlan,
    *,
    names: Optional[Sequence[str]] = None,
    scaling_factor: float = 1.0,
    device: str | torch.device = "cpu",
    progress: Optional[Callable[[Iterable[str]], Iterable[str]]] = None,
) -> Iterator[Tuple[str, Tensor]]:
    """Yield ``(name, pretrained + scaling_factor * merged task vector)`` one parameter at a time.

    ``names`` (default: every pretrained name, in order) are visited one by one; only the
    visited parameter's task vectors are in memory. Matrix parameters go through
    ``matrix_merge`` (transposed first if planned), averaged ones through the mean of their task
    vectors; skipped ones yield ``pretrained[name]`` itself. Each result has the pretrained dtype
    and lies on ``device``; consumers copy it where it goes (:func:`merge_in_place`, or a
    checkpoint writer) before asking for the next.
    """
    device = torch.device(device)
    names = list(pretrained.keys()) if names is None else list(names)
    iterator = progress(names) if progress is not None else names
    matrix, average = set(plan.matrix), set(plan.average)
    for name in iterator:
        base = pretrained[name]
        if name not in matrix and name not in average:
            yield name, base
            continue
        dtype = compute_dtype_for(base.dtype)
        task_vectors = stacked_task_vectors(name, base, experts, device=device, dtype=dtype)
        if name in matrix:
            transpose = name in plan.transpose
            if transpose:
                task_vectors = task_vectors.transpose(1, 2)
            merged_tv = matrix_merge(task_vectors, name)
            if transpose:
                merged_tv = merged_tv.T
        else:
            merged_tv = task_vectors.mean(dim=0)
        del task_vectors
        result = (base.to(device=device, dtype=dtype) + scaling_factor * merged_tv).to(base.dtype)
        if not bool(torch.isfinite(result).all()):  # finite in the compute dtype, not in base's
            raise ValueError(
                f"parameter '{name}': the merged weights do not fit in {base.dtype} "
                f"(max |task vector| {float(merged_tv.abs().max()):.3g}, scaling_factor "
                f"{scaling_factor}); lower the scaling or merge in float32"
            )
        del merged_tv
        yield name, result
        del result


def distinct_storage_names(state: StateDict, plan: ParameterPlan) -> List[str]:
    """The names of ``state`` minus the aliases of an earlier name (tied weights share storage).

    Writing the merged value of the first name of a tied group writes every name of the group.
    Raises ``ValueError`` when tied names are planned differently (one excluded, one merged: no
    single value satisfies both) or when parameters overlap in memory without being the same view.
    """
    category = {name: "matrix" for name in plan.matrix}
    category.update({name: "average" for name in plan.average})
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
    matrix_merge: TensorMerge,
    plan: ParameterPlan,
    *,
    scaling_factor: float = 1.0,
    device: str | torch.device = "cpu",
    progress: Optional[Callable[[Iterable[str]], Iterable[str]]] = None,
) -> None:
    """Overwrite ``pretrained``'s tensors with the merge, each as soon as it is computed.

    ``pretrained`` is the state dict of the model that becomes the merged model
    (``model.state_dict()`` shares its parameters' storage), so the merge holds that one model,
    the experts' tensors of one parameter and the merged tensor, never a second model. Tied
    weights are merged once (:func:`distinct_storage_names`). Each parameter is read before it is
    written and no parameter depends on another's pretrained value, so the result is the merge of
    the untouched pretrained model. If an error is raised, the parameters before it are already
    merged: discard the model.
    """
    names = distinct_storage_names(pretrained, plan)
    for name, merged in merged_tensors(
        pretrained, experts, matrix_merge, plan, names=names, scaling_factor=scaling_factor,
        device=device, progress=progress,
    ):
        target = pretrained[name]
        if merged is not target:
            target.copy_(merged)


def write_merged_checkpoint(
    directory: str | os.PathLike,
    pretrained: StateDict,
    experts: Mapping[str, StateDict],
    matrix_merge: TensorMerge,
    plan: ParameterPlan,
    *,
    specs: Sequence[TensorSpec],
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    scaling_factor: float = 1.0,
    device: str | torch.device = "cpu",
    progress: Optional[Callable[[Iterable[str]], Iterable[str]]] = None,
    names: Optional[Sequence[str]] = None,
    create_files: bool = True,
    write_index: bool = True,
) -> List[str]:
    """Merge into safetensors shards in ``directory``, each tensor written as it is computed.

    ``specs`` lists every tensor of the checkpoint (name, shape, dtype) in the order they are
    merged and written (usually the pretrained checkpoint's, from its headers). With lazy
    ``pretrained`` and ``experts`` (:mod:`fusion_bench_ace.engine.io.reader`), memory holds one
    parameter's task vectors and its merged tensor, whatever the model size. Returns the files
    written (:class:`fusion_bench_ace.engine.io.writer.ShardedSafetensorsWriter`).

    One share of a merge split across processes: ``names`` (in the order of ``specs``) are the
    tensors this process merges and writes into files another process created
    (``create_files=False``, :func:`create_checkpoint_files`); one of them writes the index.
    """
    writer = ShardedSafetensorsWriter(directory, specs, max_shard_size, names=names,
                                      create_files=create_files)
    try:
        for name, merged in merged_tensors(
            pretrained, experts, matrix_merge, plan, names=[spec.name for spec in writer.specs],
            scaling_factor=scaling_factor, device=device, progress=progress,
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
