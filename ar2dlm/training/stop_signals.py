"""Stop a training run cleanly on SIGTERM / SIGUSR1 (what Slurm sends before a time limit or preemption) and
SIGINT: the current step finishes, a checkpoint is saved, and the run exits with 128 + the signal number.

A second SIGINT interrupts at once, as Ctrl-C twice does elsewhere; the next start then removes the staging
folder of a save it interrupted.
"""

from __future__ import annotations

import os
import signal
import threading

import torch
import torch.distributed as dist

from ar2dlm.errors import UserError
from ar2dlm.log import logger

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class TrainingStopped(UserError):
    """The run saved a checkpoint and stopped because it was asked to; ``resume=true`` continues it."""

    label = "stopped"

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


class StopRequest:
    """Context manager: records the first stop signal; ``requested()`` agrees on it across ranks."""

    def __init__(self):
        self.signum = 0
        self._previous = {}
        self._pid = os.getpid()

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._handle) for sig in STOP_SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        if os.getpid() != self._pid:  # a forked checkpoint writer: it finishes its write, the trainer stops
            return
        if self.signum == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        if not self.signum:
            logger.warning("%s received: finishing this step, saving a checkpoint, then stopping",
                           signal.Signals(signum).name)
        self.signum = self.signum or signum

    def requested(self) -> int:
        """The signal that asks to stop (0: none), the same on every rank (collective)."""
        if not dist.is_initialized():
            return self.signum
        flag = torch.tensor([self.signum], dtype=torch.int32, device="cuda" if torch.cuda.is_available() else "cpu")
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item())
