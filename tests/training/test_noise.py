"""Tests for ar2dlm.training.noise (docs/design.md §2.3)."""

from __future__ import annotations

import pytest
import torch

from ar2dlm.training.noise import (
    NoiseConfig,
    block_layout,
    in_block_positions,
    row_seed,
    sample_noise,
    splitmix64,
)

MASK_ID = 999
EPS = 1e-3


def _ids(rows: int, length: int, offset: int = 0) -> torch.Tensor:
    return (torch.arange(rows * length).reshape(rows, length) + offset) % 500


def _cfg(schedule: str, block_size: int = 16) -> NoiseConfig:
    return NoiseConfig(mask_token_id=MASK_ID, schedule=schedule, block_size=block_size, eps=EPS)


def _block_counts(masked: torch.Tensor, block_size: int) -> torch.Tensor:
    b, length = masked.shape
    return masked.reshape(b, length // block_size, block_size).sum(-1)


def test_config_validation() -> None:
    with pytest.raises(ValueError):
        NoiseConfig(mask_token_id=1, schedule="linear")
    with pytest.raises(ValueError):
        NoiseConfig(mask_token_id=1, eps=0.0)
    with pytest.raises(ValueError):
        NoiseConfig(mask_token_id=-1)
    with pytest.raises(ValueError):
        NoiseConfig(mask_token_id=1, block_size=0)


def test_uniform_mean_rate_and_weights() -> None:
    ids = _ids(2000, 64)
    d = sample_noise(ids, torch.arange(2000), step=3, seed=0, config=_cfg("uniform"))
    expected = (1 - EPS) / 2 + EPS
    assert abs(d.masked.float().mean().item() - expected) < 0.02
    # p is constant per row and lies in [eps, 1).
    assert torch.equal(d.rate, d.rate[:, :1].expand_as(d.rate))
    assert d.rate.min() >= EPS and d.rate.max() < 1
    # Within a row the mask rate follows p.
    assert torch.corrcoef(torch.stack([d.rate[:, 0], d.mask_ratio]))[0, 1] > 0.95
    assert torch.allclose(d.weight[d.masked], 1 / d.rate[d.masked])
    assert torch.all(d.weight[~d.masked] == 0)
    assert torch.all(d.noisy_ids[d.masked] == MASK_ID)
    assert torch.equal(d.noisy_ids[~d.masked], ids[~d.masked])


def test_position_exact_budget_and_mean_rate() -> None:
    bs = 16
    ids = _ids(500, 256)
    d = sample_noise(ids, torch.arange(500), step=0, seed=1, config=_cfg("position", bs))
    m = d.rate.reshape(500, -1, bs)
    assert torch.equal(m, m[..., :1].expand_as(m)), "m must be constant within a block"
    assert m.min() >= EPS and m.max() <= 1
    k = torch.round(m[..., 0] * bs)
    assert torch.equal(_block_counts(d.masked, bs).float(), k)
    assert abs(d.masked.float().mean().item() - (1 + EPS) / 2) < 0.01
    assert torch.allclose(d.weight[d.masked], 1 / d.rate[d.masked])
    assert torch.all(d.weight[~d.masked] == 0)


def test_position_skew_light_vs_heavy_noise() -> None:
    bs = 16
    ids = _ids(1000, 256)
    d = sample_noise(ids, torch.arange(1000), step=0, seed=2, config=_cfg("position", bs))
    masked = d.masked.reshape(-1, bs).float()
    m = d.rate.reshape(-1, bs)[:, 0]
    q = bs // 4
    light, heavy = m < 0.3, m > 0.9
    first_l, last_l = masked[light, :q].mean().item(), masked[light, -q:].mean().item()
    assert last_l > 3 * first_l, (first_l, last_l)
    first_h, last_h = masked[heavy, :q].mean().item(), masked[heavy, -q:].mean().item()
    assert abs(last_h - first_h) < 0.05, (first_h, last_h)
    # The uniform schedule has no positional skew.
    u = sample_noise(ids, torch.arange(1000), step=0, seed=2, config=_cfg("uniform", bs))
    um = u.masked.reshape(-1, bs).float()
    assert abs(um[:, :q].mean().item() - um[:, -q:].mean().item()) < 0.02


@pytest.mark.parametrize("schedule", ["uniform", "position"])
def test_determinism_across_batch_layouts(schedule: str) -> None:
    cfg = _cfg(schedule, 8)
    length = 64
    ids = _ids(4, length)
    index = torch.tensor([10, 11, 12, 13])
    full = sample_noise(ids, index, step=5, seed=7, config=cfg)
    # Micro-batches, reordered rows, and a different batch around the row.
    micro = [sample_noise(ids[i : i + 2], index[i : i + 2], step=5, seed=7, config=cfg) for i in (0, 2)]
    assert torch.equal(torch.cat([x.masked for x in micro]), full.masked)
    assert torch.equal(torch.cat([x.weight for x in micro]), full.weight)
    perm = torch.tensor([3, 1, 0, 2])
    shuffled = sample_noise(ids[perm], index[perm], step=5, seed=7, config=cfg)
    assert torch.equal(shuffled.masked, full.masked[perm])
    others = torch.cat([_ids(3, length, offset=123), ids[2:3]])
    mixed = sample_noise(others, torch.tensor([1, 99, 4, 12]), step=5, seed=7, config=cfg)
    assert torch.equal(mixed.masked[3], full.masked[2])
    assert torch.equal(mixed.noisy_ids[3], full.noisy_ids[2])
    # A list of indices works like a tensor.
    assert torch.equal(sample_noise(ids, [10, 11, 12, 13], step=5, seed=7, config=cfg).masked, full.masked)


@pytest.mark.parametrize("schedule", ["uniform", "position"])
def test_different_step_seed_or_index_changes_noise(schedule: str) -> None:
    cfg = _cfg(schedule, 8)
    ids = _ids(1, 256)
    base = sample_noise(ids, [3], step=0, seed=0, config=cfg).masked
    for kwargs in (
        {"sample_index": [3], "step": 1, "seed": 0},
        {"sample_index": [4], "step": 0, "seed": 0},
        {"sample_index": [3], "step": 0, "seed": 1},
    ):
        other = sample_noise(ids, config=cfg, **kwargs).masked
        assert not torch.equal(other, base), kwargs


def test_row_seed_is_stable() -> None:
    # Pinned values: a change here changes every run's noise (and breaks exact resume).
    assert splitmix64(0) == 0xE220A8397B1DCDAF  # the reference SplitMix64 output for state 0
    assert row_seed(0, 0, 0) == 16913965548708892385
    assert row_seed(1234, 56789, 10) == 5143845640042400050
    assert len({row_seed(s, i, t) for s in range(3) for i in range(50) for t in range(50)}) == 3 * 50 * 50
    assert 0 <= row_seed(-1, -5, 2**70) < 2**64


@pytest.mark.parametrize("schedule", ["uniform", "position"])
def test_loss_mask_false_never_masked(schedule: str) -> None:
    bs = 8
    ids = _ids(200, 64)
    loss_mask = torch.rand(200, 64, generator=torch.Generator().manual_seed(0)) > 0.3
    loss_mask[:, :20] = False  # an SFT prompt
    d = sample_noise(ids, torch.arange(200), step=0, seed=0, config=_cfg(schedule, bs), loss_mask=loss_mask)
    assert not (d.masked & ~loss_mask).any()
    assert d.masked.any()
    assert torch.equal(d.noisy_ids[~loss_mask], ids[~loss_mask])
    assert torch.allclose(d.mask_ratio, d.masked.sum(1) / loss_mask.sum(1))
    if schedule == "position":
        # Budget k = round(m * n_maskable) per block.
        n = _block_counts(loss_mask, bs).float()
        m = d.rate.reshape(200, -1, bs)[..., 0]
        assert torch.equal(_block_counts(d.masked, bs).float(), torch.round(m * n))


def test_block_layout_restarts_at_documents() -> None:
    doc = torch.tensor([[0, 0, 0, 0, 0, 1, 1, 1, 2, 2]])
    block_id, in_block = block_layout((1, 10), 3, doc)
    assert in_block.tolist() == [[0, 1, 2, 0, 1, 0, 1, 2, 0, 1]]
    assert block_id.tolist() == [[0, 0, 0, 1, 1, 2, 2, 2, 3, 3]]
    block_id, in_block = block_layout((2, 5), 2)
    assert block_id.tolist() == [[0, 0, 1, 1, 2]] * 2
    assert in_block.tolist() == [[0, 1, 0, 1, 0]] * 2


def test_block_layout_with_a_phase_shifts_each_documents_blocks_back() -> None:
    doc = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1, 1, 1]])
    phase = torch.tensor([[1, 1, 1, 3, 3, 3, 3, 3, 3, 3]])  # document 1's first block is 4 - 3 = 1 long
    block_id, in_block = block_layout((1, 10), 4, doc, phase)
    assert in_block.tolist() == [[0, 1, 2, 0, 0, 1, 2, 3, 0, 1]]
    assert block_id.tolist() == [[0, 0, 0, 1, 2, 2, 2, 2, 3, 3]]
    assert torch.equal(in_block_positions(block_id), in_block)
    zero = block_layout((1, 10), 4, doc, torch.zeros_like(phase))
    assert all(torch.equal(a, b) for a, b in zip(zero, block_layout((1, 10), 4, doc), strict=True))


def test_in_block_positions_invert_block_ids() -> None:
    doc = torch.tensor([[0] * 5 + [1] * 20 + [2] * 7] * 3)
    phase = torch.tensor([[0] * 5 + [2] * 20 + [7] * 7, [4] * 5 + [1] * 20 + [0] * 7, [0] * 32])
    for args in (((3, 32), 8, doc, phase), ((3, 32), 8, doc), ((3, 32), 5)):
        block_id, in_block = block_layout(*args)
        assert torch.equal(in_block_positions(block_id), in_block)


def test_position_documents_restart_blocks() -> None:
    bs, length, rows = 8, 60, 300
    lengths = [13, 20, 5, 22]  # documents whose blocks do not line up with multiples of 8
    doc = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)]).expand(rows, length)
    d = sample_noise(
        _ids(rows, length), torch.arange(rows), step=0, seed=3, config=_cfg("position", bs), document_ids=doc
    )
    start = 0
    for n in lengths:
        for b0 in range(start, start + n, bs):
            b1 = min(b0 + bs, start + n)
            m = d.rate[:, b0:b1]
            assert torch.equal(m, m[:, :1].expand_as(m)), (b0, b1)
            k = torch.round(m[:, 0] * (b1 - b0))
            assert torch.equal(d.masked[:, b0:b1].sum(1).float(), k), (b0, b1)
        start += n
    # m differs between the last block of a document and the first of the next.
    assert not torch.equal(d.rate[:, 12], d.rate[:, 13])
