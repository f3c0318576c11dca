"""The OmegaConf resolvers our configs use: ``${ace_mini:...}`` and ``${ace_hf:...}``.

The Hydra plugin (``hydra_plugins/fusion_bench_ace_searchpath``) calls :func:`register` while Hydra
scans for plugins, before any config is composed. Light on purpose: importing this module imports
neither torch nor FusionBench.
"""

from __future__ import annotations

import os

from omegaconf import OmegaConf

__all__ = ["HF_ROOT_ENV", "ace_mini_path", "hf_repo", "register"]

HF_ROOT_ENV = "FUSION_BENCH_ACE_HF_ROOT"


def ace_mini_path(track: str, relative: str = "") -> str:
    """``${ace_mini:<track>,<relative path>}``: a file of a built embedded-benchmark track."""
    from .mini import track_path

    return track_path(track, relative)


def hf_repo(repo_id: str) -> str:
    """``${ace_hf:<owner>/<name>}``: a local copy of a Hugging Face repo if there is one, else
    the id.

    With ``FUSION_BENCH_ACE_HF_ROOT=/data/hf`` a config naming ``openai/clip-vit-base-patch32``
    loads ``/data/hf/openai/clip-vit-base-patch32`` when that directory exists; otherwise the id is
    passed on and the hub (or its cache, with ``HF_HUB_OFFLINE=1``) is used as usual.
    """
    root = os.environ.get(HF_ROOT_ENV)
    if root:
        candidate = os.path.join(os.path.expanduser(root), repo_id)
        if os.path.exists(candidate):
            return candidate
    return repo_id


def register() -> None:
    """Register both resolvers (replacing earlier registrations of the same names)."""
    OmegaConf.register_new_resolver("ace_mini", ace_mini_path, replace=True)
    OmegaConf.register_new_resolver("ace_hf", hf_repo, replace=True)
