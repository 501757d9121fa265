"""Write a whole output directory or nothing: build it next to the target, then rename it in place."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ar2dlm.errors import UserError


def check_output_dir(target: str | Path, overwrite: bool) -> Path:
    """Refuse an existing, non-empty ``target`` unless ``overwrite``; return it as a Path."""
    path = Path(target).expanduser()
    if path.exists() and not path.is_dir():
        raise UserError(f"output {path} exists and is not a directory")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise UserError(f"output {path} exists and is not empty (pass overwrite=true to replace it)")
    return path


@contextmanager
def atomic_directory(target: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh staging directory that becomes ``target`` only if the block succeeds.

    On any error the staging directory is removed and ``target`` is left exactly as it was.
    """
    path = check_output_dir(target, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.parent / f".{path.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    replaced = path.parent / f".{path.name}.replaced-{os.getpid()}"
    if path.exists():
        path.rename(replaced)
    staging.rename(path)
    shutil.rmtree(replaced, ignore_errors=True)
