"""Attention-mask rules (docs/design.md §2.2): hand-checked matrices, mask_mod == dense, documents, errors."""

from __future__ import annotations

import pytest
import torch

from ar2dlm.model.masks import (
    build_block_mask,
    dense_mask,
    document_starts,
    doubled_layout,
    make_mask_mod,
    to_megatron_mask,
    total_length,
)


def as_bool(rows: list[list[int]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.bool)


# L=4, block 2. Indices 0-3 noisy (blocks 0,0,1,1), 4-7 clean (positions 0-3).
DOUBLED_CAUSAL_L4_B2 = as_bool(
    [
        [1, 1, 0, 0, 0, 0, 0, 0],  # noisy 0: own block only; no earlier clean block
        [1, 1, 0, 0, 0, 0, 0, 0],
        [0, 0, 1, 1, 1, 1, 0, 0],  # noisy 2: own block + clean block 0, never clean block 1
        [0, 0, 1, 1, 1, 1, 0, 0],
        [0, 0, 0, 0, 1, 0, 0, 0],  # clean: token-causal over clean keys, never noisy
        [0, 0, 0, 0, 1, 1, 0, 0],
        [0, 0, 0, 0, 1, 1, 1, 0],
        [0, 0, 0, 0, 1, 1, 1, 1],
    ]
)
DOUBLED_BLOCK_CAUSAL_L4_B2 = as_bool(
    [
        [1, 1, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0, 0],
        [0, 0, 1, 1, 1, 1, 0, 0],
        [0, 0, 1, 1, 1, 1, 0, 0],
        [0, 0, 0, 0, 1, 1, 0, 0],  # clean: whole own block and earlier blocks
        [0, 0, 0, 0, 1, 1, 0, 0],
        [0, 0, 0, 0, 1, 1, 1, 1],
        [0, 0, 0, 0, 1, 1, 1, 1],
    ]
)
# L=6, block 2, documents [0,0,0,1,1,1]: blocks restart at position 3 (blk = 0,0,1 | 0,0,1).
DOCS_L6 = torch.tensor([[0, 0, 0, 1, 1, 1]])
DOUBLED_CAUSAL_L6_B2_DOCS = as_bool(
    [
        [1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        [0, 0, 1, 0, 0, 0, 1, 1, 0, 0, 0, 0],  # doc 0 block 1: clean doc-0 block 0
        [0, 0, 0, 1, 1, 0, 0, 0, 0, 0, 0, 0],  # doc 1 block 0: no clean context at all
        [0, 0, 0, 1, 1, 0, 0, 0, 0, 0, 0, 0],
        [0, 0, 0, 0, 0, 1, 0, 0, 0, 1, 1, 0],  # doc 1 block 1: clean doc-1 block 0
        [0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0],
        [0, 0, 0, 0, 0, 0, 1, 1, 0, 0, 0, 0],
        [0, 0, 0, 0, 0, 0, 1, 1, 1, 0, 0, 0],
        [0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0],  # clean doc 1 restarts causality
        [0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 0],
        [0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1],
    ]
)

CASES = [  # (layout, seq_len, block_size)
    ("causal", 7, 1),
    ("bidirectional", 7, 3),
    ("doubled_causal", 4, 2),
    ("doubled_causal", 24, 4),
    ("doubled_block_causal", 24, 4),
    ("doubled_causal", 80, 16),
    ("doubled_block_causal", 80, 8),
]


def random_document_ids(batch: int, seq_len: int, generator: torch.Generator) -> torch.Tensor:
    """Non-decreasing ids per row with random document boundaries."""
    starts = torch.rand(batch, seq_len, generator=generator) < 0.15
    starts[:, 0] = False
    return starts.long().cumsum(dim=1)


def mask_mod_grid(mask_mod, size: int, batch_index: int = 0) -> torch.Tensor:
    q_idx = torch.arange(size)[:, None]
    kv_idx = torch.arange(size)[None, :]
    return mask_mod(torch.tensor(batch_index), torch.tensor(0), q_idx, kv_idx).expand(size, size)


def test_doubled_causal_hand_checked() -> None:
    assert torch.equal(dense_mask("doubled_causal", 4, 2), DOUBLED_CAUSAL_L4_B2)


def test_doubled_block_causal_hand_checked() -> None:
    assert torch.equal(dense_mask("doubled_block_causal", 4, 2), DOUBLED_BLOCK_CAUSAL_L4_B2)


def test_single_stream_layouts_hand_checked() -> None:
    assert torch.equal(dense_mask("causal", 3, 1), as_bool([[1, 0, 0], [1, 1, 0], [1, 1, 1]]))
    assert torch.equal(dense_mask("bidirectional", 3, 2), torch.ones(3, 3, dtype=torch.bool))
    docs = torch.tensor([[0, 0, 1]])
    assert torch.equal(dense_mask("bidirectional", 3, 2, docs)[0], as_bool([[1, 1, 0], [1, 1, 0], [0, 0, 1]]))
    assert torch.equal(dense_mask("causal", 3, 2, docs)[0], as_bool([[1, 0, 0], [1, 1, 0], [0, 0, 1]]))


def test_documents_hand_checked_blocks_restart() -> None:
    mask = dense_mask("doubled_causal", 6, 2, DOCS_L6)
    assert mask.shape == (1, 12, 12)
    assert torch.equal(mask[0], DOUBLED_CAUSAL_L6_B2_DOCS)
    assert torch.equal(document_starts(DOCS_L6), torch.tensor([[0, 0, 0, 3, 3, 3]]))


@pytest.mark.parametrize("seq_len,block_size", [(4, 2), (16, 4), (32, 32), (30, 5)])
def test_doubled_causal_clean_half_is_exactly_causal(seq_len: int, block_size: int) -> None:
    mask = dense_mask("doubled_causal", seq_len, block_size)
    assert torch.equal(mask[seq_len:, seq_len:], torch.ones(seq_len, seq_len, dtype=torch.bool).tril())
    assert not mask[seq_len:, :seq_len].any()  # clean rows never see noisy keys
    assert torch.equal(mask[seq_len:, seq_len:], dense_mask("causal", seq_len, block_size))


@pytest.mark.parametrize("layout,seq_len,block_size", CASES)
def test_mask_mod_equals_dense(layout: str, seq_len: int, block_size: int) -> None:
    grid = mask_mod_grid(make_mask_mod(layout, seq_len, block_size), total_length(layout, seq_len))
    assert torch.equal(grid, dense_mask(layout, seq_len, block_size))


@pytest.mark.parametrize("layout,seq_len,block_size", CASES)
def test_mask_mod_equals_dense_with_documents(layout: str, seq_len: int, block_size: int) -> None:
    gen = torch.Generator().manual_seed(seq_len * 31 + block_size)
    docs = random_document_ids(3, seq_len, gen)
    mask_mod = make_mask_mod(layout, seq_len, block_size, docs)
    dense = dense_mask(layout, seq_len, block_size, docs)
    for row in range(docs.shape[0]):
        assert torch.equal(mask_mod_grid(mask_mod, total_length(layout, seq_len), row), dense[row])


@pytest.mark.parametrize("layout", ["causal", "bidirectional", "doubled_causal", "doubled_block_causal"])
def test_no_cross_document_attention(layout: str) -> None:
    gen = torch.Generator().manual_seed(0)
    seq_len = 48
    docs = random_document_ids(4, seq_len, gen)
    mask = dense_mask(layout, seq_len, 4, docs)
    ids = docs.repeat(1, 2) if layout.startswith("doubled") else docs
    cross = ids[:, :, None] != ids[:, None, :]
    assert cross.any()
    assert not (mask & cross).any()


@pytest.mark.parametrize("layout", ["doubled_causal", "doubled_block_causal"])
def test_each_document_sees_the_mask_of_a_lone_sequence(layout: str) -> None:
    lengths, block = (4, 6, 2), 2  # documents of 4, 6 and 2 tokens, L = 12
    docs = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])[None]
    seq_len = docs.shape[1]
    mask = dense_mask(layout, seq_len, block, docs)[0]
    start = 0
    for n in lengths:
        idx = torch.cat([torch.arange(start, start + n), seq_len + torch.arange(start, start + n)])
        assert torch.equal(mask[idx][:, idx], dense_mask(layout, n, block))
        start += n


def test_single_document_equals_no_documents() -> None:
    docs = torch.zeros(2, 16, dtype=torch.long)
    for layout in ("causal", "bidirectional", "doubled_causal", "doubled_block_causal"):
        with_docs = dense_mask(layout, 16, 4, docs)
        assert torch.equal(with_docs, dense_mask(layout, 16, 4).expand_as(with_docs))


def test_block_mask_is_cached_without_documents() -> None:
    first = build_block_mask("doubled_causal", 16, 4)
    assert build_block_mask("doubled_causal", 16, 4, device="cpu") is first
    assert build_block_mask("doubled_block_causal", 16, 4) is not first
    docs = torch.zeros(1, 16, dtype=torch.long)
    assert build_block_mask("doubled_causal", 16, 4, docs).shape[0] == 1


def test_helpers() -> None:
    allowed = dense_mask("doubled_causal", 4, 2)
    assert torch.equal(to_megatron_mask(allowed), ~allowed)
    assert doubled_layout() == "doubled_causal"
    assert doubled_layout("block_causal") == "doubled_block_causal"
    assert total_length("doubled_causal", 8) == 16 and total_length("causal", 8) == 8


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(layout="doubled", seq_len=8, block_size=2), "unknown layout 'doubled'"),
        (
            dict(layout="doubled_causal", seq_len=10, block_size=4),
            r"seq_len \(10\) must be a multiple of block_size \(4\)",
        ),
        (dict(layout="doubled_block_causal", seq_len=8, block_size=0), "block_size must be a positive int"),
        (dict(layout="causal", seq_len=0, block_size=1), "seq_len must be a positive int"),
        (
            dict(layout="causal", seq_len=4, block_size=1, document_ids=torch.zeros(1, 5, dtype=torch.long)),
            r"document_ids must have shape \[batch, seq_len=4\], got \(1, 5\)",
        ),
        (
            dict(layout="causal", seq_len=3, block_size=1, document_ids=torch.tensor([[0, 1, 0]])),
            "document_ids must be non-decreasing",
        ),
        (
            dict(layout="causal", seq_len=2, block_size=1, document_ids=torch.zeros(1, 2)),
            "document_ids must be an integer tensor",
        ),
    ],
)
def test_bad_arguments_raise(kwargs: dict, message: str) -> None:
    for fn in (dense_mask, make_mask_mod, build_block_mask):
        with pytest.raises(ValueError, match=message):
            fn(**kwargs)


def test_bad_clean_pattern_raises() -> None:
    with pytest.raises(ValueError, match="unknown clean-stream pattern 'bidirectional'"):
        doubled_layout("bidirectional")
