"""Stand-ins for the open_clip (task-vectors) checkpoints: tiny encoders under the real names.

The task-vectors checkpoints are pickled ``src.modeling.ImageEncoder`` / ``ClassificationHead``
modules (see ``facts.OPENCLIP_SOURCE``); the stand-ins are pickled the same way, class names
included, so FusionBench's ``src.modeling`` redirect is exercised.

The architecture is the one deviation from a real run: our model pool builds the encoder with
``open_clip.create_model_and_transforms(<model name>)``, and a ViT-B-32 of the real size is 88M
parameters per checkpoint. The builder therefore writes tiny open_clip configs under the real
names (``ViT-B-32.json`` ...) and a ``sitecustomize.py`` that, in every Python process started with
the returned ``PYTHONPATH``, registers them with open_clip when open_clip is first imported.
"""

from __future__ import annotations

import contextlib
import json
import sys
import types
from pathlib import Path
from typing import Dict, Iterator, Tuple

import torch

from .facts import OPENCLIP_MODULE
from .models import TINY, perturbed, stable_seed

SITECUSTOMIZE = '''\
"""Written by fusion_bench_ace.rehearsal: open_clip's {names} replaced by tiny configs of the
same names (stand-in checkpoints), registered whenever open_clip is imported."""
import importlib.abc
import importlib.machinery
import sys

CONFIG_DIR = {config_dir!r}


class _RegisterTinyConfigs(importlib.abc.MetaPathFinder):
    # stays installed: importlib.util.find_spec("open_clip") (an availability check) asks finders
    # too, and the spec it gets is not the one the import later executes
    def find_spec(self, name, path=None, target=None):
        if name != "open_clip":
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None:
            return None
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            module.add_model_config(CONFIG_DIR)

        spec.loader.exec_module = exec_module
        return spec


sys.meta_path.insert(0, _RegisterTinyConfigs())
'''


def tiny_config(model_name: str) -> dict:
    """open_clip's config of ``model_name`` with every width/depth shrunk (patch and image size,
    context length and vocabulary kept)."""
    import open_clip

    real = open_clip.get_model_config(model_name)
    if real is None:
        raise KeyError(f"open_clip has no model config {model_name!r}")
    return {
        "embed_dim": TINY["projection"],
        "vision_cfg": {**real["vision_cfg"], "layers": TINY["layers"], "width": TINY["hidden"],
                       "head_width": TINY["hidden"] // TINY["heads"]},
        "text_cfg": {**real["text_cfg"], "layers": TINY["layers"], "width": TINY["hidden"],
                     "heads": TINY["heads"]},
    }


@contextlib.contextmanager
def pickled_as_task_vectors_classes() -> Iterator[None]:
    """Pickle FusionBench's ImageEncoder/ClassificationHead under the task-vectors code's names
    (``src.modeling.*``), as the real checkpoints were written."""
    from fusion_bench.models.open_clip import modeling

    classes = (modeling.ImageEncoder, modeling.ClassificationHead)
    package, _, _ = OPENCLIP_MODULE.partition(".")
    saved_modules = {name: sys.modules.get(name) for name in (package, OPENCLIP_MODULE)}
    saved_names = {cls: cls.__module__ for cls in classes}
    fake = types.ModuleType(OPENCLIP_MODULE)
    for cls in classes:
        setattr(fake, cls.__name__, cls)
        cls.__module__ = OPENCLIP_MODULE
    sys.modules.setdefault(package, types.ModuleType(package))
    sys.modules[OPENCLIP_MODULE] = fake
    try:
        yield
    finally:
        for cls, name in saved_names.items():
            cls.__module__ = name
        for name, module in saved_modules.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


def _encoder(model_name: str, state=None):
    """A FusionBench ImageEncoder around a tiny open_clip CLIP (QuickGELU, as OpenAI's), text
    transformer removed as ImageEncoder does."""
    from fusion_bench.models.open_clip.modeling import ImageEncoder
    from open_clip.model import CLIP
    from open_clip.transform import PreprocessCfg, image_transform_v2

    config = tiny_config(model_name)
    torch.manual_seed(stable_seed(f"open_clip {model_name}"))
    model = CLIP(config["embed_dim"], config["vision_cfg"], config["text_cfg"], quick_gelu=True)
    del model.transformer
    encoder = ImageEncoder.__new__(ImageEncoder)
    torch.nn.Module.__init__(encoder)
    encoder.model = model
    preprocess = PreprocessCfg(size=config["vision_cfg"]["image_size"])
    encoder.train_preprocess = image_transform_v2(preprocess, is_train=True)
    encoder.val_preprocess = image_transform_v2(preprocess, is_train=False)
    encoder.cache_dir = None
    if state is not None:
        encoder.load_state_dict(state)
    return encoder.eval()


def build_openclip(encoders: Dict[str, str], heads: Dict[str, Tuple[str, str]], root: Path,
                   num_classes) -> Dict[str, str]:
    """Write the pickled encoders and heads the configs name, the tiny configs and the
    sitecustomize; return the environment the runs need (``PYTHONPATH`` entry)."""
    from fusion_bench.models.open_clip.modeling import ClassificationHead

    names = sorted(set(encoders.values()) | {name for name, _ in heads.values()})
    config_dir = root / "open_clip_configs"
    python_dir = root / "python"
    config_dir.mkdir(parents=True, exist_ok=True)
    python_dir.mkdir(parents=True, exist_ok=True)
    for name in names:
        (config_dir / f"{name}.json").write_text(json.dumps(tiny_config(name), indent=1))
    (python_dir / "sitecustomize.py").write_text(
        SITECUSTOMIZE.format(names=", ".join(names), config_dir=str(config_dir)))

    bases = {name: _encoder(name) for name in names}
    with pickled_as_task_vectors_classes():
        for path, name in encoders.items():
            if Path(path).is_file():
                continue
            task = Path(path).parent.name
            zeroshot = Path(path).name == "zeroshot.pt"
            state = bases[name].state_dict()
            encoder = _encoder(name, state if zeroshot else perturbed(state, task))
            _save(encoder, Path(path))
        for path, (name, task) in heads.items():
            if Path(path).is_file():
                continue
            generator = torch.Generator().manual_seed(stable_seed(f"head {name} {task}"))
            weights = torch.randn(num_classes(task), TINY["projection"], generator=generator)
            _save(ClassificationHead(normalize=True, weights=weights), Path(path))
    return {"PYTHONPATH": str(python_dir)}


def _save(module: torch.nn.Module, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    torch.save(module, partial)
    partial.replace(path)
