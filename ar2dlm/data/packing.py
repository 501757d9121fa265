"""Documents -> fixed-length rows of ``seq_length`` tokens.

Three layouts, each a list of *pieces* (a document's tokens ``[start, stop)``) per row:

- ``stream`` (pretraining, ``pack: true``): all documents, each ending with EOS, concatenated and cut every
  ``seq_length`` tokens, as Megatron's GPTDataset does; no padding except at the end of the last row.
- ``whole`` (SFT, ``pack: true``): documents placed in order, a new row started when the next one does not
  fit, the rest of a row padded; a conversation is never cut unless it is longer than a row.
- ``pad`` (``pack: false``): one document per row, right-padded.

A document longer than ``seq_length`` is split into ``seq_length`` chunks (counted in the stats). Within a
row, ``document_ids`` number the pieces 0, 1, 2, ... and the padding after them gets the next id, so attention
never crosses documents and never reaches padding. Padding has ``pad_id`` and loss_mask 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ar2dlm.data.tokenize import TokenStore

LAYOUTS = ("stream", "whole", "pad")


@dataclass
class Row:
    input_ids: np.ndarray  # int64 [seq_length]
    loss_mask: np.ndarray  # bool [seq_length]
    document_ids: np.ndarray  # int64 [seq_length]


@dataclass
class Pieces:
    """Row r holds pieces ``row_ptr[r]:row_ptr[r+1]``; piece p is tokens ``[start[p], stop[p])`` of doc[p]."""

    doc: np.ndarray
    start: np.ndarray
    stop: np.ndarray
    row_ptr: np.ndarray

    @property
    def num_rows(self) -> int:
        return len(self.row_ptr) - 1


@dataclass
class PackStats:
    documents: int
    tokens: int
    rows: int
    split_documents: int  # longer than seq_length
    padding: int  # padding tokens in all rows

    def describe(self, seq_length: int) -> str:
        capacity = max(self.rows * seq_length, 1)
        return (f"{self.documents} documents, {self.tokens} tokens -> {self.rows} rows of {seq_length} "
                f"({self.split_documents} documents longer than {seq_length} split, "
                f"{100 * self.padding / capacity:.1f}% padding)")


def pack_stream(lengths: np.ndarray, seq_length: int) -> Pieces:
    """Concatenate every document and cut the stream every ``seq_length`` tokens (vectorised)."""
    doc_ends = np.cumsum(lengths)
    total = int(doc_ends[-1]) if len(doc_ends) else 0
    cuts = np.union1d(np.concatenate([[0], doc_ends]), np.arange(0, total + 1, seq_length))
    starts, stops = cuts[:-1], cuts[1:]
    doc = np.searchsorted(doc_ends, starts, side="right")
    doc_starts = doc_ends[doc] - lengths[doc]
    rows = starts // seq_length
    row_ptr = np.searchsorted(rows, np.arange(-(-total // seq_length) + 1))
    return Pieces(doc, starts - doc_starts, stops - doc_starts, row_ptr)


def pack_whole(lengths: np.ndarray, seq_length: int) -> Pieces:
    """Place documents in order, starting a new row when the next one (or chunk) does not fit."""
    doc, start, stop, row_ptr = [], [], [], [0]
    fill = 0
    for index, length in enumerate(lengths.tolist()):
        for chunk in range(0, length, seq_length):
            size = min(seq_length, length - chunk)
            if fill + size > seq_length:
                row_ptr.append(len(doc))
                fill = 0
            doc.append(index)
            start.append(chunk)
            stop.append(chunk + size)
            fill += size
    if doc:
        row_ptr.append(len(doc))
    return Pieces(np.array(doc, np.int64), np.array(start, np.int64), np.array(stop, np.int64),
                  np.array(row_ptr, np.int64))


def pad_rows(lengths: np.ndarray, seq_length: int) -> Pieces:
    """One document (or ``seq_length`` chunk of it) per row."""
    chunks = -(-lengths // seq_length)
    doc = np.repeat(np.arange(len(lengths)), chunks)
    first = np.repeat(np.cumsum(chunks) - chunks, chunks)
    start = (np.arange(len(doc)) - first) * seq_length
    stop = np.minimum(start + seq_length, lengths[doc])
    return Pieces(doc, start, stop, np.arange(len(doc) + 1))


_PACKERS = {"stream": pack_stream, "whole": pack_whole, "pad": pad_rows}


class PackedSource:
    """The rows of one source: a token store laid out by one of :data:`LAYOUTS`."""

    def __init__(self, store: TokenStore, seq_length: int, layout: str, pad_id: int, name: str = ""):
        if layout not in LAYOUTS:
            raise ValueError(f"layout {layout!r} is not one of {LAYOUTS}")
        self.store, self.seq_length, self.layout = store, seq_length, layout
        self.pad_id, self.name = pad_id, name
        lengths = store.lengths.astype(np.int64)
        self.pieces = _PACKERS[layout](lengths, seq_length)
        tokens = int(lengths.sum())
        self.stats = PackStats(documents=len(lengths), tokens=tokens, rows=self.pieces.num_rows,
                               split_documents=int((lengths > seq_length).sum()),
                               padding=self.pieces.num_rows * seq_length - tokens)

    def __len__(self) -> int:
        return self.pieces.num_rows

    def row(self, index: int) -> Row:
        """Row ``index``: its tokens, loss mask and per-token document ids."""
        if not 0 <= index < len(self):
            raise IndexError(f"row {index} of {len(self)}")
        input_ids = np.full(self.seq_length, self.pad_id, dtype=np.int64)
        loss_mask = np.zeros(self.seq_length, dtype=bool)
        document_ids = np.zeros(self.seq_length, dtype=np.int64)
        pieces, position = self.pieces, 0
        first, last = int(pieces.row_ptr[index]), int(pieces.row_ptr[index + 1])
        for number, piece in enumerate(range(first, last)):
            tokens, mask = self.store.read(int(pieces.doc[piece]), int(pieces.start[piece]),
                                           int(pieces.stop[piece]))
            end = position + len(tokens)
            input_ids[position:end], loss_mask[position:end] = tokens, mask
            document_ids[position:end] = number
            position = end
        document_ids[position:] = last - first
        return Row(input_ids, loss_mask, document_ids)
