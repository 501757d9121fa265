"""One logger for the package, rank-0 progress bars, and opt-in tensorboard / wandb metric sinks."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")

logger = logging.getLogger("ar2dlm")


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def setup_logging(level: str = "INFO") -> None:
    """Configure the ``ar2dlm`` logger once: rank-prefixed lines on stderr, quiet on other ranks."""
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        prefix = f"[rank{_rank()}] " if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
        handler.setFormatter(logging.Formatter(f"%(asctime)s {prefix}%(levelname)s %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
        logger.propagate = False
    logger.setLevel(level if _rank() == 0 else "WARNING")


def progress(items: Iterable[T], desc: str, total: int | None = None, unit: str = "it") -> Iterator[T]:
    """A progress bar on rank 0 (off under CI without a terminal; sparse when stderr is a file)."""
    interactive = sys.stderr.isatty()
    disable = _rank() != 0 or (os.environ.get("CI") == "true" and not interactive)
    yield from tqdm(items, desc=desc, total=total, unit=unit, disable=disable, dynamic_ncols=True,
                    mininterval=0.1 if interactive else 30.0)  # a log file gets a line every 30 s


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
