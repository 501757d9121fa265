"""Complementary masking (docs/design.md §2.7): each noise draw and its complement in the same step.

A row x_0 with the draw x_t is trained a second time, in the same micro-batch, with the complement x_t': the
maskable positions that x_t keeps. Across the pair every maskable position is a diffusion target exactly once.
The layout is two rows, ``[x_t ; x_0]`` then ``[x_t' ; x_0]`` (rows B..2B-1 are the complements of rows 0..B-1),
so the attention masks, kernels and context parallelism are those of the plain doubled sequence; the cost is
that the clean stream is computed twice. Only the first row of a pair has AR targets, so the AR term counts
each clean token once.

The complement is a function of the draw alone, so it inherits the draw's reproducibility: it depends only
on (seed, global sample index, step) and the row, never on the batch, the rank or the parallel layout.
Its nominal rate is 1 - r (r the draw's rate, p per row or m per block), floored at eps like the draw's own
rate, and its loss weight is 1 / (1 - r).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ar2dlm.training.noise import NoiseConfig, NoiseDraw


def complement(draw: NoiseDraw, clean_ids: Tensor, maskable: Tensor, config: NoiseConfig) -> NoiseDraw:
    """The complementary draw: masked where ``maskable`` and not masked by ``draw``."""
    if clean_ids.shape != draw.masked.shape or maskable.shape != draw.masked.shape:
        raise ValueError(f"clean_ids {tuple(clean_ids.shape)} and maskable {tuple(maskable.shape)} must have the "
                         f"draw's shape {tuple(draw.masked.shape)}")
    device = draw.masked.device
    maskable = maskable.to(device).bool()
    masked = maskable & ~draw.masked
    rate = (1.0 - draw.rate).clamp(min=config.eps)
    n_maskable = maskable.sum(dim=1)
    return NoiseDraw(
        noisy_ids=torch.where(masked, config.mask_token_id, clean_ids.to(device)),
        masked=masked,
        weight=torch.where(masked, 1.0 / rate, 0.0),
        rate=rate,
        mask_ratio=(masked.sum(dim=1) / n_maskable.clamp(min=1)).float(),
    )


def paired(draw: NoiseDraw, clean_ids: Tensor, maskable: Tensor, config: NoiseConfig) -> NoiseDraw:
    """``draw``'s rows followed by their complements: a draw of 2B rows."""
    other = complement(draw, clean_ids, maskable, config)
    return NoiseDraw(*(torch.cat([a, b], dim=0) for a, b in (
        (draw.noisy_ids, other.noisy_ids), (draw.masked, other.masked), (draw.weight, other.weight),
        (draw.rate, other.rate), (draw.mask_ratio, other.mask_ratio))))


def repeat_rows(tensor: Tensor | None) -> Tensor | None:
    """[B, ...] -> [2B, ...]: the rows, then the same rows again (None stays None)."""
    return None if tensor is None else torch.cat([tensor, tensor], dim=0)


def first_of_pair(tensor: Tensor) -> Tensor:
    """[B, ...] bool -> [2B, ...]: the rows, then all-False rows (AR targets only in the first row of a pair)."""
    return torch.cat([tensor, torch.zeros_like(tensor)], dim=0)
