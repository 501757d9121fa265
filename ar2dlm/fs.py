"""Write a whole output directory or nothing: build it next to the target, flush it, then rename it in place."""

from __future__ import annotations

import errno
import json
import os
import shutil
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from ar2dlm.errors import UserError


def check_output_dir(target: str | Path, overwrite: bool, inputs: Iterable[str | Path | None] = ()) -> Path:
    """Refuse an existing, non-empty ``target`` unless ``overwrite``, and a ``target`` that is or holds one of
    the ``inputs`` whatever ``overwrite`` says; return it as a Path."""
    path = Path(target).expanduser()
    for source in inputs:
        if source:
            refuse_overlap(path, source)
    if path.exists() and not path.is_dir():
        raise UserError(f"output {path} exists and is not a directory")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise UserError(f"output {path} exists and is not empty (pass overwrite=true to replace it)")
    return path


def refuse_overlap(output: str | Path, source: str | Path) -> None:
    """UserError when writing ``output`` would replace ``source``: the same folder, or one that holds it."""
    out, src = Path(output).expanduser().resolve(), Path(source).expanduser().resolve()
    if out == src or out in src.parents:
        relation = "is" if out == src else "holds"
        raise UserError(f"output {output} {relation} the input {source}: writing it would destroy the input; "
                        "choose another output")


def is_empty_dir(path: Path, ignore: Iterable[str] = ()) -> bool:
    """Whether ``path`` is a folder holding nothing but the names in ``ignore``."""
    skip = set(ignore)
    return path.is_dir() and not [item for item in path.iterdir() if item.name not in skip]


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
    fsync_tree(staging)
    replaced = path.parent / f".{path.name}.replaced-{os.getpid()}"
    if path.exists():
        path.rename(replaced)
    staging.rename(path)
    fsync_directory(path.parent)
    shutil.rmtree(replaced, ignore_errors=True)


def fsync_tree(directory: Path) -> None:
    """Flush every file and folder under ``directory`` (and the folder itself) to stable storage."""
    for path in sorted(directory.rglob("*"), reverse=True):
        _fsync(path)
    _fsync(directory)


def fsync_directory(directory: Path) -> None:
    """Make a rename or a new entry in ``directory`` durable."""
    _fsync(directory)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_json_object(path: Path) -> dict:
    """The JSON object in ``path``; one UserError naming the file if it cannot be read or is not an object."""
    try:
        value = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UserError(f"{path} cannot be parsed: {error}") from None
    if not isinstance(value, dict):
        raise UserError(f"{path} does not hold a JSON object")
    return value


def tree_size(directory: Path) -> int:
    """Bytes in the files under ``directory`` (0 if it does not exist)."""
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file()) if directory.is_dir() else 0


def is_no_space_error(error: BaseException) -> bool:
    """Whether ``error``, its causes or the failures it wraps (torch's CheckpointException) are ENOSPC."""
    seen = set()
    pending = [error]
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno == errno.ENOSPC:
            return True
        if "No space left on device" in str(current):
            return True
        pending += [current.__cause__, current.__context__]
        for failure in getattr(current, "failures", {}).values():  # torch wraps each as (exception, traceback)
            pending += [item for item in (failure if isinstance(failure, tuple) else (failure,))
                        if isinstance(item, BaseException)]
    return False
