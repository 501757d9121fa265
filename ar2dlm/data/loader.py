"""What the trainer calls: :func:`build_datasets`, :class:`TrainDataLoader` and :func:`eval_batches`.

Global batch k is global samples ``[k*G, (k+1)*G)`` of an endless stream of epochs, each ordered by
(seed, epoch) (:mod:`ar2dlm.data.blend`). Data-parallel rank r takes the contiguous slice
``[r*G/dp, (r+1)*G/dp)`` of it, cut into micro-batches in order, so the ranks of one step read disjoint
samples whose union is what a single rank would read. The loader's state is the number of samples
consumed: resuming from it continues with exactly the next sample, whatever the number of ranks.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch

from ar2dlm.data.blend import PackedDataset, SampleOrder
from ar2dlm.data.build import build_datasets
from ar2dlm.data.packing import Row
from ar2dlm.errors import UserError
from ar2dlm.log import logger

__all__ = ["Batch", "TrainDataLoader", "build_datasets", "eval_batches", "PackedDataset"]


@dataclass
class Batch:
    input_ids: torch.LongTensor  # [micro_batch, seq_length]
    loss_mask: torch.BoolTensor  # [micro_batch, seq_length]
    document_ids: torch.LongTensor | None  # [micro_batch, seq_length]; None when pack=false
    sample_index: torch.LongTensor  # [micro_batch]; global sample index (-1: an empty filler row in eval)


def collate(rows: list[Row], samples: list[int], packed: bool) -> Batch:
    return Batch(
        input_ids=torch.from_numpy(np.stack([r.input_ids for r in rows])),
        loss_mask=torch.from_numpy(np.stack([r.loss_mask for r in rows])),
        document_ids=torch.from_numpy(np.stack([r.document_ids for r in rows])) if packed else None,
        sample_index=torch.tensor(samples, dtype=torch.long),
    )


def _collate_items(items: list[tuple[Row, int]], packed: bool) -> Batch:
    return collate([row for row, _ in items], [sample for _, sample in items], packed)


class _Samples(torch.utils.data.Dataset):
    """Global sample index -> row (what DataLoader workers run)."""

    def __init__(self, order: SampleOrder):
        self.order = order

    def __getitem__(self, sample: int) -> tuple[Row, int]:
        return self.order.sample(sample), sample


class TrainDataLoader:
    """This rank's micro-batches of each global batch, in an order fixed by (seed, epoch); resumable."""

    def __init__(self, dataset: PackedDataset, *, global_batch_size: int, micro_batch_size: int,
                 dp_rank: int, dp_size: int, seed: int, num_workers: int = 0):
        if min(global_batch_size, micro_batch_size, dp_size) < 1 or not 0 <= dp_rank < dp_size:
            raise UserError(f"bad batch layout: global {global_batch_size}, micro {micro_batch_size}, "
                            f"data-parallel rank {dp_rank} of {dp_size}")
        if global_batch_size % (micro_batch_size * dp_size):
            raise UserError(f"global_batch_size={global_batch_size} is not a multiple of micro_batch_size x "
                            f"data-parallel size = {micro_batch_size} x {dp_size}")
        self.dataset, self.seed, self.num_workers = dataset, int(seed), num_workers
        self.global_batch_size, self.micro_batch_size = global_batch_size, micro_batch_size
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.order = SampleOrder(dataset, seed)
        self.consumed_samples = 0
        self._workers: Iterator | None = None

    @property
    def epoch(self) -> int:
        """The epoch of the next sample."""
        return self.consumed_samples // len(self.dataset)

    def _micro_batches(self, step_start: int) -> list[list[int]]:
        per_rank = self.global_batch_size // self.dp_size
        first = step_start + self.dp_rank * per_rank
        return [list(range(s, s + self.micro_batch_size)) for s in range(first, first + per_rank,
                                                                           self.micro_batch_size)]

    def next_step(self) -> list[Batch]:
        """This rank's micro-batches of the next global batch."""
        if self.num_workers > 0:
            count = self.global_batch_size // self.dp_size // self.micro_batch_size
            batches = [next(self._worker_batches()) for _ in range(count)]
        else:
            batches = [collate([self.order.sample(s) for s in samples], samples, self.dataset.pack)
                       for samples in self._micro_batches(self.consumed_samples)]
        self.consumed_samples += self.global_batch_size
        return batches

    def _worker_batches(self) -> Iterator[Batch]:
        if self._workers is None:
            def sampler():
                start = self.consumed_samples
                while True:
                    yield from self._micro_batches(start)
                    start += self.global_batch_size

            loader = torch.utils.data.DataLoader(
                _Samples(self.order), batch_sampler=sampler(), num_workers=self.num_workers,
                collate_fn=partial(_collate_items, packed=self.dataset.pack))
            self._workers = iter(loader)
        return self._workers

    def state_dict(self) -> dict:
        return {"consumed_samples": self.consumed_samples, "seed": self.seed,
                "epoch_samples": len(self.dataset), "global_batch_size": self.global_batch_size}

    def load_state_dict(self, state: dict) -> None:
        if int(state["seed"]) != self.seed:
            raise UserError(f"the checkpoint's data order used seed {state['seed']}, this run has seed "
                            f"{self.seed}: resume with seed={state['seed']} to continue the same order")
        if state.get("epoch_samples", len(self.dataset)) != len(self.dataset):
            logger.warning("the data changed since the checkpoint (%s samples per epoch, now %d): "
                           "resuming at sample %d of a different order", state["epoch_samples"],
                           len(self.dataset), state["consumed_samples"])
        self.consumed_samples = int(state["consumed_samples"])
        self._workers = None


def eval_batches(dataset: PackedDataset, *, micro_batch_size: int, dp_rank: int = 0,
                 dp_size: int = 1) -> Iterator[Batch]:
    """Every row of ``dataset`` once, in order: micro-batch j goes to rank ``j % dp_size``.

    Every rank gets the same number of full micro-batches; rows past the end are empty fillers (padding,
    loss_mask all False, sample_index -1).
    """
    total = -(-len(dataset) // micro_batch_size)
    per_rank = -(-total // dp_size)
    filler = None
    for local in range(per_rank):
        start = (local * dp_size + dp_rank) * micro_batch_size
        samples = [s if s < len(dataset) else -1 for s in range(start, start + micro_batch_size)]
        rows = []
        for sample in samples:
            if sample < 0:
                filler = filler or _empty_row(dataset)
            rows.append(dataset[sample] if sample >= 0 else filler)
        yield collate(rows, samples, dataset.pack)


def _empty_row(dataset: PackedDataset) -> Row:
    source = dataset.sources[0]
    return Row(np.full(source.seq_length, source.pad_id, dtype=np.int64), np.zeros(source.seq_length, bool),
               np.zeros(source.seq_length, dtype=np.int64))
