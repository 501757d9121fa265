"""The run's JSON-lines metric files (metrics.jsonl, validation.jsonl): whole lines only, one row per step.

Each row is appended with one ``write`` on an ``O_APPEND`` descriptor, so a reader or a second writer never
sees half of it, and a failed write is cut back off. A resumed run first drops the rows after the step it
resumes from (the killed run wrote them; the resumed run writes them again) and a torn last line.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ar2dlm.errors import UserError
from ar2dlm.fs import is_no_space_error
from ar2dlm.log import logger


def append_record(path: Path, record: dict) -> None:
    line = (json.dumps(record) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        start = os.lseek(fd, 0, os.SEEK_END)
        try:
            written = os.write(fd, line)
            if written != len(line):
                raise OSError(f"short write to {path} ({written} of {len(line)} bytes)")
        except OSError as error:
            os.ftruncate(fd, start)
            if is_no_space_error(error):
                raise UserError(f"no space left on device: cannot append {len(line)} bytes to {path}") from None
            raise
    finally:
        os.close(fd)


def truncate_after_step(path: Path, step: int) -> None:
    """Keep the rows of steps <= ``step``; drop later rows and lines that do not parse (a torn last line)."""
    if not path.is_file():
        return
    kept, dropped, torn = [], 0, 0
    for line in path.read_bytes().splitlines():
        try:
            record = json.loads(line)
        except (UnicodeDecodeError, json.JSONDecodeError):
            torn += 1
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= step:
            kept.append(line)
        else:
            dropped += 1
    if not dropped and not torn:
        return
    staging = path.with_name(f".{path.name}.tmp")
    staging.write_bytes(b"".join(line + b"\n" for line in kept))
    os.replace(staging, path)
    logger.info("%s: dropped %d rows after step %d%s", path.name, dropped, step,
                f" and {torn} torn line(s)" if torn else "")
