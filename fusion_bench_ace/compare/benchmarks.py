"""The benchmarks the runner knows: ``config/compare/<name>.yaml``, and the papers' numbers.

The methods every benchmark offers are in ``config/compare/_methods.yaml``; the papers' reported
numbers are in ``paper_numbers.yaml`` beside this file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional, Sequence

import yaml

from ..paths import config_dir
from .tables import RAW, Row, mean_or_none

PAPER_NUMBERS = Path(__file__).with_name("paper_numbers.yaml")


def compare_config_dir() -> Path:
    return config_dir() / "compare"


def available_benchmarks() -> List[str]:
    return sorted(p.stem for p in compare_config_dir().glob("*.yaml") if not p.stem.startswith("_"))


def load_benchmark(name: str) -> dict:
    path = compare_config_dir() / f"{name}.yaml"
    if not path.is_file():
        raise ValueError(
            f"unknown benchmark {name!r}; available: {', '.join(available_benchmarks())}"
        )
    spec = yaml.safe_load(path.read_text())
    shared = yaml.safe_load((compare_config_dir() / "_methods.yaml").read_text())
    spec["methods"] = {**shared["methods"], **(spec.get("methods") or {})}
    spec["tuned"] = {**shared.get("tuned", {}), **(spec.get("tuned") or {})}
    if spec.get("no_tuned"):  # the reason it offers no tuned rows, shown when one is asked for
        spec["tuned"] = {}
    spec["name"] = name
    return spec


def resolve_methods(spec: dict, requested: Optional[Sequence[str]]) -> List[str]:
    names = list(requested) if requested else list(spec["default_methods"])
    known = [*spec["methods"], *spec.get("tuned", {})]
    unknown = [m for m in names if m not in known]
    if unknown:
        why_not_tuned = f" ({spec['no_tuned']})" if spec.get("no_tuned") else ""
        raise ValueError(
            f"unknown method(s) {unknown} for benchmark {spec['name']!r}; "
            f"available: {', '.join(known)}{why_not_tuned}"
        )
    tuned = [m for m in names if m in spec.get("tuned", {})]
    if tuned and not spec.get("validation"):
        raise ValueError(
            f"{tuned} tune on validation data, which benchmark {spec['name']!r} does not "
            "define (no `validation:` overrides in its config/compare file)"
        )
    return names


def paper_rows(spec: dict) -> List[Row]:
    """The paper's reported numbers for this benchmark (empty when it is not a paper benchmark)."""
    key = spec.get("paper")
    if not key:
        return []
    table = yaml.safe_load(PAPER_NUMBERS.read_text())[key]
    tasks = spec["tasks"]
    rows = []
    for entry in table["rows"]:
        scores = {t: entry.get("scores", {}).get(t) for t in tasks}
        average = entry.get("average", mean_or_none([scores[t] for t in tasks]))
        rows.append(
            Row(
                name=entry["method"],
                scores=scores,
                average=average,
                source=entry.get("source", table["source"]),
                scale=spec.get("paper_scale", RAW),
            )
        )
    return rows


def track_manifest(spec: dict) -> Optional[dict]:
    """The manifest of the embedded-benchmark track ``spec`` runs on (``None``: not a track)."""
    if not spec.get("track"):
        return None
    from ..mini import track_dir
    from ..mini.cache import is_built, read_manifest

    directory = track_dir(spec["track"])
    return read_manifest(directory) if is_built(directory) else None


def track_change_warning(spec: dict, previous_provenance: Path) -> Optional[str]:
    """A warning when the track ``spec`` runs on now is not the one the table whose provenance
    is ``previous_provenance`` (e.g. a committed ``results/.../latest``) was made with."""
    current = track_manifest(spec)
    if current is None or not previous_provenance.is_file():
        return None
    previous = json.loads(previous_provenance.read_text()).get("track_manifest") or {}
    before, now = previous.get("content_hash"), current.get("content_hash")
    if before == now:
        return None
    return (f"WARNING: the '{spec['track']}' track built here (content hash {str(now)[:12]}) is "
            f"not the one {previous_provenance.parent} was made with ({str(before)[:12]}): its "
            "numbers will differ from that table's")
