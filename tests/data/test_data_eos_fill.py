"""data.eos_fill_to_block: text documents end with EOS up to a block multiple, in the loss (data/tokenize.py)."""

import numpy as np
import pytest
import torch

from ar2dlm.data.loader import TrainDataLoader, build_datasets
from ar2dlm.data.prepare import prepare
from ar2dlm.data.tokenize import EncodedBatch, encode_texts, fill_to_block
from ar2dlm.errors import UserError

EOS = 99


def test_each_document_is_filled_to_the_next_block_end():
    batch = EncodedBatch(np.arange(1, 11, dtype=np.int32), np.array([3, 4, 0, 3]))  # documents of 3, 4, 0, 3
    filled = fill_to_block(batch, 4, EOS)
    assert filled.lengths.tolist() == [4, 4, 0, 4]
    assert filled.tokens.tolist() == [1, 2, 3, EOS, 4, 5, 6, 7, 8, 9, 10, EOS]
    assert filled.loss_mask is None  # every token, the fill included, stays in the loss


def test_the_fill_extends_a_loss_mask_with_trained_positions():
    batch = EncodedBatch(np.array([5, 6, 7, 8, 9], dtype=np.int32), np.array([2, 3]),
                         np.array([False, True, False, True, True]))
    filled = fill_to_block(batch, 3, EOS)
    assert filled.tokens.tolist() == [5, 6, EOS, 7, 8, 9]
    assert filled.loss_mask.tolist() == [False, True, True, False, True, True]
    with pytest.raises(ValueError, match="block_size must be >= 1"):
        fill_to_block(batch, 0, EOS)


def _documents(row):
    return [np.flatnonzero(row.document_ids == doc) for doc in np.unique(row.document_ids[row.loss_mask])]


@pytest.mark.parametrize("fill", [False, True])
def test_packed_rows_hold_whole_filled_documents(tokenizer, write_jsonl, data_cfg, numbered_docs, fill):
    docs = numbered_docs(20)
    path = write_jsonl("docs.jsonl", docs)
    cfg = data_cfg([{"path": str(path)}], seq_length=32, eos_fill_to_block=fill)
    train, _ = build_datasets(cfg, tokenizer, seq_length=32, block_size=8, seed=0)
    texts = encode_texts(tokenizer, [d["text"] for d in docs])
    eos = tokenizer.eos_token_id
    rows = [train[i] for i in range(len(train))]
    lengths = [len(p) for row in rows for p in _documents(row)]
    whole = [p for row in rows for p in _documents(row) if p[0] > 0 and p[-1] < 31]  # documents not cut by a row
    assert whole
    if not fill:  # the corpus's own lengths, not block multiples: what the fill changes
        assert sum(lengths) == int(texts.lengths.sum()) and any(len(p) % 8 for p in whole)
        return
    assert all(len(p) % 8 == 0 for p in whole)
    assert sum(lengths) == int(sum(-(-n // 8) * 8 for n in texts.lengths))
    for row in rows:
        for positions in _documents(row):
            assert row.loss_mask[positions].all()
    stream = np.concatenate([row.input_ids[row.loss_mask] for row in rows])
    offsets = np.concatenate([[0], np.cumsum(-(-texts.lengths // 8) * 8)])
    text_offsets = np.concatenate([[0], np.cumsum(texts.lengths)])
    for doc, n in enumerate(texts.lengths):
        got = stream[offsets[doc]:offsets[doc + 1]]
        assert got[:n].tolist() == texts.tokens[text_offsets[doc]:text_offsets[doc + 1]].tolist()
        assert (got[n - 1:] == eos).all()  # the document's own EOS, then the fill


def test_training_batches_carry_the_fill_in_the_loss(tokenizer, write_jsonl, data_cfg, numbered_docs):
    path = write_jsonl("docs.jsonl", numbered_docs(12))
    cfg = data_cfg([{"path": str(path)}], seq_length=16, eos_fill_to_block=True)
    train, _ = build_datasets(cfg, tokenizer, seq_length=16, block_size=4, seed=0)
    batch = TrainDataLoader(train, global_batch_size=4, micro_batch_size=4, dp_rank=0, dp_size=1,
                            seed=0).next_step()[0]
    eos = batch.input_ids == tokenizer.eos_token_id
    runs = eos[:, 1:] & eos[:, :-1]  # an EOS after an EOS is fill
    assert runs.any() and batch.loss_mask[:, 1:][runs].all()
    assert torch.equal(batch.document_ids[:, 1:][runs], batch.document_ids[:, :-1][runs])  # inside its document


def test_an_indexed_source_with_the_fill_is_refused(tmp_path, tokenizer, write_jsonl, data_cfg, numbered_docs):
    from omegaconf import OmegaConf

    from ar2dlm.config.schema import DataSourceConfig
    from ar2dlm.data.build import check_sources

    source = OmegaConf.structured(DataSourceConfig(path=str(write_jsonl("docs.jsonl", numbered_docs(5)))))
    prepare(source, tokenizer, str(tmp_path / "corpus"))
    cfg = data_cfg([{"path": str(tmp_path / "corpus")}], seq_length=16, eos_fill_to_block=True)
    for check in (lambda: check_sources(cfg),
                  lambda: build_datasets(cfg, tokenizer, seq_length=16, block_size=4, seed=0)):
        with pytest.raises(UserError, match="eos_fill_to_block needs the documents' text"):
            check()
