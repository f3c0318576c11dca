"""TIES-Merging (Yadav et al., 2023) one parameter at a time, equal to FusionBench's
``ties_merging`` on the flattened model.

FusionBench flattens every task vector of the whole model into one row, keeps each row's entries
whose magnitude reaches its k-th smallest (``kthvalue`` with ``k = d - int(d K)``), elects each
entry's sign as the sign of the trimmed rows' sum (zeros take the sign of the sum of all those
signs, the majority) and merges the entries that agree with it (``sum``, ``mean`` or ``max``).
Only the threshold and the majority sign need the whole model; both are gathered here from one
parameter at a time:

- the k-th smallest magnitude is found exactly by a radix selection on the values' bit patterns
  (non-negative floats order like their bits as integers): a histogram of the highest 16 bits
  over the whole model locates its bucket, the next 16 bits inside that bucket narrow it, and so
  on (two passes in float32, four in float64; ``T x 2^16`` counts, exact integer sums);
- the majority sign is the sign of (number of positive elected signs - negative ones), an exact
  integer count where FusionBench sums the signs in float32.

Pure functions on tensors; no FusionBench import.
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import torch
from torch import Tensor

__all__ = [
    "MERGE_FUNCS",
    "bucket_of_rank",
    "digit_histogram",
    "digit_shifts",
    "disjoint_merge",
    "elected_signs",
    "keep_fraction",
    "kth_rank",
    "threshold_values",
    "trimmed",
]

MERGE_FUNCS = ("sum", "mean", "max")
_BUCKETS = 1 << 16


def keep_fraction(threshold: float) -> float:
    """FusionBench's ``reset_thresh``: a percentage above 1, else a fraction of entries kept."""
    return threshold / 100 if threshold > 1 else threshold


def kth_rank(total: int, threshold: float) -> int:
    """The 1-based rank ``k`` of the smallest kept magnitude among ``total`` entries, as
    FusionBench's ``topk_values_mask`` takes it: ``k = d - int(d K)``."""
    return total - int(total * keep_fraction(threshold))


_CHUNK = 1 << 20  # entries per row converted to bit patterns at a time (bounded temporaries)


def digit_shifts(dtype: torch.dtype) -> List[int]:
    """The 16-bit digits of a non-negative ``dtype`` value's bit pattern, most significant first,
    as right shifts: float32 two (16, 0), float64 four (48, 32, 16, 0)."""
    if dtype == torch.float32:
        return [16, 0]
    if dtype == torch.float64:
        return [48, 32, 16, 0]
    raise ValueError(f"TIES' threshold is selected on float32 or float64 values; got {dtype}")


def _bit_chunks(values: Tensor):
    """``|values|`` of ``(T, ...)`` rows as int64 bit patterns, a bounded chunk of columns at a
    time: non-negative floats compare like these integers."""
    flat = values.reshape(values.shape[0], -1)
    as_int = torch.int32 if values.dtype == torch.float32 else torch.int64
    for start in range(0, flat.shape[1], _CHUNK):
        chunk = flat[:, start:start + _CHUNK].abs().contiguous()
        yield chunk.view(as_int).to(torch.int64)


def digit_histogram(values: Tensor, shift: int, prefix: Optional[Tensor]) -> Tensor:
    """Per row, how many entries have each value of the 16-bit digit at ``shift``, among those
    whose higher bits equal that row's ``prefix`` (all entries when ``prefix`` is ``None``):
    ``(T, 2^16)`` int64."""
    counts = torch.zeros(values.shape[0], _BUCKETS, dtype=torch.int64)
    for bits in _bit_chunks(values):
        digits = (bits >> shift) & (_BUCKETS - 1)
        if prefix is not None:
            inside = (bits >> (shift + 16)) == prefix.unsqueeze(1)
            digits = torch.where(inside, digits, torch.full_like(digits, _BUCKETS))
        counts += _row_bincount(digits)
    return counts


def _row_bincount(codes: Tensor) -> Tensor:
    """``bincount`` of each row of non-negative ``codes`` (values up to ``2^16``, the last one
    a discard bucket)."""
    rows = codes.shape[0]
    offsets = torch.arange(rows, dtype=torch.int64).unsqueeze(1) * (_BUCKETS + 1)
    counts = torch.bincount((codes + offsets).reshape(-1), minlength=rows * (_BUCKETS + 1))
    return counts.reshape(rows, _BUCKETS + 1)[:, :_BUCKETS]


def bucket_of_rank(histogram: Tensor, ranks: Sequence[int]) -> tuple[Tensor, Tensor]:
    """For each row: the bucket holding its ``ranks[row]``-th smallest entry (1-based) and that
    entry's rank inside the bucket."""
    cumulative = histogram.cumsum(dim=1)
    wanted = torch.as_tensor(list(ranks), dtype=torch.int64).unsqueeze(1)
    bucket = (cumulative < wanted).sum(dim=1)
    before = torch.where(bucket > 0, cumulative.gather(1, (bucket - 1).clamp(min=0).unsqueeze(1))
                         .squeeze(1), torch.zeros_like(bucket))
    return bucket, wanted.squeeze(1) - before


def threshold_values(bits: Tensor, dtype: torch.dtype) -> Tensor:
    """The non-negative ``dtype`` values whose bit patterns are ``bits``, one per row."""
    if dtype == torch.float32:
        return bits.to(torch.int32).view(torch.float32)
    return bits.view(torch.float64)


def trimmed(values: Tensor, thresholds: Tensor) -> Tensor:
    """``values * (|values| >= threshold of its row)``, as FusionBench's ``topk_values_mask``."""
    shape = (values.shape[0],) + (1,) * (values.dim() - 1)
    return values * (values.abs() >= thresholds.to(values.dtype).reshape(shape))


def elected_signs(kept: Tensor) -> Tensor:
    """``sign(Σ_t kept_t)`` per entry, before zeros are resolved (FusionBench's
    ``resolve_sign`` without its ``resolve_zero_signs``)."""
    return torch.sign(kept.sum(dim=0))


def disjoint_merge(kept: Tensor, signs: Tensor, majority: float, merge_func: str) -> Tensor:
    """FusionBench's ``disjoint_merge`` of one parameter: entries agreeing with the elected sign
    (zeros resolved to ``majority``), summed, averaged or the largest magnitude."""
    signs = signs.clone()
    signs[signs == 0] = majority
    rows_to_keep = torch.where(signs.unsqueeze(0) > 0, kept > 0, kept < 0)
    selected = kept * rows_to_keep
    func = merge_func.split("-")[-1]
    if func == "mean":
        counts = (selected != 0).sum(dim=0).float()
        return torch.sum(selected, dim=0) / torch.clamp(counts, min=1)
    if func == "sum":
        return torch.sum(selected, dim=0)
    if func == "max":
        return selected.abs().max(dim=0)[0] * signs
    raise ValueError(f"merge_func must be one of {list(MERGE_FUNCS)}; got {merge_func!r}")
