"""Hydra search-path plugin: makes ``method=ace`` (and our pools) visible to ``fusion_bench``.

Hydra discovers plugins in the ``hydra_plugins`` namespace package of every installed
distribution. This one appends our config directory (:func:`fusion_bench_ace.paths.config_dir`)
after FusionBench's, so FusionBench's own configs win on equal names. Imports go one way: this
plugin imports the package, never the reverse.

It also registers our OmegaConf resolvers (:mod:`fusion_bench_ace.resolvers`) and repairs one
FusionBench quirk: ``fusion_bench`` takes ``$CWD/config`` as its primary config
directory whenever one exists (our repository root has one), and then cannot find its own
``fabric_model_fusion`` config. When that happens, FusionBench's packaged configs are appended so
the run works from any directory.
"""

import os

from hydra.core.config_search_path import ConfigSearchPath
from hydra.plugins.search_path_plugin import SearchPathPlugin

from fusion_bench_ace.paths import config_dir
from fusion_bench_ace.resolvers import register as register_resolvers

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


# Hydra imports this module while it scans for plugins, before any config is composed, so the
# resolvers exist whenever FusionBench resolves our model- and task-pool configs.
register_resolvers()
