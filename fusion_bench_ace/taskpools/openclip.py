"""FusionBench's open_clip model and task pools, made usable with Python 3.11 and torch >= 2.6.

Three problems of fusion-bench 0.2.33 stop its ``OpenCLIPVisionModelPool`` from loading the
task-vectors / TSV-M checkpoints correctly here:

1. ``fusion_bench/modelpool/openclip_vision/modelpool.py`` does ``from typing import override``,
   which exists only from Python 3.12 on, so on 3.10/3.11 neither the model pool nor the open_clip
   task pool (which imports from it) can be imported. We lend them ``typing_extensions.override``
   (the backport) as ``typing.override`` while they are imported, and take it back afterwards.
2. Its ``load_model`` reads the pickled encoders with ``torch.load(..., weights_only=True)`` and
   falls back to ``pickle.load`` only on ``RuntimeError``; torch >= 2.6 raises ``UnpicklingError``
   for a pickled module, and ``pickle.load`` cannot read torch's zip format anyway. Our subclass
   loads the two pickled forms (a path string; ``{model_name, pickle_path}``) with
   ``weights_only=False`` - these checkpoints are full pickled modules by design, as the
   task-vectors code wrote them; only load files you trust - and otherwise defers to FusionBench.
3. For ``{model_name, pickle_path}`` FusionBench builds ``ImageEncoder(model_name)``, i.e.
   open_clip's ``ViT-B-32`` with ``pretrained="openai"``: open_clip 3.x (3.3.0 here) builds that
   architecture with exact GELU (and warns "QuickGELU mismatch"), while OpenAI's CLIP - and every
   checkpoint fine-tuned from it - uses QuickGELU; the pickled weights would run through the wrong
   activation. It also downloads OpenAI's weights only to overwrite them. We build the encoder with
   the activation of open_clip's ``openai`` tag for that architecture and no weights (the pickle
   supplies them all); the preprocessing is the same (OpenAI mean/std, bicubic resize to the image
   size, centre crop).

Our ``ace_paper/openclip_*`` configs name these classes as their ``_target_``.
"""

from __future__ import annotations

import contextlib
import logging
import typing
from contextlib import contextmanager
from typing import Iterator, Union

import torch
from omegaconf import DictConfig, OmegaConf


@contextmanager
def _typing_override_lent() -> Iterator[None]:
    """``typing.override`` for the duration of one import on Python < 3.12, removed afterwards.

    FusionBench's open_clip modules do ``from typing import override``; they keep the backport
    they imported, and nothing else in the process ever sees a changed ``typing`` module.
    """
    if hasattr(typing, "override"):
        yield
        return
    from typing_extensions import override

    typing.override = override
    try:
        yield
    finally:
        del typing.override


with _typing_override_lent():
    from fusion_bench.modelpool.openclip_vision import modelpool as _fb
    from fusion_bench.taskpool.openclip_vision.openclip_taskpool import (
        OpenCLIPVisionModelTaskPool,
    )

log = logging.getLogger(__name__)

__all__ = ["OpenCLIPVisionModelPool", "OpenCLIPVisionModelTaskPool", "load_pickled",
           "openai_image_encoder"]


def load_pickled(path: str):
    """A torch-saved (pickled) module or state dict; the task-vectors ``src.*`` names redirected."""
    _fb._check_and_redirect_open_clip_modeling()
    return torch.load(path, map_location="cpu", weights_only=False)


class _DropRandomInitNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("No pretrained weights loaded for model")


@contextlib.contextmanager
def _without_random_init_notice():
    """open_clip warns that a model built without weights is random; ours get theirs next."""
    notice = _DropRandomInitNotice()
    logging.getLogger().addFilter(notice)
    try:
        yield
    finally:
        logging.getLogger().removeFilter(notice)


def openai_image_encoder(model_name: str) -> _fb.ImageEncoder:
    """FusionBench's ``ImageEncoder(model_name)`` as OpenAI's CLIP is built (QuickGELU where its
    ``openai`` weights use it), without downloading weights; the caller loads them."""
    import open_clip
    from fusion_bench.models.open_clip.variables_and_paths import MODELS

    if model_name not in MODELS:
        raise ValueError(f"unknown open_clip model {model_name!r}; FusionBench knows {MODELS}")
    tag = open_clip.get_pretrained_cfg(model_name, "openai") or {}
    encoder = _fb.ImageEncoder.__new__(_fb.ImageEncoder)
    torch.nn.Module.__init__(encoder)
    # as ImageEncoder.__init__ does, with the architecture's own activation and no download
    with _without_random_init_notice():
        encoder.model, encoder.train_preprocess, encoder.val_preprocess = \
            open_clip.create_model_and_transforms(model_name, pretrained=None,
                                                  force_quick_gelu=tag.get("quick_gelu", False))
    encoder.cache_dir = None
    if hasattr(encoder.model, "transformer"):
        delattr(encoder.model, "transformer")  # the text tower (keep_lang=False)
    return encoder


class OpenCLIPVisionModelPool(_fb.OpenCLIPVisionModelPool):
    """FusionBench's pool, reading pickled checkpoints with ``weights_only=False``."""

    def load_model(self, model_name_or_config: Union[str, DictConfig], *args, **kwargs):
        config = model_name_or_config
        if isinstance(config, str) and config in self._models:
            config = self._models[config]
        if isinstance(config, DictConfig):
            config = OmegaConf.to_container(config, resolve=True)
        if isinstance(config, str):
            log.info("loading ImageEncoder from %s", config)
            encoder = load_pickled(config)
        elif isinstance(config, dict) and set(config) == {"model_name", "pickle_path"}:
            log.info(
                "loading ImageEncoder of %s from %s", config["model_name"], config["pickle_path"]
            )
            loaded = load_pickled(config["pickle_path"])
            encoder = openai_image_encoder(config["model_name"])
            encoder.load_state_dict(
                loaded.state_dict() if isinstance(loaded, torch.nn.Module) else loaded
            )
        else:
            return super().load_model(model_name_or_config, *args, **kwargs)
        if self._train_processor is None and hasattr(encoder, "train_preprocess"):
            self._train_processor = encoder.train_preprocess
        if self._test_processor is None and hasattr(encoder, "val_preprocess"):
            self._test_processor = encoder.val_preprocess
        return encoder
