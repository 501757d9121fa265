"""The attention of batches prepared with the training levers (docs/design.md §2.7): the complementary pair's
rows and a step's drawn block size, through every attention kernel, equal a dense reference written here from
the rule table of §2.2, independently of ar2dlm.model.masks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ar2dlm.data.loader import Batch
from ar2dlm.model.attention import block_diffusion_attention
from ar2dlm.training.block_sizes import RandomBlockSizes
from ar2dlm.training.forward import ObjectiveSettings, prepare_batch
from ar2dlm.training.loss import objective_weights
from ar2dlm.training.noise import NoiseConfig

LENGTH = 16


def doubled_reference(length: int, block_size: int, documents: list[int]) -> torch.Tensor:
    """[2L, 2L] bool (True = may attend) for ``[x_t ; x_0]`` with the causal clean stream, element by element."""
    starts = [documents.index(documents[i]) for i in range(length)]
    blk = [(i - starts[i]) // block_size for i in range(length)]
    mask = torch.zeros(2 * length, 2 * length, dtype=torch.bool)
    for q in range(2 * length):
        for k in range(2 * length):
            q_clean, qi, k_clean, ki = q >= length, q % length, k >= length, k % length
            if documents[qi] != documents[ki]:
                continue
            if not q_clean and not k_clean:
                mask[q, k] = blk[qi] == blk[ki]
            elif not q_clean:
                mask[q, k] = blk[ki] < blk[qi]
            elif k_clean:
                mask[q, k] = ki <= qi
    return mask


def _reference_attention(query, key, value, block_size: int, document_ids) -> torch.Tensor:
    rows = []
    for row in range(query.shape[0]):
        documents = [0] * LENGTH if document_ids is None else document_ids[row].tolist()
        mask = doubled_reference(LENGTH, block_size, documents)
        rows.append(F.scaled_dot_product_attention(query[row:row + 1], key[row:row + 1], value[row:row + 1],
                                                   attn_mask=mask))
    return torch.cat(rows)


def _batch(documents: bool) -> Batch:
    generator = torch.Generator().manual_seed(4)
    ids = torch.randint(1, 120, (2, LENGTH), generator=generator)
    docs = None
    if documents:  # row 0: documents of 5 and 11 tokens; row 1: one document
        docs = torch.stack([(torch.arange(LENGTH) >= 5).long(), torch.zeros(LENGTH, dtype=torch.long)])
    return Batch(ids, torch.ones_like(ids, dtype=torch.bool), docs, torch.tensor([0, 1]))


def _check_kernels(prepared, block_size: int) -> None:
    layout = prepared.layout
    rows = prepared.input_ids.shape[0]
    generator = torch.Generator().manual_seed(9)
    query, key, value = (torch.randn(rows, 2, 2 * LENGTH, 8, generator=generator) for _ in range(3))
    expected = _reference_attention(query, key, value, block_size, layout.document_ids)
    for kernel in ("sdpa", "split", "flex"):
        with torch.no_grad():  # CPU flex attention is forward-only
            got = block_diffusion_attention(query, key, value, layout=layout.layout, block_size=layout.block_size,
                                            seq_len=layout.seq_len, document_ids=layout.document_ids, kernel=kernel)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5, msg=kernel)


@pytest.mark.parametrize("documents", [False, True])
def test_complementary_pair_rows_attend_as_the_dense_reference(documents):
    settings = ObjectiveSettings(objective_weights("joint"), NoiseConfig(mask_token_id=127, block_size=4), "causal",
                                 "auto", seed=1, pad_id=0, complementary_masking=True)
    prepared = prepare_batch(_batch(documents), 3, settings)
    assert prepared.input_ids.shape[0] == 4
    if documents:  # each complement row keeps its sample's documents
        assert torch.equal(prepared.layout.document_ids[2:], prepared.layout.document_ids[:2])
    _check_kernels(prepared, 4)


@pytest.mark.parametrize("documents", [False, True])
def test_a_drawn_block_size_is_the_grid_of_the_mask(documents):
    settings = ObjectiveSettings(objective_weights("joint"), NoiseConfig(mask_token_id=127, block_size=8), "causal",
                                 "auto", seed=1, pad_id=0, random_blocks=RandomBlockSizes(8, 1.0, (2, 4)))
    sizes = {}
    for step in range(1, 20):
        sizes.setdefault(settings.block_size_at(step), step)
    assert set(sizes) == {2, 4}
    for size, step in sizes.items():
        prepared = prepare_batch(_batch(documents), step, settings)
        _check_kernels(prepared, size)
