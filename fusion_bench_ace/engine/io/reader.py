"""Read experts' safetensors checkpoints tensor by tensor, so a merge holds about one model.

The in-memory path loads every expert as a model (``T`` models in memory). When the experts are
safetensors checkpoints (a Hugging Face ``save_pretrained`` directory, sharded or not, or a
``.safetensors`` file), :class:`SafetensorsStateDict` is a read-only ``Mapping[str, Tensor]`` that
opens the file, reads one tensor and closes it again on every lookup, so the merge driver
(:func:`fusion_bench_ace.engine.driver.merged_tensors`, which asks for one parameter of every expert
at a time) keeps only one parameter's task vectors of all experts in memory, whatever ``T``.
Each lookup opens and closes the file, so no memory map stays open and the pages read do not
accumulate in the process's resident memory.

Keys are matched to the pretrained model's state dict (:func:`match_keys`): exact names, names
under one common prefix (``transformer.h.0...`` in a ``GPT2ForSequenceClassification`` checkpoint
loaded as a ``GPT2Model``), and tied weights stored once. Each tensor is cast to the pretrained
parameter's dtype on read, as ``from_pretrained`` casts it into a model of that dtype, so the task
vectors, and hence the merge, are bit-identical to loading the experts as models of the
pretrained model's dtype.

No FusionBench import (the adapter decides when to stream: ``streaming: auto|true|false``).
"""

from __future__ import annotations

import json
import os
from typing import Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch
from safetensors import safe_open
from torch import Tensor

from .writer import CODE_DTYPES, SAFE_INDEX, SAFE_WEIGHTS

__all__ = [
    "SafetensorsStateDict",
    "StreamingUnavailable",
    "match_keys",
    "open_checkpoint",
    "open_expert",
    "safetensors_files",
]

class StreamingUnavailable(ValueError):
    """The checkpoint cannot be streamed (not safetensors, or keys that do not match)."""


def safetensors_files(path: str | os.PathLike) -> Optional[Dict[str, str]]:
    """``{tensor key: file}`` of a safetensors checkpoint, or ``None`` if ``path`` is not one.

    ``path``: a ``.safetensors`` file, or a directory holding ``model.safetensors`` or a sharded
    ``model.safetensors.index.json``. Only the headers are read.
    """
    path = os.fspath(path)
    if os.path.isfile(path) and path.endswith(".safetensors"):
        files = [path]
    elif os.path.isfile(os.path.join(path, SAFE_INDEX)):
        with open(os.path.join(path, SAFE_INDEX)) as handle:
            weight_map = json.load(handle)["weight_map"]
        return {key: os.path.join(path, shard) for key, shard in weight_map.items()}
    elif os.path.isfile(os.path.join(path, SAFE_WEIGHTS)):
        files = [os.path.join(path, SAFE_WEIGHTS)]
    else:
        return None
    keys = {}
    for file in files:
        with safe_open(file, framework="pt") as handle:
            for key in handle.keys():
                keys[key] = file
    return keys


def _file_headers(files: Mapping[str, str]) -> Dict[str, Tuple[Tuple[int, ...], torch.dtype]]:
    """``{key: (shape, dtype)}`` from the files' headers (no tensor is read)."""
    headers = {}
    by_file: Dict[str, List[str]] = {}
    for key, file in files.items():
        by_file.setdefault(file, []).append(key)
    for file, keys in by_file.items():
        with safe_open(file, framework="pt") as handle:
            for key in keys:
                view = handle.get_slice(key)
                code = view.get_dtype()
                if code not in CODE_DTYPES:
                    raise StreamingUnavailable(f"{file}: tensor '{key}' has dtype {code}, "
                                               "which the merge does not read")
                headers[key] = (tuple(view.get_shape()), CODE_DTYPES[code])
    return headers


def match_keys(
    reference: Mapping[str, Tensor], file_keys: Sequence[str]
) -> Tuple[Dict[str, str], List[str]]:
    """Map the reference state dict's names to checkpoint keys; returns ``(mapping, unmatched)``.

    A name maps to the same key, else to ``prefix + name`` for the one prefix (e.g.
    ``"transformer."``) that matches the most names, else (tied weights saved once) to the key of
    another reference name sharing its storage.
    """
    available = set(file_keys)
    mapping: Dict[str, str] = {name: name for name in reference if name in available}
    missing = [name for name in reference if name not in mapping]
    if missing:
        votes: Dict[str, int] = {}
        for name in missing:
            for key in available:
                if key.endswith("." + name):
                    prefix = key[: -len(name)]
                    votes[prefix] = votes.get(prefix, 0) + 1
        if votes:
            prefix = max(votes, key=votes.get)
            for name in missing:
                if prefix + name in available:
                    mapping[name] = prefix + name
    # tied weights: one storage under several names, saved once
    by_storage: Dict[Tuple[int, int], str] = {}
    for name, tensor in reference.items():
        if name in mapping and tensor.device.type != "meta":
            storage = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
            by_storage.setdefault(storage, name)
    unmatched = []
    for name, tensor in reference.items():
        if name in mapping:
            continue
        twin = None
        if tensor.device.type != "meta":
            twin = by_storage.get((tensor.untyped_storage().data_ptr(), tensor.storage_offset()))
        if twin is not None:
            mapping[name] = mapping[twin]
        else:
            unmatched.append(name)
    return mapping, unmatched


class SafetensorsStateDict(Mapping[str, Tensor]):
    """A lazy, read-only state dict over a safetensors checkpoint (see the module notes).

    Args:
        files: ``{checkpoint key: file}`` (:func:`safetensors_files`).
        key_map: ``{name: checkpoint key}``; the mapping's names are exactly its keys.
        dtypes: ``{name: dtype}`` each tensor is cast to on read (default: as stored).
    """

    def __init__(
        self,
        files: Mapping[str, str],
        key_map: Mapping[str, str],
        dtypes: Optional[Mapping[str, torch.dtype]] = None,
    ):
        self._files = dict(files)
        self._key_map = dict(key_map)
        self._dtypes = dict(dtypes or {})
        self.reads = 0  # tensors read so far (tests and diagnostics)

    def __getitem__(self, name: str) -> Tensor:
        key = self._key_map[name]
        with safe_open(self._files[key], framework="pt") as handle:
            tensor = handle.get_tensor(key)
        self.reads += 1
        dtype = self._dtypes.get(name)
        return tensor if dtype is None or tensor.dtype == dtype else tensor.to(dtype)

    def __iter__(self) -> Iterator[str]:
        return iter(self._key_map)

    def __len__(self) -> int:
        return len(self._key_map)

    def shapes(self) -> Dict[str, Tuple[int, ...]]:
        """``{name: shape}`` from the headers, without reading any tensor."""
        return {name: tensor.shape for name, tensor in self.meta().items()}

    def meta(self) -> Dict[str, Tensor]:
        """``{name: meta tensor}`` of the shape stored and the dtype read (the cast dtype if one
        is set, else the stored one): for planning and shape checks, no memory."""
        headers = _file_headers({key: self._files[key] for key in set(self._key_map.values())})
        meta = {}
        for name, key in self._key_map.items():
            shape, stored = headers[key]
            meta[name] = torch.empty(shape, dtype=self._dtypes.get(name, stored), device="meta")
        return meta


def open_expert(
    path: str | os.PathLike, reference: Mapping[str, Tensor]
) -> Tuple[SafetensorsStateDict, List[str]]:
    """A lazy state dict of the checkpoint at ``path`` named and typed like ``reference``.

    Returns ``(state dict, names of reference missing from the checkpoint)``. Raises
    :class:`StreamingUnavailable` if ``path`` is not a safetensors checkpoint.
    """
    files = safetensors_files(path)
    if files is None:
        raise StreamingUnavailable(f"{os.fspath(path)!r} is not a safetensors checkpoint")
    mapping, unmatched = match_keys(reference, list(files))
    dtypes = {name: reference[name].dtype for name in mapping}
    return SafetensorsStateDict(files, mapping, dtypes), unmatched


def open_checkpoint(
    path: str | os.PathLike, dtype: Optional[torch.dtype] = None
) -> SafetensorsStateDict:
    """A lazy state dict of the checkpoint at ``path`` under its own keys.

    ``dtype``: floating-point tensors are cast to it on read (as ``from_pretrained(...,
    torch_dtype=dtype)`` casts them), other tensors keep their stored dtype; ``None`` keeps every
    stored dtype. Raises :class:`StreamingUnavailable` if ``path`` is not a safetensors checkpoint.
    """
    files = safetensors_files(path)
    if files is None:
        raise StreamingUnavailable(f"{os.fspath(path)!r} is not a safetensors checkpoint")
    state = SafetensorsStateDict(files, {key: key for key in files})
    if dtype is not None:
        state = SafetensorsStateDict(files, {key: key for key in files}, {
            name: dtype for name, tensor in state.meta().items() if tensor.is_floating_point()
        })
    return state

