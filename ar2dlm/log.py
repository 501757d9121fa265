"""One logger for the package, rank-0 progress bars, and opt-in tensorboard / wandb metric sinks."""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Generic, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")

logger = logging.getLogger("ar2dlm")


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


class _BarSafeHandler(logging.StreamHandler):
    """Writes each record above the active progress bars instead of onto the bar's line."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=self.stream)
        except Exception:  # noqa: BLE001 - logging must never raise
            self.handleError(record)


def setup_logging(level: str = "INFO") -> None:
    """Configure the ``ar2dlm`` logger once: rank-prefixed lines on stderr, quiet on other ranks."""
    if not logger.handlers:
        handler = _BarSafeHandler(sys.stderr)
        prefix = f"[rank{_rank()}] " if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
        handler.setFormatter(logging.Formatter(f"%(asctime)s {prefix}%(levelname)s %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
        logger.propagate = False
    logger.setLevel(level if _rank() == 0 else "WARNING")


LOG_FILE_INTERVAL_S = 30.0  # without a terminal, progress without a step interval is logged this often


def stderr_is_terminal() -> bool:
    return sys.stderr.isatty()


def progress(items: Iterable[T], desc: str, total: int | None = None, unit: str = "it",
             log_every: int | None = None) -> Iterable[T]:
    """Progress over ``items`` on rank 0 (other ranks are silent): iterate the returned object, and
    ``set_postfix({"loss": "2.31", ...})`` shows values next to the count.

    In a terminal this is a tqdm bar (log records are printed above it). When stderr is not a terminal (a
    Slurm log, ``2>log``) there is no bar, whose carriage-return redraws a file cannot undo: a plain log
    line every ``log_every`` items and after the last one, or (``log_every`` None) every
    ``LOG_FILE_INTERVAL_S`` seconds and after the last item if a line was written before."""
    if _rank() != 0:
        return tqdm(items, total=total, disable=True)
    if stderr_is_terminal():
        return tqdm(items, desc=desc, total=total, unit=unit, dynamic_ncols=True, mininterval=0.1)
    return LoggedProgress(items, desc, total, unit, log_every)


class LoggedProgress(Generic[T]):
    """Progress as plain ``logger.info`` lines: ``DESC: 10/1200 steps | loss 2.31 | ... | 0.52 s/step, 10:18 left``."""

    def __init__(self, items: Iterable[T], desc: str, total: int | None, unit: str, log_every: int | None):
        self.items, self.desc, self.unit, self.log_every = items, desc, unit, log_every
        self.total = total if total is not None else (len(items) if hasattr(items, "__len__") else None)
        self.postfix: dict[str, object] = {}

    def set_postfix(self, ordered_dict: dict | None = None, refresh: bool = True, **values) -> None:
        self.postfix = {**(ordered_dict or {}), **values}

    def __iter__(self) -> Iterator[T]:
        started = last_line = time.monotonic()
        count = logged = 0
        for item in self.items:
            yield item
            count += 1
            now = time.monotonic()
            due = (count % self.log_every == 0) if self.log_every else now - last_line >= LOG_FILE_INTERVAL_S
            if due or count == self.total:
                logger.info("%s", self.line(count, now - started))
                last_line, logged = now, count
        if count != logged and (self.log_every or logged):
            logger.info("%s", self.line(count, time.monotonic() - started))

    def line(self, count: int, seconds: float) -> str:
        parts = [f"{self.desc}: {count}/{self.total if self.total is not None else '?'} {_plural(self.unit)}"]
        parts += [f"{name} {value}" for name, value in self.postfix.items()]
        if count and seconds > 0:
            per_item = seconds / count
            pace = f"{per_item:.2f} s/{self.unit}" if per_item >= 1 else f"{1 / per_item:,.1f} {self.unit}/s"
            if self.total and count < self.total:
                pace += f", {_clock(per_item * (self.total - count))} left"
            parts.append(pace)
        return " | ".join(parts)


def _plural(noun: str) -> str:
    return noun + ("es" if noun.endswith(("s", "sh", "ch", "x")) else "s")


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(seconds + 0.5), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class MetricSinks:
    """Writes scalar metrics to tensorboard and/or wandb when enabled; never fails a run for lack of network."""

    def __init__(self, output_dir: Path, tensorboard: bool, wandb: bool, project: str, run_name: str | None,
                 config: dict | None = None):
        self._tb = None
        self._wandb = None
        if _rank() != 0:
            return
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(output_dir / "tensorboard"))
        if wandb:
            self._wandb = _start_wandb(output_dir, project, run_name, config)

    def log(self, metrics: dict[str, float], step: int) -> None:
        if self._tb is not None:
            for key, value in metrics.items():
                self._tb.add_scalar(key, value, step)
        if self._wandb is not None:
            self._wandb.log(metrics, step=step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def _start_wandb(output_dir: Path, project: str, run_name: str | None, config: dict | None):
    import wandb

    if not os.environ.get("WANDB_API_KEY") and os.environ.get("WANDB_MODE") not in ("online", "disabled"):
        os.environ["WANDB_MODE"] = "offline"
        logger.info("wandb: no WANDB_API_KEY, logging offline to %s (sync later with `wandb sync`)", output_dir)
    try:
        return wandb.init(project=project, name=run_name, dir=str(output_dir), config=config)
    except Exception as error:  # wandb must never make a run fail
        logger.warning("wandb disabled: %s", error)
        return None
