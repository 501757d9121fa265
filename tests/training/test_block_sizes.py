"""Random training block sizes (ar2dlm.training.block_sizes, docs/design.md §2.7): a deterministic draw per
(seed, step), and the block grid that the noise and the attention mask of that step use."""

from __future__ import annotations

import pytest
import torch

from ar2dlm.data.loader import Batch
from ar2dlm.training.block_sizes import RandomBlockSizes, candidate_block_sizes
from ar2dlm.training.forward import ObjectiveSettings, prepare_batch
from ar2dlm.training.loss import objective_weights
from ar2dlm.training.noise import NoiseConfig


def test_default_candidates_are_the_power_of_two_divisors_and_the_block_size():
    assert candidate_block_sizes(32) == (2, 4, 8, 16, 32)
    assert candidate_block_sizes(24) == (2, 4, 8, 24)
    assert candidate_block_sizes(1) == (1,)
    assert candidate_block_sizes(64, [32, 16, 32]) == (16, 32)
    with pytest.raises(ValueError, match="must divide block_size=32"):
        candidate_block_sizes(32, [12])
    with pytest.raises(ValueError, match="candidate block sizes"):
        RandomBlockSizes(32, 0.5, (3,))
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        RandomBlockSizes(32, 1.5, (4,))


def test_the_draw_is_a_function_of_seed_and_step_only():
    draws = RandomBlockSizes(32, 0.5, candidate_block_sizes(32))
    again = RandomBlockSizes(32, 0.5, candidate_block_sizes(32))  # a resumed run builds its own
    steps = range(1, 2001)
    sizes = [draws.at_step(3, s) for s in steps]
    assert sizes == [again.at_step(3, s) for s in steps]
    assert sizes != [draws.at_step(4, s) for s in steps]  # another seed, another sequence
    assert list(reversed(sizes)) == [draws.at_step(3, s) for s in reversed(steps)]  # no hidden state
    drawn = sum(size != 32 for size in sizes) + sum(size == 32 for size in sizes) / 5  # expected 32s: 1/5 of draws
    assert abs(drawn / len(sizes) - 0.5) < 0.05
    assert set(sizes) == {2, 4, 8, 16, 32}
    assert draws.at_step(3, 0) == 32  # step 0: the validation pass, always the configured size


def test_probability_zero_and_one():
    assert {RandomBlockSizes(16, 0.0, (4, 16)).at_step(1, s) for s in range(1, 200)} == {16}
    assert {RandomBlockSizes(16, 1.0, (4,)).at_step(1, s) for s in range(1, 200)} == {4}


def _settings(schedule: str, probability: float = 1.0) -> ObjectiveSettings:
    return ObjectiveSettings(objective_weights("joint"), NoiseConfig(mask_token_id=127, schedule=schedule,
                                                                     block_size=8),
                             "causal", "sdpa", seed=2, pad_id=0,
                             random_blocks=RandomBlockSizes(8, probability, (2, 4, 8)))


def _batch(documents: bool = False) -> Batch:
    ids = torch.randint(1, 120, (3, 32), generator=torch.Generator().manual_seed(1))
    docs = (torch.arange(32) >= 13).long().expand(3, 32).contiguous() if documents else None
    return Batch(ids, torch.ones_like(ids, dtype=torch.bool), docs, torch.tensor([4, 5, 6]))


@pytest.mark.parametrize("documents", [False, True])
def test_each_step_noises_and_attends_on_its_drawn_block_grid(documents):
    settings = _settings("position")
    seen = set()
    for step in range(1, 40):
        size = settings.random_blocks.at_step(settings.seed, step)
        seen.add(size)
        prepared = prepare_batch(_batch(documents), step, settings)
        assert prepared.layout.block_size == size
        # position-dependent noise: one rate m per block of the drawn grid (counted from each document's start)
        position = torch.arange(32)
        document = (position >= 13).long() if documents else torch.zeros(32, dtype=torch.long)
        block_of = document * 1000 + (position - 13 * document) // size
        rate = prepared.noise.rate
        for block in block_of.unique():
            inside = rate[:, block_of == block]
            assert torch.equal(inside, inside[:, :1].expand_as(inside))
        assert (rate[:, 0] != rate[:, size]).all() or size == 32  # a new block, a new draw of m
    assert seen == {2, 4, 8}
    assert prepare_batch(_batch(documents), 0, settings).layout.block_size == 8  # validation


def test_without_random_blocks_every_step_uses_the_block_size():
    plain = ObjectiveSettings(objective_weights("joint"), NoiseConfig(mask_token_id=127, block_size=8), "causal",
                              "sdpa", seed=2, pad_id=0)
    assert {prepare_batch(_batch(), step, plain).layout.block_size for step in range(0, 20)} == {8}
