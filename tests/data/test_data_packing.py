"""Packing documents into rows: EOS between documents, document ids, pad mode, long documents."""

import numpy as np
import pytest

from ar2dlm.data.packing import PackedSource, pack_stream, pack_whole, pad_rows
from ar2dlm.data.tokenize import encode_texts, store_from_batches

TEXTS = ["alpha beta gamma", "delta", "epsilon zeta eta theta iota kappa lambda alpha beta gamma delta",
         "what is alpha", "beta", "gamma delta epsilon zeta"]


def _store(tokenizer, texts=TEXTS):
    return store_from_batches([encode_texts(tokenizer, texts)], tokenizer.eos_token_id)


def _documents(tokenizer, texts=TEXTS) -> list[list[int]]:
    return [tokenizer(t)["input_ids"] + [tokenizer.eos_token_id] for t in texts]


def _real(row):
    """The row's non-padding tokens and their document ids."""
    return row.input_ids[row.loss_mask], row.document_ids[row.loss_mask]


def test_stream_packing_concatenates_documents_with_eos_between(tokenizer):
    packed = PackedSource(_store(tokenizer), seq_length=8, layout="stream", pad_id=tokenizer.pad_token_id)
    documents = _documents(tokenizer)
    assert packed.stats.tokens == sum(map(len, documents))
    assert len(packed) == -(-packed.stats.tokens // 8)
    rows = [packed.row(r) for r in range(len(packed))]
    stream = np.concatenate([_real(row)[0] for row in rows])
    assert stream.tolist() == [t for doc in documents for t in doc]
    for row in rows:
        ids = row.document_ids
        assert ids[0] == 0 and (np.diff(ids) >= 0).all() and (np.diff(ids) <= 1).all()
        changes = np.flatnonzero(np.diff(ids)) + 1
        real_changes = [c for c in changes if row.loss_mask[c]]
        assert all(row.input_ids[c - 1] == tokenizer.eos_token_id for c in real_changes)
    last = rows[-1]
    padding = ~last.loss_mask
    assert padding.any() and (last.input_ids[padding] == tokenizer.pad_token_id).all()
    assert (last.document_ids[padding] == last.document_ids[last.loss_mask].max() + 1).all()
    assert all(r.loss_mask.all() for r in rows[:-1])


def test_pad_mode_puts_one_document_per_row(tokenizer):
    packed = PackedSource(_store(tokenizer), seq_length=32, layout="pad", pad_id=tokenizer.pad_token_id)
    documents = _documents(tokenizer)
    assert len(packed) == len(documents)
    for index, document in enumerate(documents):
        row = packed.row(index)
        assert row.input_ids[: len(document)].tolist() == document
        assert row.loss_mask.tolist() == [True] * len(document) + [False] * (32 - len(document))
        assert (row.input_ids[len(document):] == tokenizer.pad_token_id).all()


@pytest.mark.parametrize("layout", ["stream", "whole", "pad"])
def test_long_documents_are_split_and_counted(tokenizer, layout):
    long_text = " ".join(["alpha beta gamma delta"] * 6)
    texts = ["delta", long_text, "beta"]
    documents = _documents(tokenizer, texts)
    assert len(documents[1]) > 2 * 8
    packed = PackedSource(_store(tokenizer, texts), 8, layout=layout, pad_id=tokenizer.pad_token_id)
    assert packed.stats.split_documents == 1
    stream = np.concatenate([_real(packed.row(r))[0] for r in range(len(packed))])
    assert stream.tolist() == [t for doc in documents for t in doc]
    if layout == "pad":
        assert len(packed) == 1 + -(-len(documents[1]) // 8) + 1


def test_whole_layout_never_cuts_a_document_that_fits(tokenizer):
    packed = PackedSource(_store(tokenizer), seq_length=24, layout="whole", pad_id=tokenizer.pad_token_id)
    documents = _documents(tokenizer)
    seen = []
    for r in range(len(packed)):
        tokens, ids = _real(packed.row(r))
        seen += [tokens[ids == d].tolist() for d in np.unique(ids)]
    assert seen == documents


def _reference_stream(lengths, seq_length):
    """Piece list by walking the token stream one token at a time."""
    pieces, doc_of = [], np.repeat(np.arange(len(lengths)), lengths)
    offset_of = np.concatenate([np.arange(n) for n in lengths])
    for position in range(len(doc_of)):
        row, doc = position // seq_length, doc_of[position]
        if pieces and pieces[-1][0] == row and pieces[-1][1] == doc:
            pieces[-1][3] += 1
        else:
            pieces.append([row, doc, offset_of[position], offset_of[position] + 1])
    return pieces


@pytest.mark.parametrize("seed", range(5))
def test_vectorised_stream_packing_matches_a_token_by_token_reference(seed):
    lengths = np.random.default_rng(seed).integers(1, 30, size=40)
    pieces = pack_stream(lengths, 16)
    rows = np.searchsorted(pieces.row_ptr, np.arange(len(pieces.doc)), side="right") - 1
    got = [[rows[p], pieces.doc[p], pieces.start[p], pieces.stop[p]] for p in range(len(pieces.doc))]
    assert got == _reference_stream(lengths, 16)


def test_every_layout_keeps_every_token_once():
    lengths = np.array([5, 17, 1, 8, 40, 3])
    for pack in (pack_stream, pack_whole, pad_rows):
        pieces = pack(lengths, 8)
        assert (pieces.stop - pieces.start).sum() == lengths.sum()
        per_row = np.add.reduceat(pieces.stop - pieces.start, pieces.row_ptr[:-1])
        assert (per_row <= 8).all()
