"""Atomic writes: a file or directory appears under its final name complete, or not at all.

:func:`staged_path` gives a private temporary path beside the final one and renames it into place
only when everything was written: an interrupted write (exception, Ctrl-C) is removed, a killed
process leaves only a hidden ``.<name>.saving-<pid>`` sibling, and the final path either does not
exist or is complete. Standard library only.
"""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Union

__all__ = ["staged_path"]


@contextmanager
def staged_path(final: Union[str, os.PathLike], *, overwrite: bool = False) -> Iterator[Path]:
    """A path to write to instead of ``final``; renamed to ``final`` when the block succeeds.

    The yielded path is ``<parent>/.<name>.saving-<pid>/<name>`` (not created: write a file or
    make a directory there), so formats that embed the file name come out as a direct save
    would. ``final`` existing is a ``FileExistsError`` unless ``overwrite``; then it is replaced
    only after the new one is complete (and restored if the swap fails). On any exception the
    staged data is removed and ``final`` is left as it was.
    """
    final = Path(final)
    if (final.exists() or final.is_symlink()) and not overwrite:
        raise FileExistsError(
            f"{final} already exists; choose another path or allow overwriting it"
        )
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = final.parent / f".{final.name}.saving-{os.getpid()}"
    retired = final.parent / f".{final.name}.old-{os.getpid()}"
    _remove(staging)
    staging.mkdir()
    try:
        yield staging / final.name
        if final.exists() or final.is_symlink():
            final.rename(retired)
        (staging / final.name).rename(final)
    except BaseException:
        if (retired.exists() or retired.is_symlink()) and not final.exists():
            retired.rename(final)
        raise
    finally:
        _remove(staging)
    _remove(retired)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()
