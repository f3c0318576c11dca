"""Functions FusionBench calls (through ``_target_`` in our pool configs) to load built tracks."""

from __future__ import annotations

import json
from pathlib import Path

SPLIT_DIRECTORIES = {"test": "data", "validation": "validation"}
"""Where the CLIP track saves each evaluated split (``fusion_bench_ace.mini.clip``)."""


def load_clip_task(name: str, root: str, split: str = "test"):
    """The ``split`` (``test``, or ``validation`` for tuning) of CLIP task ``name``; registers its
    class names and prompt templates first.

    FusionBench's CLIP task pool looks class names and templates up by task name in
    ``CLIPTemplateFactory``; registering here, while the pool instantiates its datasets, makes
    them known in the process that evaluates.
    """
    import datasets
    from fusion_bench.tasks.clip_classification import CLIPTemplateFactory

    spec = json.loads((Path(root) / "tasks.json").read_text())[name]
    classnames = list(spec["classnames"])
    templates = [lambda c, t=template: t.format(c) for template in spec["templates"]]
    # register_dataset(classnames=..., templates=...) alone stores the templates under a
    # misspelt key in fusion-bench 0.2.33; passing dataset_info with the right keys avoids it.
    CLIPTemplateFactory._dataset_mapping.pop(name, None)
    CLIPTemplateFactory.register_dataset(
        name,
        dataset_info={"classnames": classnames, "templates": templates},
        classnames=classnames,
        templates=templates,
    )
    if split not in SPLIT_DIRECTORIES:
        raise ValueError(f"unknown split {split!r} of the CLIP track; known: "
                         f"{', '.join(SPLIT_DIRECTORIES)}")
    return datasets.load_from_disk(str(Path(root) / SPLIT_DIRECTORIES[split] / name))
