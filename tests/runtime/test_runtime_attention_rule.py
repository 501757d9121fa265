"""The runtime keeps its own copy of the attention rule (an export imports only torch and transformers); this pins
it to the training mask of :mod:`ar2dlm.model.masks` (docs/design.md §2.2, §4.2)."""

from __future__ import annotations

import pytest
import torch

from ar2dlm.model.masks import dense_mask
from ar2dlm.runtime.decoding_ar2dlm import allowed_keys


def training_mask_seen_from_a_block(left_pad: int, prefix: int, block: int, block_size: int) -> torch.Tensor:
    """Rows and columns of the ``doubled_causal`` training mask for [left padding, clean prefix, noisy block]:
    the padding is a document of its own before the text, the block the noisy copy of the positions after the
    prefix (one training block, or its short last part when the document ends there)."""
    text = prefix + block
    tail = -(left_pad + text) % block_size  # padding after the text to a whole number of blocks
    length = left_pad + text + tail
    documents = torch.tensor([[0] * left_pad + [1] * text + [2] * tail])
    mask = dense_mask("doubled_causal", length, block_size, documents)[0]
    clean = [length + i for i in range(left_pad + prefix)]
    noisy = list(range(left_pad + prefix, left_pad + text))
    index = torch.tensor(clean + noisy)
    return mask[index][:, index]


@pytest.mark.parametrize("block_size", [1, 2, 4, 8])
@pytest.mark.parametrize("blocks_before", [0, 1, 3])
@pytest.mark.parametrize("left_pad", [0, 1, 5])
def test_runtime_rule_is_the_training_mask_seen_from_the_last_block(block_size, blocks_before, left_pad):
    """A diffusion pass (the block sees itself both ways and the causal prefix) and a causal pass over the same
    tokens: every real query sees exactly the keys the training mask allows it; a query of the left padding sees
    only itself (what it computes is never read)."""
    prefix = blocks_before * block_size
    for block in sorted({1, max(block_size - 1, 1), block_size}):  # a whole block, or the short last one
        expected = training_mask_seen_from_a_block(left_pad, prefix, block, block_size)
        keys = left_pad + prefix + block
        valid = torch.tensor([[False] * left_pad + [True] * (prefix + block)])
        diffusion = allowed_keys(valid, keys, block)[0]
        assert torch.equal(diffusion[left_pad:], expected[left_pad:]), (prefix, block)
        assert torch.equal(diffusion[:left_pad], torch.eye(keys, dtype=torch.bool)[:left_pad])
        causal = allowed_keys(valid, keys, 0)[0]  # the clean half: what a causal pass over the block computes
        clean_expected = dense_mask("causal", keys, block_size, valid.long())[0]
        assert torch.equal(causal[left_pad:], clean_expected[left_pad:])
        with_cache = allowed_keys(valid, block, block)[0]  # the block's queries after a cached prefix
        assert torch.equal(with_cache, diffusion[-block:])
