"""Tensor helpers shared by the merge math: validation with clear errors, compute dtypes.

Pure torch; no FusionBench import.
"""

from __future__ import annotations

from typing import Sequence, Union

import torch
from torch import Tensor

TaskVectors = Union[Tensor, Sequence[Tensor]]


def stack_task_vectors(task_vectors: TaskVectors, *, ndim: int | None = 2) -> Tensor:
    """Validate the task vectors of one parameter and stack them as ``(T, *shape)``.

    Raises ``ValueError`` for an empty set, mismatched shapes (all listed), a wrong number of
    dimensions, non-floating dtypes, mixed devices, or NaN/Inf values (the task and the count).
    """
    if isinstance(task_vectors, Tensor):
        if task_vectors.dim() < 1 or task_vectors.shape[0] == 0:
            raise ValueError("task_vectors is empty: expected at least one task vector")
        stacked = task_vectors  # already (T, *shape): validate without copying
        if ndim is not None and stacked.dim() - 1 != ndim:
            raise ValueError(
                f"expected {ndim}-D task vectors (d_out x d_in), "
                f"got shape {tuple(stacked.shape[1:])}"
            )
        if not stacked.is_floating_point():
            raise ValueError(f"task vectors have dtype {stacked.dtype}; expected a float dtype")
        check_finite(stacked, what="task vector")
        return stacked

    tensors = list(task_vectors)
    if not tensors:
        raise ValueError("task_vectors is empty: expected at least one task vector")
    for index, tensor in enumerate(tensors):
        if not isinstance(tensor, Tensor):
            raise ValueError(
                f"task vector {index} is a {type(tensor).__name__}, expected a torch.Tensor"
            )
    shapes = [tuple(t.shape) for t in tensors]
    if len(set(shapes)) > 1:
        listed = ", ".join(f"{i}: {s}" for i, s in enumerate(shapes))
        raise ValueError(f"task vectors must all have the same shape; got {listed}")
    if ndim is not None and len(shapes[0]) != ndim:
        raise ValueError(f"expected {ndim}-D task vectors (d_out x d_in), got shape {shapes[0]}")
    devices = {t.device for t in tensors}
    if len(devices) > 1:
        raise ValueError(f"task vectors are on different devices: {sorted(map(str, devices))}")
    for index, tensor in enumerate(tensors):
        if not tensor.is_floating_point():
            raise ValueError(
                f"task vector {index} has dtype {tensor.dtype}; expected a float dtype"
            )
    dtype = tensors[0].dtype
    for tensor in tensors[1:]:
        dtype = torch.promote_types(dtype, tensor.dtype)
    stacked = torch.stack([t.to(dtype) for t in tensors])
    check_finite(stacked, what="task vector")
    return stacked


def check_finite(stacked: Tensor, *, what: str, names: Sequence[str] | None = None) -> None:
    """Raise ``ValueError`` naming every slice along dim 0 of ``stacked`` holding NaN or Inf."""
    flat = stacked.reshape(stacked.shape[0], -1)
    finite = torch.isfinite(flat)
    if bool(finite.all()):
        return
    problems = []
    for index in torch.nonzero(~finite.all(dim=1)).flatten().tolist():
        row = flat[index]
        n_nan = int(torch.isnan(row).sum())
        n_inf = int(torch.isinf(row).sum())
        label = names[index] if names is not None else str(index)
        problems.append(f"{what} {label}: {n_nan} NaN, {n_inf} Inf")
    raise ValueError("non-finite values in the input: " + "; ".join(problems))


def compute_dtype_for(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; every other float dtype is computed in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32
