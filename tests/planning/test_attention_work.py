"""The pair and tile counts of ar2dlm/planning/attention_work.py against the real masks."""

import pytest

from ar2dlm.model.masks import LAYOUTS, build_block_mask, dense_mask
from ar2dlm.planning.attention_work import FLEX_TILE, attended_pairs, flex_tiles

SIZES = [(64, 8), (256, 32), (320, 32), (192, 64), (512, 256)]  # L a multiple of the tile, or not; B > tile


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("seq_len,block_size", SIZES)
def test_attended_pairs_are_the_true_entries_of_the_mask(layout, seq_len, block_size):
    assert attended_pairs(layout, seq_len, block_size) == int(dense_mask(layout, seq_len, block_size).sum())


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("seq_len,block_size", SIZES)
def test_flex_tiles_are_the_blocks_of_the_block_mask(layout, seq_len, block_size):
    mask = build_block_mask(layout, seq_len, block_size, flex_block_size=FLEX_TILE)
    partial = mask.kv_num_blocks.sum()
    full = mask.full_kv_num_blocks.sum() if mask.full_kv_num_blocks is not None else 0
    tiles, pairs = flex_tiles(layout, seq_len, block_size)
    assert tiles == int(partial + full)
    assert attended_pairs(layout, seq_len, block_size) <= pairs <= tiles * FLEX_TILE ** 2
