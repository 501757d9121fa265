"""The drafter's split-forward plan and its draft-pass mask (ar2dlm/model/draft_plan.py)."""

import torch

from ar2dlm.model.draft_plan import draft_plan, draft_rows_mask
from ar2dlm.model.masks import dense_mask
from ar2dlm.training.noise import block_layout

LENGTH = 32
DOCUMENTS = torch.tensor([[0] * 13 + [1] * 19, [0] * 32])


def test_plan_holds_every_position_of_each_scored_block_first_and_pads_to_a_multiple_of_16():
    scored = torch.zeros(2, LENGTH, dtype=torch.bool)
    scored[0, [5, 20]] = True  # blocks of 4 from each document's start: [4, 8) and [17, 21)
    scored[1, 30] = True  # block [28, 32)
    blocks, _ = block_layout((2, LENGTH), 4, DOCUMENTS)
    plan = draft_plan(scored, blocks)
    assert plan.index.shape == (2, 16)
    assert plan.index[0, :8].tolist() == [4, 5, 6, 7, 17, 18, 19, 20]
    assert plan.index[1, :4].tolist() == [28, 29, 30, 31]
    for row in plan.index:  # then other positions, each once
        assert len(set(row.tolist())) == 16


def test_draft_rows_mask_is_the_doubled_causal_masks_rows_and_columns():
    blocks, _ = block_layout((2, LENGTH), 4, DOCUMENTS)
    plan = draft_plan(torch.rand(2, LENGTH, generator=torch.Generator().manual_seed(0)) > 0.7, blocks)
    full = dense_mask("doubled_causal", LENGTH, 4, DOCUMENTS)  # [B, 2L, 2L], draft rows first
    for row in range(2):
        index = plan.index[row]
        expected = torch.cat([full[row][index][:, LENGTH:], full[row][index][:, index]], dim=-1)
        assert torch.equal(draft_rows_mask(plan, DOCUMENTS)[row, 0], expected)
