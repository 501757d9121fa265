"""The process behind megatron-core's checkpoint writes, made safe for stop signals and kills.

megatron-core's ``torch_dist`` writer collects write results through a queue served by a
``multiprocessing`` manager process that it spawns at the first save. That process is in the trainer's
process group, so the SIGTERM that Slurm (or ``kill -TERM -- -PGID``) sends to every process of a job
killed it, and the save that the trainer makes on SIGTERM then failed with a broken pipe; after a
``kill -9`` of the trainer alone it stayed behind forever. Starting the manager here, with the stop
signals ignored and a parent-death signal set, fixes both; megatron-core then uses our queue.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import signal
from multiprocessing.managers import SyncManager

_STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
_PR_SET_PDEATHSIG = 1
_manager: SyncManager | None = None


def _detach_from_stop_signals() -> None:
    for sig in _STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    try:  # Linux: die with the process that started us, however it dies
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass


def ensure_writer_manager() -> None:
    """Give megatron-core's checkpoint writer a result queue served by a signal-safe manager (idempotent)."""
    global _manager
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if _manager is not None or getattr(filesystem_async, "_results_queue", None) is not None:
        return
    _manager = SyncManager(ctx=multiprocessing.get_context("spawn"))
    _manager.start(initializer=_detach_from_stop_signals)
    filesystem_async._results_queue = _manager.Queue()
