"""Dataset loaders our paper configs call through ``_target_``: hub ids or local copies alike.

Every dataset id in ``config/taskpool/ace_paper/`` goes through ``${ace_hf:<owner>/<name>}``, so
with ``FUSION_BENCH_ACE_HF_ROOT`` set the loader receives a local directory instead of the id. A
local copy may be either layout:

- a snapshot of the hub repository (``huggingface-cli download --repo-type dataset <id>
  --local-dir $FUSION_BENCH_ACE_HF_ROOT/<id>``): read with :func:`datasets.load_dataset`, as the
  hub id would be;
- a ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk`` directory (for a repository with
  configurations, one per configuration: ``<id>/<config name>/``): read with
  :func:`datasets.load_from_disk`.
"""

from __future__ import annotations

import os
from typing import Optional

SAVED_MARKERS = ("dataset_dict.json", "state.json")


def is_saved_to_disk(path: str) -> bool:
    return os.path.isdir(path) and any(os.path.isfile(os.path.join(path, m)) for m in SAVED_MARKERS)


def load_hf_dataset(path: str, split: Optional[str] = None, name: Optional[str] = None, **kwargs):
    """``datasets.load_dataset(path, name, split=split)``, or ``load_from_disk`` of a saved copy."""
    import datasets

    if os.path.isdir(path):
        for candidate in ([os.path.join(path, name)] if name else []) + [path]:
            if is_saved_to_disk(candidate):
                loaded = datasets.load_from_disk(candidate)
                if isinstance(loaded, datasets.DatasetDict):
                    if split is None:
                        return loaded
                    if split not in loaded:
                        raise KeyError(f"{candidate} has splits {list(loaded)}, not {split!r}")
                    return loaded[split]
                return loaded
    return datasets.load_dataset(path, name, split=split, **kwargs)


def load_fer2013(path: str = "clip-benchmark/wds_fer2013", split: str = "test"):
    """FusionBench's FER2013 (``fusion_bench.dataset.fer2013.load_fer2013``) from a hub id or a
    local copy."""
    dataset = load_hf_dataset(path, split=split)
    drop = [c for c in ("__key__", "__url__") if c in dataset.column_names]
    if drop:
        dataset = dataset.remove_columns(drop)
    renames = {
        k: v for k, v in {"jpg": "image", "cls": "label"}.items() if k in dataset.column_names
    }
    return dataset.rename_columns(renames) if renames else dataset
