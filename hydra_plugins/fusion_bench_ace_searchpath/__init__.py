"""Hydra search-path plugin: makes ``method=ace`` (and our pools) visible to ``fusion_bench``.

Hydra discovers plugins in the ``hydra_plugins`` namespace package of every installed
distribution. This one appends our config directory (:func:`fusion_bench_ace.paths.config_dir`)
after FusionBench's, so FusionBench's own configs win on equal names. Imports go one way: this
plugin imports the package, never the reverse.

It also repairs one FusionBench quirk: ``fusion_bench`` takes ``$CWD/config`` as its primary config
directory whenever one exists (our repository root has one), and then cannot find its own
``fabric_model_fusion`` config. When that happens, FusionBench's packaged configs are appended so
the run works from any directory.
"""

import os

from hydra.core.config_search_path import ConfigSearchPath
from hydra.plugins.search_path_plugin import SearchPathPlugin
from omegaconf import OmegaConf

from fusion_bench_ace.paths import config_dir

FUSION_BENCH_ROOT_CONFIG = "fabric_model_fusion.yaml"


def _primary_dir(search_path: ConfigSearchPath) -> str | None:
    for element in search_path.get_path():
        if element.provider == "main" and element.path is not None:
            path = element.path
            return path[len("file://") :] if path.startswith("file://") else path
    return None


class FusionBenchAceSearchPathPlugin(SearchPathPlugin):
    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        primary = _primary_dir(search_path)
        if (
            primary is not None
            and os.path.abspath(primary) == os.path.join(os.getcwd(), "config")
            and not os.path.isfile(os.path.join(primary, FUSION_BENCH_ROOT_CONFIG))
        ):
            search_path.append(provider="fusion_bench", path="pkg://fusion_bench_config")
        search_path.append(provider="fusion_bench_ace", path=f"file://{config_dir()}")


def _ace_mini_path(track: str, relative: str = "") -> str:
    """``${ace_mini:<track>,<relative path>}``: a file of a built embedded-benchmark track."""
    from fusion_bench_ace.mini import track_path

    return track_path(track, relative)


HF_ROOT_ENV = "FUSION_BENCH_ACE_HF_ROOT"


def _hf_repo(repo_id: str) -> str:
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


# Hydra imports this module while it scans for plugins, before any config is composed, so the
# resolvers exist whenever FusionBench resolves our model- and task-pool configs.
OmegaConf.register_new_resolver("ace_mini", _ace_mini_path, replace=True)
OmegaConf.register_new_resolver("ace_hf", _hf_repo, replace=True)
