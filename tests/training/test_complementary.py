"""Complementary masking (ar2dlm.training.complementary, docs/design.md §2.7): the pair covers every maskable
position exactly once, and the pair of a sample depends only on (seed, sample index, step)."""

from __future__ import annotations

import pytest
import torch

from ar2dlm.data.loader import Batch
from ar2dlm.training.complementary import complement, paired
from ar2dlm.training.forward import ObjectiveSettings, prepare_batch
from ar2dlm.training.loss import ar_target_mask, doubled_labels, objective_weights
from ar2dlm.training.noise import NoiseConfig, sample_noise

MASK_ID = 127
EPS = 1e-3


def _noise(schedule: str, block_size: int = 4) -> NoiseConfig:
    return NoiseConfig(mask_token_id=MASK_ID, schedule=schedule, block_size=block_size, eps=EPS)


def _settings(schedule: str = "uniform", complementary: bool = True, objective: str = "joint",
              pattern: str = "causal", seed: int = 11) -> ObjectiveSettings:
    return ObjectiveSettings(objective_weights(objective), _noise(schedule), pattern, "sdpa", seed=seed, pad_id=0,
                             complementary_masking=complementary)


def _rows(count: int, length: int = 16, documents: bool = False) -> Batch:
    generator = torch.Generator().manual_seed(5)
    ids = torch.randint(1, 120, (count, length), generator=generator)
    loss_mask = torch.rand(count, length, generator=generator) < 0.8  # some prompt / padding positions
    docs = (torch.arange(length) >= length // 2 + 3).long().expand(count, length).contiguous() if documents else None
    return Batch(ids, loss_mask, docs, torch.arange(100, 100 + count))


def _select(batch: Batch, rows: list[int]) -> Batch:
    docs = None if batch.document_ids is None else batch.document_ids[rows]
    return Batch(batch.input_ids[rows], batch.loss_mask[rows], docs, batch.sample_index[rows])


@pytest.mark.parametrize("schedule", ["uniform", "position"])
def test_the_pair_covers_every_maskable_position_exactly_once(schedule):
    batch = _rows(64, documents=schedule == "position")
    config = _noise(schedule)
    draw = sample_noise(batch.input_ids, batch.sample_index, 3, 0, config, batch.loss_mask, batch.document_ids)
    other = complement(draw, batch.input_ids, batch.loss_mask, config)
    assert torch.equal(draw.masked ^ other.masked, batch.loss_mask)  # each maskable position in exactly one
    assert not (draw.masked & other.masked).any()
    assert not other.masked[~batch.loss_mask].any()  # prompts and padding stay unmasked and unscored
    assert torch.equal(other.noisy_ids, torch.where(other.masked, MASK_ID, batch.input_ids))
    torch.testing.assert_close(other.rate, (1 - draw.rate).clamp(min=EPS))
    torch.testing.assert_close(other.weight, torch.where(other.masked, 1 / other.rate, 0.0))
    maskable = batch.loss_mask.sum(dim=1)
    torch.testing.assert_close(other.mask_ratio, ((maskable - draw.masked.sum(dim=1)) / maskable).float())


def test_the_complement_rate_is_floored_at_eps():
    ids = torch.arange(8).reshape(1, 8)
    draw = sample_noise(ids, [0], 0, 0, _noise("uniform"))
    draw.rate = torch.ones_like(draw.rate)  # a draw that masked with rate 1 leaves a complement of rate 0
    assert torch.all(complement(draw, ids, torch.ones_like(ids, dtype=torch.bool), _noise("uniform")).rate == EPS)


def test_paired_draw_is_the_draw_then_its_complement():
    batch, config = _rows(3), _noise("uniform")
    draw = sample_noise(batch.input_ids, batch.sample_index, 1, 0, config, batch.loss_mask)
    pair = paired(draw, batch.input_ids, batch.loss_mask, config)
    other = complement(draw, batch.input_ids, batch.loss_mask, config)
    for name in ("noisy_ids", "masked", "weight", "rate", "mask_ratio"):
        assert torch.equal(getattr(pair, name), torch.cat([getattr(draw, name), getattr(other, name)])), name


def test_prepared_pair_rows_inputs_labels_and_targets():
    batch, settings = _rows(2), _settings()
    prepared = prepare_batch(batch, 4, settings)
    x0, length = batch.input_ids, batch.input_ids.shape[1]
    assert prepared.input_ids.shape == (4, 2 * length)
    assert torch.equal(prepared.input_ids[:, length:], torch.cat([x0, x0]))  # the clean stream of both rows
    assert torch.equal(prepared.labels, doubled_labels(torch.cat([x0, x0]), 0))
    masked = prepared.noise.masked
    assert torch.equal(masked[:2] ^ masked[2:], batch.loss_mask)
    assert torch.equal(prepared.input_ids[:, :length], torch.where(masked, MASK_ID, torch.cat([x0, x0])))
    ar = ar_target_mask(batch.loss_mask)
    assert torch.equal(prepared.ar_mask, torch.cat([ar, torch.zeros_like(ar)]))  # AR targets counted once
    assert int(prepared.loss_tokens) == int(batch.loss_mask.sum()) + int(ar.sum())
    plain = prepare_batch(batch, 4, _settings(complementary=False))
    assert torch.equal(masked[:2], plain.noise.masked)  # the first row of a pair is the ordinary draw


def test_single_stream_layout_pairs_too():
    batch = _rows(2)
    prepared = prepare_batch(batch, 2, _settings(objective="diffusion", pattern="none"))
    assert prepared.input_ids.shape == (4, 16) and prepared.ar_mask is None
    assert torch.equal(prepared.noise.masked[:2] ^ prepared.noise.masked[2:], batch.loss_mask)


@pytest.mark.parametrize("schedule", ["uniform", "position"])
def test_pairs_are_identical_across_batch_splits_and_after_resume(schedule):
    """A data-parallel / micro-batch split puts a sample in another row of another micro-batch; a resumed run
    rebuilds the settings from scratch. Neither may change a sample's pair."""
    batch = _rows(4, documents=True)
    whole = prepare_batch(batch, 7, _settings(schedule))
    for rows in ([3, 1], [0], [2, 0, 1]):  # other micro-batches, other orders
        part = prepare_batch(_select(batch, rows), 7, _settings(schedule))
        for position, row in enumerate(rows):
            for half in (0, 1):  # the draw (rows 0..n-1) and its complement (rows n..2n-1)
                got, want = position + half * len(rows), row + half * 4
                assert torch.equal(part.noise.masked[got], whole.noise.masked[want])
                assert torch.equal(part.noise.weight[got], whole.noise.weight[want])
                assert torch.equal(part.input_ids[got], whole.input_ids[want])
    resumed = prepare_batch(batch, 7, _settings(schedule))  # a new run object with the same seed
    assert torch.equal(resumed.input_ids, whole.input_ids) and torch.equal(resumed.noise.weight, whole.noise.weight)
    assert not torch.equal(prepare_batch(batch, 8, _settings(schedule)).noise.masked, whole.noise.masked)
    assert not torch.equal(prepare_batch(batch, 7, _settings(schedule, seed=12)).noise.masked, whole.noise.masked)
