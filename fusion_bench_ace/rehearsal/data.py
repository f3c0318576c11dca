"""Stand-in dataset repositories: a few rows per split, in the real repository's layout.

A parquet repository is written as the hub serves it after ``huggingface-cli download``:
``README.md`` with a ``configs:`` block naming each configuration's split files, and one parquet
file per split (the ``datasets`` features - image, class label - travel in the parquet metadata),
so ``datasets.load_dataset(<local dir>, <configuration>, split=...)`` reads it exactly as it reads
the real one. A webdataset repository is tar shards of ``<key>.<column>`` members.
"""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path
from typing import Dict, List

import numpy as np

from .facts import DatasetRepo, Subset

WORDS = ("the film was a delight and a dull tired plot he said that she left early why is the "
         "sky blue two men are playing guitar a man plays markets fell sharply today rain is "
         "expected tomorrow this grammar acceptable not").split()


def _image(rng: np.random.Generator, mode: str, side: int):
    from PIL import Image

    channels = 1 if mode == "L" else 3
    pixels = rng.integers(0, 256, size=(side, side, channels), dtype=np.uint8)
    return Image.fromarray(pixels[..., 0] if channels == 1 else pixels, mode)


def _sentence(rng: np.random.Generator) -> str:
    return " ".join(rng.choice(WORDS, size=int(rng.integers(3, 9))))


def _labels(kind: str, subset: Subset, rows: int):
    """Labels spread evenly over the classes, the first and the last among them (a label set that
    starts at 1, or has fewer classes than FusionBench expects, shows up)."""
    if kind == "bool":
        return [bool(i % 2) for i in range(rows)]
    if kind == "float":
        return [round(5.0 * i / max(rows - 1, 1), 3) for i in range(rows)]
    n = int(kind.split(":")[1]) if ":" in kind else subset.num_labels
    return [round(i * (n - 1) / max(rows - 1, 1)) for i in range(rows)]


def _features(subset: Subset):
    from datasets import ClassLabel, Features, Image, Value

    types = {"image": Image(), "bool": Value("bool"), "string": Value("string"),
             "int32": Value("int32"), "float": Value("float32")}
    features = {}
    for name, kind in subset.columns:
        if kind.startswith("label"):
            n = int(kind.split(":")[1]) if ":" in kind else subset.num_labels
            features[name] = ClassLabel(num_classes=n)
        else:
            features[name] = types[kind]
    return Features(features)


def _rows(repo: DatasetRepo, subset: Subset, rows: int, rng: np.random.Generator
          ) -> Dict[str, list]:
    columns: Dict[str, list] = {}
    for name, kind in subset.columns:
        if kind in ("image", "jpg"):
            columns[name] = [_image(rng, *repo.image) for _ in range(rows)]
        elif kind == "string":
            columns[name] = [_sentence(rng) for _ in range(rows)]
        elif kind == "int32":
            columns[name] = list(range(rows))
        else:
            columns[name] = _labels("label" if kind == "cls" else kind, subset, rows)
    return columns


def write_dataset(repo_id: str, repo: DatasetRepo, directory: Path, rows: int, seed: int) -> None:
    from ..mini.gpt2 import quiet_datasets

    rng = np.random.default_rng(seed)
    if repo.layout == "parquet":
        with quiet_datasets():
            _write_parquet(repo, directory, rows, rng)
    elif repo.layout == "webdataset":
        _write_webdataset(repo, directory, rows, rng)
    else:
        raise ValueError(f"{repo_id}: unknown layout {repo.layout!r}")
    for name in repo.extra_files:
        (directory / name).write_text("stand-in\n")


def _write_parquet(repo: DatasetRepo, directory: Path, rows: int, rng) -> None:
    from datasets import Dataset

    card: List[str] = ["---", "configs:"]
    for config, subset in repo.subsets.items():
        card += [f"- config_name: {config}", "  data_files:"]
        for split in subset.splits:
            relative = repo.data_files.format(config=config, split=split)
            path = directory / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            table = Dataset.from_dict(_rows(repo, subset, rows, rng),
                                      features=_features(subset))
            table.to_parquet(str(path))
            card += [f"  - split: {split}",
                     f"    path: {os.path.dirname(relative) or '.'}/{split}-*"]
    card += ["---", "", "Stand-in written by fusion_bench_ace.rehearsal (random rows).", ""]
    (directory / "README.md").write_text("\n".join(card))


def _write_webdataset(repo: DatasetRepo, directory: Path, rows: int, rng) -> None:
    (subset,) = repo.subsets.values()
    key = 0
    for split in subset.splits:
        (directory / split).mkdir(parents=True, exist_ok=True)
        (directory / split / "nshards.txt").write_text(f"{repo.shards}\n")
        for shard in range(repo.shards):
            columns = _rows(repo, subset, rows, rng)
            with tarfile.open(directory / split / f"{shard}.tar", "w") as tar:
                for i in range(rows):
                    for name, kind in subset.columns:
                        if name.startswith("__"):
                            continue  # __key__/__url__ are the member's name and the tar's path
                        if kind == "jpg":
                            buffer = io.BytesIO()
                            columns[name][i].save(buffer, format="JPEG")
                            payload = buffer.getvalue()
                        else:
                            payload = str(columns[name][i]).encode()
                        member = tarfile.TarInfo(f"s{key:07d}.{name}")
                        member.size = len(payload)
                        tar.addfile(member, io.BytesIO(payload))
                    key += 1
