"""Dataset loaders our paper configs call through ``_target_`` (hub ids or local copies alike), and
the task pools' tokenizer loader.

Every dataset id in ``config/taskpool/ace_paper/`` goes through ``${ace_hf:<owner>/<name>}``, so
with ``FUSION_BENCH_ACE_HF_ROOT`` set the loader receives a local directory instead of the id. A
local copy may be either layout:

- a snapshot of the hub repository (``huggingface-cli download --repo-type dataset <id>
  --local-dir $FUSION_BENCH_ACE_HF_ROOT/<id>``): read with :func:`datasets.load_dataset`, as the
  hub id would be;
- a ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk`` directory (for a repository with
  configurations, one per configuration: ``<id>/<config name>/``): read with
  :func:`datasets.load_from_disk`.

Every loader takes ``validation``: ``None`` loads ``split``; ``{split, fraction, seed}`` loads that
split (the task's train split) and keeps the held-out part FusionBench's
``fusion_bench.utils.data.train_validation_split`` draws (its ``dataset/image_classification/val``
configs: 10 % of train, seed 0) - data for tuning hyper-parameters, never the test split. The
task pools' ``_validation`` key switches every task at once (see ``config/compare/*.yaml``).
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Optional

SAVED_MARKERS = ("dataset_dict.json", "state.json")


def load_tokenizer(spec: Any):
    """A task pool's ``tokenizer:``: a name or path for ``AutoTokenizer.from_pretrained``, or a
    config to instantiate (e.g. FusionBench's ``load_gpt2_tokenizer``)."""
    if isinstance(spec, str):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(spec)
    from fusion_bench.utils import instantiate

    return instantiate(spec)


def is_saved_to_disk(path: str) -> bool:
    return os.path.isdir(path) and any(os.path.isfile(os.path.join(path, m)) for m in SAVED_MARKERS)


def holdout(dataset, fraction: float, seed: int):
    """The validation part of ``dataset`` as FusionBench's ``train_validation_split`` draws it
    (``fraction`` of the rows, at least one, in a seeded permutation), as a ``datasets.Dataset``."""
    from fusion_bench.utils.data import train_validation_split

    if not 0 < fraction < 1:
        raise ValueError(f"validation fraction must be in (0, 1), got {fraction}")
    if len(dataset) < 2:
        raise ValueError(f"cannot hold out validation rows from a split of {len(dataset)} rows")
    size = max(1, int(len(dataset) * fraction))
    part = train_validation_split(dataset, validation_fraction=None, validation_size=size,
                                  random_seed=seed, return_split="val")
    return dataset.select(part.indices)


def _validation_or(split: Optional[str], validation: Optional[Mapping]) -> Optional[str]:
    if validation is None:
        return split
    missing = {"split", "fraction", "seed"} - set(validation)
    if missing:
        raise ValueError(f"validation needs split, fraction and seed; missing {sorted(missing)}")
    return validation["split"]


def load_hf_dataset(path: str, split: Optional[str] = None, name: Optional[str] = None,
                    validation: Optional[Mapping] = None, **kwargs):
    """``datasets.load_dataset(path, name, split=split)``, or ``load_from_disk`` for a saved copy;
    with ``validation``, the held-out part of ``validation["split"]`` instead (see above)."""
    dataset = _load(path, _validation_or(split, validation), name, **kwargs)
    if validation is None:
        return dataset
    return holdout(dataset, validation["fraction"], validation["seed"])


def _load(path: str, split: Optional[str], name: Optional[str], **kwargs):
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


def load_fer2013(path: str = "clip-benchmark/wds_fer2013", split: str = "test",
                 validation: Optional[Mapping] = None):
    """FusionBench's FER2013 (``fusion_bench.dataset.fer2013.load_fer2013``) from a hub id or a
    local copy."""
    dataset = load_hf_dataset(path, split=split, validation=validation)
    drop = [c for c in ("__key__", "__url__") if c in dataset.column_names]
    if drop:
        dataset = dataset.remove_columns(drop)
    renames = {
        k: v for k, v in {"jpg": "image", "cls": "label"}.items() if k in dataset.column_names
    }
    return dataset.rename_columns(renames) if renames else dataset
