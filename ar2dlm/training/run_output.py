"""Which folder `ar2dlm train` may write into: a new or empty one, or a training run's own (to continue it).

A folder holding anything else is refused, and so is an output that is, or holds, the ``init`` checkpoint it
would start from. The lock file a run keeps in its output (``.ar2dlm.lock``, left by a killed run) does not
count as content.
"""

from __future__ import annotations

from pathlib import Path

from ar2dlm.errors import UserError
from ar2dlm.fs import is_empty_dir, refuse_overlap
from ar2dlm.training.checkpointing import CHECKPOINTS, newest_checkpoint
from ar2dlm.training.output_lock import LOCK_FILE

METRICS_FILE = "metrics.jsonl"
RUN_MARKERS = (CHECKPOINTS, METRICS_FILE)  # what a training run writes into its output


def is_training_run(folder: Path) -> bool:
    return any((folder / name).exists() for name in RUN_MARKERS)


def check_train_output(output: str | Path, init: str | Path, resume: bool) -> Path:
    """UserError unless training may write into ``output``; returns it as a Path."""
    path = Path(output).expanduser()
    if path.exists() and not path.is_dir():
        raise UserError(f"output {path} exists and is not a directory")
    if not (resume and newest_checkpoint(path) is not None):  # otherwise init is not read
        refuse_overlap(path, init)
    if path.is_dir() and not is_empty_dir(path, ignore=(LOCK_FILE,)) and not is_training_run(path):
        raise UserError(f"output {path} is not empty and is not a training run (it has no {CHECKPOINTS}/ and no "
                        f"{METRICS_FILE}): choose a new or empty folder")
    return path
