"""The training stream: blending, order = f(seed, epoch), exact resume, DP sharding, validation split."""

import numpy as np
import pytest
import torch

from ar2dlm.data.blend import SampleOrder
from ar2dlm.data.loader import TrainDataLoader, build_datasets, eval_batches
from ar2dlm.errors import UserError


@pytest.fixture
def corpus(tokenizer, write_jsonl, data_cfg, numbered_docs):
    """Factory: a packed train set (and validation set) of one or more numbered-document sources."""

    def make(sizes=(40,), weights=None, seq_length=16, seed=0, **fields):
        sources = [{"path": str(write_jsonl(f"s{i}.jsonl", numbered_docs(n, prefix=f"s{i}"))),
                    "weight": (weights or [1.0] * len(sizes))[i]} for i, n in enumerate(sizes)]
        return build_datasets(data_cfg(sources, seq_length=seq_length, **fields), tokenizer,
                              seq_length=seq_length, block_size=4, seed=seed)

    return make


def _loader(dataset, gbs=4, mbs=2, rank=0, dp=1, seed=0, **kwargs):
    return TrainDataLoader(dataset, global_batch_size=gbs, micro_batch_size=mbs, dp_rank=rank, dp_size=dp,
                           seed=seed, **kwargs)


def _steps(loader, count):
    return [loader.next_step() for _ in range(count)]


def _same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        for field in ("input_ids", "loss_mask", "document_ids", "sample_index"):
            assert torch.equal(getattr(x, field), getattr(y, field)), field


def test_blend_follows_the_weights(corpus):
    train, _ = corpus(sizes=(30, 60, 15), weights=[1.0, 2.0, 5.0], seq_length=8)
    order = SampleOrder(train, seed=3)
    draws = np.array([order.locate(g)[0] for g in range(20 * len(train))])
    shares = np.bincount(draws, minlength=3) / len(draws)
    assert np.allclose(shares, [1 / 8, 2 / 8, 5 / 8], atol=0.01)
    window = np.bincount(draws[: len(train)], minlength=3) / len(train)  # one epoch: exact counts
    assert np.allclose(window, [1 / 8, 2 / 8, 5 / 8], atol=1.5 / len(train))
    assert train.counts.sum() == len(train) == train.rows.sum()


def test_each_source_is_read_in_whole_passes(corpus):
    train, _ = corpus(sizes=(30, 10), weights=[1.0, 3.0], seq_length=8)
    order = SampleOrder(train, seed=0)
    small = [row for source, row in map(order.locate, range(4 * len(train))) if source == 1]
    rows = int(train.rows[1])
    for start in range(0, len(small) - rows + 1, rows):
        assert sorted(small[start:start + rows]) == list(range(rows))


def test_order_depends_only_on_seed_and_epoch(corpus):
    train, _ = corpus(sizes=(50,))
    epoch = len(train)
    first = SampleOrder(train, seed=1)
    walked = [first.locate(g) for g in range(3 * epoch)]
    fresh = SampleOrder(train, seed=1)
    assert [fresh.locate(g) for g in range(2 * epoch, 3 * epoch)] == walked[2 * epoch:]
    rows = [row for _, row in walked]
    for e in range(3):  # each epoch is a permutation of the rows, a different one per epoch
        assert sorted(rows[e * epoch:(e + 1) * epoch]) == list(range(epoch))
    assert rows[:epoch] != rows[epoch:2 * epoch]
    assert [SampleOrder(train, seed=2).locate(g) for g in range(epoch)] != walked[:epoch]
    _same(_steps(_loader(train, seed=5), 3)[2], _steps(_loader(train, seed=5), 3)[2])


@pytest.mark.parametrize("stop_after", [2, 7])  # mid-epoch, and after an epoch boundary
def test_resume_continues_with_the_exact_next_sample(corpus, stop_after):
    train, _ = corpus(sizes=(20,))
    steps_per_epoch = len(train) / 4
    assert 2 < steps_per_epoch < 7
    straight = _steps(_loader(train, seed=9), 10)
    interrupted = _loader(train, seed=9)
    _steps(interrupted, stop_after)
    state = interrupted.state_dict()
    assert state["consumed_samples"] == 4 * stop_after
    resumed = _loader(train, seed=9)
    resumed.load_state_dict(dict(state))
    for expected, got in zip(straight[stop_after:], _steps(resumed, 10 - stop_after), strict=True):
        _same(expected, got)
    assert int(straight[-1][-1].sample_index[-1]) == 39


def test_data_parallel_ranks_read_disjoint_shards_of_the_same_global_batch(corpus):
    train, _ = corpus(sizes=(40, 25), weights=[1, 1])
    single = _steps(_loader(train, gbs=8, mbs=2), 3)
    ranks = [_steps(_loader(train, gbs=8, mbs=2, rank=r, dp=2), 3) for r in range(2)]
    quads = [_steps(_loader(train, gbs=8, mbs=1, rank=r, dp=4), 3) for r in range(4)]
    for step in range(3):
        whole = torch.cat([b.sample_index for b in single[step]])
        assert whole.tolist() == list(range(8 * step, 8 * step + 8))
        for layout in (ranks, quads):
            shards = [torch.cat([b.sample_index for b in rank[step]]) for rank in layout]
            flat = torch.cat(shards).tolist()
            assert len(set(flat)) == len(flat)  # disjoint
            assert torch.equal(torch.cat(shards), whole)
            assert torch.equal(torch.cat([b.input_ids for rank in layout for b in rank[step]]),
                               torch.cat([b.input_ids for b in single[step]]))


def test_worker_processes_give_the_same_batches(corpus):
    train, _ = corpus(sizes=(30,))
    expected = _steps(_loader(train), 4)
    loader = _loader(train, num_workers=1)
    got = _steps(loader, 2)
    state = loader.state_dict()
    loader.load_state_dict(state)
    got += _steps(loader, 2)
    for a, b in zip(expected, got, strict=True):
        _same(a, b)


def _documents_of(dataset, tokenizer):
    texts = set()
    for index in range(len(dataset)):
        row = dataset[index]
        for doc in np.unique(row.document_ids[row.loss_mask]):
            text = tokenizer.decode(row.input_ids[(row.document_ids == doc) & row.loss_mask])
            texts.add(text.replace("<|eos|>", "").split(" number")[0])
    return texts


def test_validation_split_is_disjoint_from_train(corpus, tokenizer):
    train, validation = corpus(sizes=(60,), validation_fraction=0.2, seq_length=64, pack=False)
    train_docs, held_docs = _documents_of(train, tokenizer), _documents_of(validation, tokenizer)
    assert len(held_docs) == 12 and len(train_docs) == 48
    assert not train_docs & held_docs
    assert train_docs | held_docs == {f"s0 {i}" for i in range(60)}
    again = corpus(sizes=(60,), validation_fraction=0.2, seq_length=64, pack=False)[1]
    assert _documents_of(again, tokenizer) == held_docs


def test_eval_path_gives_a_held_out_set(corpus, write_jsonl, numbered_docs, tokenizer):
    path = write_jsonl("eval.jsonl", numbered_docs(5, prefix="ev"))
    train, validation = corpus(sizes=(20,), eval_path=str(path), seq_length=64, pack=False)
    assert _documents_of(validation, tokenizer) == {f"ev {i}" for i in range(5)}
    with pytest.raises(UserError, match="either data.eval_path or data.validation_fraction"):
        corpus(sizes=(20,), eval_path=str(path), validation_fraction=0.1)


def test_eval_batches_cover_every_row_once_across_ranks(corpus):
    _, validation = corpus(sizes=(60,), validation_fraction=0.2, seq_length=16)
    rows = len(validation)
    per_rank = [list(eval_batches(validation, micro_batch_size=2, dp_rank=r, dp_size=3)) for r in range(3)]
    assert len({len(batches) for batches in per_rank}) == 1
    samples = [s for batches in per_rank for b in batches for s in b.sample_index.tolist()]
    assert sorted(s for s in samples if s >= 0) == list(range(rows))
    fillers = [b for batches in per_rank for b in batches if (b.sample_index < 0).any()]
    assert all(not b.loss_mask[b.sample_index < 0].any() for b in fillers)


def test_resume_with_another_seed_is_refused(corpus):
    train, _ = corpus()
    loader = _loader(train, seed=1)
    loader.next_step()
    with pytest.raises(UserError, match="resume with seed=1"):
        _loader(train, seed=2).load_state_dict(loader.state_dict())


def test_bad_batch_layout_is_refused(corpus):
    train, _ = corpus()
    with pytest.raises(UserError, match="not a multiple of micro_batch_size x data-parallel size"):
        _loader(train, gbs=6, mbs=2, dp=2)
