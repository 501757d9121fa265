"""The packed rows of all sources (:class:`PackedDataset`) and the order training reads them in
(:class:`SampleOrder`), a pure function of (seed, epoch).

The order, exactly. Let S sources have R_s packed rows and weights w_s; an epoch has N = sum_s R_s samples.

1. Per epoch, source s gets n_s samples: the largest-remainder rounding of N * w_s / sum(w) (ties to the
   lower source index), so the counts are exact and sum to N.
2. The epoch's source sequence is ``[0]*n_0 + [1]*n_1 + ...`` shuffled by ``numpy.random.Generator(
   PCG64(SeedSequence([seed, 0, epoch]))).shuffle``: each position draws source s with probability n_s / N.
3. Source s is read as its own endless stream of passes, pass c being ``arange(R_s)`` shuffled by the
   generator of ``SeedSequence([seed, 1 + s, c])``. The k-th sample taken from source s (counting from
   the start of training: ``epoch * n_s`` + its rank within the epoch) is row ``pass_c[k % R_s]`` with
   ``c = k // R_s``. A source with a larger share than its size is repeated, one with a smaller share
   is subsampled, and no row repeats before its source's pass ends.

With one source this is simply: epoch e is the permutation of the rows drawn from (seed, e).
Global sample g lies in epoch ``g // N`` at position ``g % N``.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import numpy as np

from ar2dlm.data.packing import PackedSource, Row
from ar2dlm.errors import UserError


class PackedDataset:
    """The packed rows of one or more sources and their weights; ``dataset[i]`` reads them in order."""

    def __init__(self, sources: Sequence[PackedSource], weights: Sequence[float]):
        if not sources or len(sources) != len(weights):
            raise ValueError("need one weight per source and at least one source")
        weights = np.asarray(weights, dtype=np.float64)
        if not np.all(np.isfinite(weights)) or (weights < 0).any() or weights.sum() <= 0:
            raise UserError(f"data source weights {weights.tolist()} must be >= 0 and sum to a positive "
                            "number")
        self.sources, self.weights = list(sources), weights
        self.rows = np.array([len(s) for s in self.sources], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.rows)])
        self.seq_length = self.sources[0].seq_length
        self.pack = self.sources[0].layout != "pad"
        self.counts = _allocate(weights / weights.sum(), int(self.rows.sum()))
        empty = [s.name for s, n, r in zip(self.sources, self.counts, self.rows, strict=True) if n and not r]
        if empty:
            raise UserError(f"data source {empty[0]} has no rows to train on")

    def __len__(self) -> int:
        """Samples per epoch: the packed rows of all sources together."""
        return int(self.offsets[-1])

    def __getitem__(self, index: int) -> Row:
        """Row ``index`` of the sources laid end to end (no shuffling: for evaluation)."""
        if not 0 <= index < len(self):
            raise IndexError(f"row {index} of {len(self)}")
        source = int(np.searchsorted(self.offsets, index, side="right")) - 1
        return self.sources[source].row(index - int(self.offsets[source]))


class SampleOrder:
    """Global sample index -> (source, row) for a dataset and a seed; see the module docstring.

    Holds the index arrays of the last two epochs and passes (one small integer per row).
    """

    def __init__(self, dataset: PackedDataset, seed: int):
        self.dataset, self.seed = dataset, int(seed) & (2**63 - 1)
        self._epochs: OrderedDict[int, tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self._passes: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()

    def locate(self, sample: int) -> tuple[int, int]:
        """The (source, row) of global sample ``sample``."""
        epoch, position = divmod(int(sample), len(self.dataset))
        if len(self.dataset.sources) == 1:
            source, rank = 0, position
        else:
            source_of, rank_of = self._epoch(epoch)
            source, rank = int(source_of[position]), int(rank_of[position])
        drawn = epoch * int(self.dataset.counts[source]) + rank
        rows = int(self.dataset.rows[source])
        return source, int(self._pass(source, drawn // rows)[drawn % rows])

    def sample(self, sample: int) -> Row:
        source, row = self.locate(sample)
        return self.dataset.sources[source].row(row)

    def _rng(self, stream: int, epoch: int) -> np.random.Generator:
        return np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed, stream, epoch])))

    def _epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """Per position of ``epoch``: its source, and how many earlier positions of the epoch drew it."""

        def build():
            counts = self.dataset.counts
            sources = np.repeat(np.arange(len(counts), dtype=np.int16), counts)
            self._rng(0, epoch).shuffle(sources)
            ranks = np.empty(len(sources), dtype=_index_dtype(len(sources)))
            for source, count in enumerate(counts):
                ranks[sources == source] = np.arange(count)
            return sources, ranks

        return _cached(self._epochs, epoch, build)

    def _pass(self, source: int, number: int) -> np.ndarray:
        def build():
            size = int(self.dataset.rows[source])
            rows = np.arange(size, dtype=_index_dtype(size))
            self._rng(1 + source, number).shuffle(rows)
            return rows

        return _cached(self._passes, (source, number), build)


def _index_dtype(size: int) -> type:
    return np.int32 if size < 2**31 else np.int64


def _cached(cache: OrderedDict, key, build, keep: int = 2):
    if key in cache:
        cache.move_to_end(key)
    else:
        cache[key] = build()
        while len(cache) > keep:
            cache.popitem(last=False)
    return cache[key]


def _allocate(shares: np.ndarray, total: int) -> np.ndarray:
    """Largest-remainder rounding of ``shares * total`` to integers summing to ``total``."""
    quotas = shares * total
    counts = np.floor(quotas).astype(np.int64)
    remainders = quotas - counts
    order = np.lexsort((np.arange(len(shares)), -remainders))
    counts[order[: total - int(counts.sum())]] += 1
    return counts
