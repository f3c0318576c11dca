"""Where the package's configuration lives: the one answer to "where is config/".

A wheel ships the configs inside the package (``fusion_bench_ace/config``, see ``pyproject.toml``);
a source checkout (editable install) has them in the repository's top-level ``config/`` beside
the package. Everything that reads a config file (the Hydra search-path plugin, the embedded
benchmark's settings, the comparison runner, the speed benchmark) asks :func:`config_dir`.
Standard library only: the Hydra plugin imports this while Hydra scans for plugins.
"""

from __future__ import annotations

from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
_MARKER = Path("method") / "ace.yaml"  # a file every copy of our config directory holds


def config_dir() -> Path:
    """The config directory: inside the installed package, else beside it in a source checkout."""
    for candidate in (PACKAGE_DIR / "config", PACKAGE_DIR.parent / "config"):
        if (candidate / _MARKER).is_file():
            return candidate
    raise FileNotFoundError(
        f"fusion_bench_ace's config directory was not found in {PACKAGE_DIR / 'config'} (a wheel "
        f"install) or {PACKAGE_DIR.parent / 'config'} (a source checkout); reinstall the package"
    )
