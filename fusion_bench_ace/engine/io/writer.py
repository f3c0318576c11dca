"""Write a Hugging Face checkpoint directory tensor by tensor, and never leave a half-written one.

:class:`ShardedSafetensorsWriter` writes sharded safetensors files whose layout (shard of each
tensor, byte offsets, headers, ``model.safetensors.index.json``) is planned up front from the
tensors' names, shapes and dtypes, so each tensor's bytes go to disk the moment it is produced:
no shard is buffered in memory and the merged model never exists whole. The files follow the
safetensors format (a little-endian u64 header length, a JSON header padded with spaces to a
multiple of 8 bytes, then the raw little-endian bytes) and Hugging Face's naming (``model.
safetensors`` for one shard, else ``model-00001-of-0000N.safetensors`` plus the index), so
``transformers``' ``from_pretrained`` and ``safetensors.safe_open`` read them like
``save_pretrained``'s output.
Callers write into :func:`fusion_bench_ace.atomic.staged_path`, so the final directory either does
not exist or is complete.

No FusionBench or transformers import (MergeKit's ``TensorWriter`` plays this role there).
"""

from __future__ import annotations

import json
import os
import re
import struct
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

__all__ = [
    "SAFE_INDEX",
    "SAFE_WEIGHTS",
    "ShardedSafetensorsWriter",
    "TensorSpec",
    "parse_size",
]

SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_SIZE = "5GB"  # transformers' save_pretrained default

# safetensors' dtype codes (https://github.com/huggingface/safetensors, format description)
DTYPE_CODES: Dict[torch.dtype, str] = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL",
}
CODE_DTYPES: Dict[str, torch.dtype] = {code: dtype for dtype, code in DTYPE_CODES.items()}

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(size: Union[int, str]) -> int:
    """Bytes of ``size``: an int, or ``"5GB"`` / ``"500MiB"``-style strings (as transformers)."""
    if isinstance(size, bool):
        raise ValueError(f"size must be bytes or a string like '5GB'; got {size!r}")
    if isinstance(size, int):
        value = size
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]I?B|B)?\s*", str(size), re.IGNORECASE)
        if match is None:
            raise ValueError(f"size must be bytes or a string like '5GB' or '500MiB'; got {size!r}")
        value = int(float(match.group(1)) * _UNITS[(match.group(2) or "").upper()])
    if value <= 0:
        raise ValueError(f"size must be positive; got {size!r}")
    return value


@dataclass(frozen=True)
class TensorSpec:
    """What will be written under ``name``: its shape and dtype."""

    name: str
    shape: Tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        count = 1
        for size in self.shape:
            count *= size
        return count * torch.empty((), dtype=self.dtype).element_size()

    @property
    def itemsize(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()


def plan_shards(specs: Sequence[TensorSpec], max_shard_bytes: int) -> List[List[TensorSpec]]:
    """Consecutive groups of ``specs`` of at most ``max_shard_bytes`` each (a larger tensor goes
    alone in its shard, as in ``save_pretrained``)."""
    shards: List[List[TensorSpec]] = []
    current: List[TensorSpec] = []
    size = 0
    for spec in specs:
        if current and size + spec.nbytes > max_shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(spec)
        size += spec.nbytes
    if current:
        shards.append(current)
    return shards


class _Shard:
    """One safetensors file: its header and every tensor's offset, fixed before any byte."""

    def __init__(self, path: Path, specs: Sequence[TensorSpec], metadata: Mapping[str, str]):
        self.path = path
        self.specs = {spec.name: spec for spec in specs}
        # larger items first, so that each tensor starts aligned to its own item size
        ordered = sorted(specs, key=lambda s: -s.itemsize)
        header: Dict[str, object] = {"__metadata__": dict(metadata)} if metadata else {}
        self.offsets: Dict[str, int] = {}
        offset = 0
        for spec in ordered:
            header[spec.name] = {"dtype": DTYPE_CODES[spec.dtype], "shape": list(spec.shape),
                                 "data_offsets": [offset, offset + spec.nbytes]}
            self.offsets[spec.name] = offset
            offset += spec.nbytes
        self.data_bytes = offset
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)
        self.prefix = struct.pack("<Q", len(encoded)) + encoded
        self.pending: set = set()
        self.handle = None

    def create(self) -> None:
        """The file at its full size: the header, then zeros where the tensors go."""
        with open(self.path, "wb") as handle:
            handle.write(self.prefix)
            handle.truncate(len(self.prefix) + self.data_bytes)

    def write(self, name: str, tensor: Tensor) -> None:
        if self.handle is None:  # the file exists (create): only this writer's bytes change
            self.handle = open(self.path, "r+b")
        data = tensor.detach().to("cpu").contiguous().reshape(-1)
        self.handle.seek(len(self.prefix) + self.offsets[name])
        if data.numel():
            self.handle.write(memoryview(data.view(torch.uint8).numpy()))
        self.pending.discard(name)
        if not self.pending:
            self.close()

    def close(self) -> None:
        if self.handle is not None:
            self.handle.flush()
            os.fsync(self.handle.fileno())
            self.handle.close()
            self.handle = None


class ShardedSafetensorsWriter:
    """Write the tensors of ``specs`` into ``directory`` as they come, in the order of ``specs``.

    Args:
        directory: an existing (empty, usually staged) directory.
        specs: every tensor to be written, in the order :meth:`write` will receive them.
        max_shard_size: bytes per file (int, or ``"5GB"``-style); a larger tensor gets its own.
        metadata: the files' ``__metadata__`` (``{"format": "pt"}`` as ``save_pretrained``).

        names: the tensors this writer writes, in the order of ``specs`` (default: all). The
            files' layout is that of all of ``specs`` whatever ``names`` is, so writers of
            disjoint ``names`` (the processes of one merge) fill the same files as one writer of
            every tensor would, byte for byte.
        create_files: create every file at its full size now (header, zeros for the data);
            ``False``: the files exist (another writer created them), open them to write into.

    :meth:`write` checks each tensor against its spec (name in order, shape, dtype) and writes
    its bytes straight to its place in its shard; :meth:`finish` checks that all were written and
    writes the index (when there is more than one shard). Memory: the tensor being written.
    """

    def __init__(
        self,
        directory: Union[str, os.PathLike],
        specs: Sequence[TensorSpec],
        max_shard_size: Union[int, str] = DEFAULT_MAX_SHARD_SIZE,
        metadata: Optional[Mapping[str, str]] = None,
        *,
        names: Optional[Sequence[str]] = None,
        create_files: bool = True,
    ):
        if sys.byteorder != "little":  # pragma: no cover - every platform torch ships for
            raise RuntimeError("safetensors files are little-endian; this machine is not")
        all_names = [spec.name for spec in specs]
        if len(set(all_names)) != len(all_names):
            raise ValueError("tensor names must be unique")
        unsupported = sorted({str(s.dtype) for s in specs if s.dtype not in DTYPE_CODES})
        if unsupported:
            raise ValueError(f"dtypes not supported by the writer: {unsupported}")
        self.directory = Path(directory)
        self.specs = list(specs)
        groups = plan_shards(self.specs, parse_size(max_shard_size))
        metadata = {"format": "pt"} if metadata is None else dict(metadata)
        if len(groups) == 1:
            files = [SAFE_WEIGHTS]
        else:
            files = [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
                     for i in range(len(groups))]
        self.shards = [_Shard(self.directory / f, g, metadata) for f, g in zip(files, groups)]
        self.weight_map = {spec.name: file for file, group in zip(files, groups) for spec in group}
        self._shard_of = {name: shard for shard in self.shards for name in shard.specs}
        self.total_size = sum(spec.nbytes for spec in self.specs)
        if names is not None:
            unknown = sorted(set(names) - set(self._shard_of))
            if unknown:
                raise ValueError(f"names not among the planned tensors: {unknown[:3]}")
            chosen = set(names)
            self.specs = [spec for spec in self.specs if spec.name in chosen]
        for spec in self.specs:
            self._shard_of[spec.name].pending.add(spec.name)
        self._next = 0
        if create_files:
            for shard in self.shards:
                shard.create()

    def write(self, name: str, tensor: Tensor) -> None:
        if self._next >= len(self.specs):
            raise ValueError(f"unexpected tensor '{name}': every planned tensor is written")
        spec = self.specs[self._next]
        if name != spec.name:
            raise ValueError(f"expected tensor '{spec.name}' next, got '{name}'")
        if tuple(tensor.shape) != spec.shape or tensor.dtype != spec.dtype:
            raise ValueError(
                f"tensor '{name}': {tuple(tensor.shape)} {tensor.dtype}, planned "
                f"{spec.shape} {spec.dtype}"
            )
        self._shard_of[name].write(name, tensor)
        self._next += 1

    def finish(self, write_index: bool = True) -> List[str]:
        """Check that this writer's tensors were all written, write the index if sharded (and
        ``write_index``: one writer of several writes it); returns the files."""
        if self._next != len(self.specs):
            missing = [s.name for s in self.specs[self._next:]]
            raise ValueError(f"{len(missing)} planned tensors were not written, e.g. {missing[:3]}")
        files = sorted({shard.path.name for shard in self.shards})
        if len(self.shards) > 1 and write_index:
            index = {"metadata": {"total_size": self.total_size}, "weight_map": self.weight_map}
            (self.directory / SAFE_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True))
            files.append(SAFE_INDEX)
        return files

    def abort(self) -> None:
        for shard in self.shards:
            shard.close()
