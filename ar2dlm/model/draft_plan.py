"""Which draft-stream positions the drafter's split forward computes, and the attention mask of its draft pass
(:mod:`ar2dlm.model.draft_pass`, docs/design.md §4.7)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

PLAN_WIDTH_MULTIPLE = 16  # the draft pass's width is rounded up to this (FP8 GEMMs want multiples of 16)


@dataclass(frozen=True)
class DraftPlan:
    """Which draft-stream positions a split forward computes, per row: ``index`` [B, P], the positions of every
    block holding a scored position first (in order), then other positions up to the common width P; ``blocks``
    [B, L], the block of every position (as :func:`ar2dlm.training.noise.block_layout` counts them, from each
    document's start, numbered along the row)."""

    index: Tensor
    blocks: Tensor

    def to(self, device: torch.device) -> DraftPlan:
        return DraftPlan(self.index.to(device), self.blocks.to(device))


def draft_plan(scored: Tensor, blocks: Tensor) -> DraftPlan:
    """The plan of a micro-batch from its scored draft positions [B, L] and block ids [B, L]."""
    length = scored.shape[1]
    live = torch.zeros_like(blocks).scatter_add_(1, blocks, scored.long()).gather(1, blocks) > 0
    width = -(-int(live.sum(dim=1).max()) // PLAN_WIDTH_MULTIPLE) * PLAN_WIDTH_MULTIPLE
    width = min(length, max(PLAN_WIDTH_MULTIPLE, width))
    order = torch.argsort((~live).to(torch.int8), dim=1, stable=True)
    return DraftPlan(order[:, :width].contiguous(), blocks)


def draft_rows_mask(plan: DraftPlan, document_ids: Tensor | None) -> Tensor:
    """[B, 1, P, L + P] (True = attend): the ``doubled_causal`` mask's rows of the plan's draft positions, over the
    clean keys then the plan's draft keys. A draft reads the clean keys of its document's earlier blocks and the
    draft keys of its own block (block ids are numbered along the row, so one block never spans two documents)."""
    query_blocks = plan.blocks.gather(1, plan.index)
    reads_clean = plan.blocks[:, None, :] < query_blocks[:, :, None]
    if document_ids is not None:
        query_documents = document_ids.gather(1, plan.index)
        reads_clean = reads_clean & (document_ids[:, None, :] == query_documents[:, :, None])
    reads_draft = query_blocks[:, None, :] == query_blocks[:, :, None]
    return torch.cat([reads_clean, reads_draft], dim=-1).unsqueeze(1)
