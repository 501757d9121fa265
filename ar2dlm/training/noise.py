"""Training noise: which positions of x_0 are replaced by the mask token (docs/design.md §2.3).

The noise of a row is a pure function of (seed, global sample index, step) and the row's own
contents (length, loss mask, document layout): never of its place in the batch, the batch size
or the rank. All random draws come from a CPU generator per row, so CPU and GPU runs agree.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ar2dlm.model.masks import document_starts

SCHEDULES = ("uniform", "position")

_MASK64 = (1 << 64) - 1
_NOISE_SALT = 0x6E6F6973655F7631  # "noise_v1": keeps this stream apart from other uses of the seed


@dataclass(kw_only=True)
class NoiseConfig:
    """How to noise x_0 into x_t."""

    mask_token_id: int
    schedule: str = "uniform"  # "uniform" | "position"
    block_size: int = 32  # diffusion block length B (used by "position")
    eps: float = 1e-3
    half_life_ratio: float = 0.25  # h in lambda = ln 2 / (h B)

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ValueError(f"noise schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if not 0.0 < self.eps < 1.0:
            raise ValueError(f"eps must be in (0, 1), got {self.eps}")
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        if self.half_life_ratio <= 0.0:
            raise ValueError(f"half_life_ratio must be > 0, got {self.half_life_ratio}")
        if self.mask_token_id < 0:
            raise ValueError(f"mask_token_id must be >= 0, got {self.mask_token_id}")


@dataclass
class NoiseDraw:
    """One noising of a batch. All tensors are on the device of ``input_ids``."""

    noisy_ids: Tensor  # [B, L] long: x_t
    masked: Tensor  # [B, L] bool: positions replaced by the mask token
    weight: Tensor  # [B, L] float32: 1 / rate where masked, 0 elsewhere
    rate: Tensor  # [B, L] float32: nominal mask level, p (uniform, per row) or m (position, per block)
    mask_ratio: Tensor  # [B] float32: masked / maskable positions of each row (0 if none maskable)


def splitmix64(x: int) -> int:
    """One step of the SplitMix64 mixer on a 64-bit unsigned int."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def row_seed(seed: int, sample_index: int, step: int, salt: int = _NOISE_SALT) -> int:
    """Stable 64-bit seed for one row, from (seed, global sample index, step); another ``salt``, another stream."""
    h = splitmix64((seed ^ salt) & _MASK64)
    h = splitmix64(h ^ (sample_index & _MASK64))
    return splitmix64(h ^ (step & _MASK64))


def row_uniforms(seeds: Sequence[int], n: int) -> Tensor:
    """[len(seeds), n] float32 uniforms in [0, 1) on CPU, row r drawn from its own generator.

    torch's CPU generator (mt19937) keeps only the low 32 bits of a seed: 2^32 distinct streams.
    """
    out = torch.empty(len(seeds), n, dtype=torch.float32)
    gen = torch.Generator(device="cpu")
    for r, s in enumerate(seeds):
        gen.manual_seed(s)
        torch.rand(n, generator=gen, out=out[r])
    return out


def block_layout(
    shape: tuple[int, int], block_size: int, document_ids: Tensor | None = None, phase: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Block index (non-decreasing along each row) and in-block position of every position.

    Blocks are counted from each document's start, so the last block of a document may be shorter than
    ``block_size``. ``phase`` [B, L] (each position's document's value, in [0, block_size)) shifts a document's
    block boundaries back by that many positions: its first block is ``block_size - phase`` long.
    """
    b, length = shape
    pos = torch.arange(length).expand(b, length)
    starts = torch.zeros_like(pos) if document_ids is None else document_starts(document_ids.cpu())
    if phase is None:
        in_block = (pos - starts) % block_size
    else:
        begins = ((pos - starts + phase.cpu()) % block_size == 0) | (pos == starts)
        in_block = in_block_positions(begins.long().cumsum(dim=1))
    return block_ids(in_block), in_block


def block_ids(in_block: Tensor) -> Tensor:
    """Block index [B, L] of every position from the in-block positions (a block starts where it is 0)."""
    return (in_block == 0).long().cumsum(dim=1) - 1


def in_block_positions(blocks: Tensor) -> Tensor:
    """In-block position [B, L] of every position from the block indices (the inverse of :func:`block_ids`): a
    block is a run of equal indices, as a document is a run of equal ids."""
    return torch.arange(blocks.shape[1], device=blocks.device) - document_starts(blocks)


def sample_noise(
    input_ids: Tensor,
    sample_index: Tensor | Sequence[int],
    step: int,
    seed: int,
    config: NoiseConfig,
    loss_mask: Tensor | None = None,
    document_ids: Tensor | None = None,
) -> NoiseDraw:
    """Noise ``input_ids`` [B, L]; positions where ``loss_mask`` is False are never masked.

    ``position`` schedule: the budget of a block is k = round(m * n) where n is the number of
    maskable (loss-mask) positions of the block, and the k positions are drawn among those only.
    The in-block position i in w_i counts all positions of the block, maskable or not.
    """
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [B, L], got shape {tuple(input_ids.shape)}")
    b, length = input_ids.shape
    indices = [int(i) for i in torch.as_tensor(sample_index).reshape(-1).tolist()]
    if len(indices) != b:
        raise ValueError(f"need one sample index per row: {len(indices)} for {b} rows")
    seeds = [row_seed(seed, i, step) for i in indices]
    maskable = torch.ones(b, length, dtype=torch.bool) if loss_mask is None else loss_mask.cpu().bool()
    eps = config.eps

    if config.schedule == "uniform":
        r = row_uniforms(seeds, length + 1)
        p = (1.0 - eps) * r[:, :1] + eps  # [B, 1]
        masked = (r[:, 1:] < p) & maskable
        rate = p.expand(b, length)
    else:
        masked, rate = _position_masks(row_uniforms(seeds, 2 * length), maskable, config, document_ids)

    weight = torch.where(masked, 1.0 / rate, 0.0)
    n_maskable = maskable.sum(dim=1)
    mask_ratio = masked.sum(dim=1) / n_maskable.clamp(min=1)
    dev = input_ids.device
    masked_dev = masked.to(dev)
    return NoiseDraw(
        noisy_ids=torch.where(masked_dev, config.mask_token_id, input_ids),
        masked=masked_dev,
        weight=weight.to(dev),
        rate=rate.contiguous().to(dev),
        mask_ratio=mask_ratio.float().to(dev),
    )


def _position_masks(
    r: Tensor, maskable: Tensor, config: NoiseConfig, document_ids: Tensor | None
) -> tuple[Tensor, Tensor]:
    """Position-dependent masks from uniforms ``r`` [B, 2L]; returns (masked, per-position m)."""
    b, length = maskable.shape
    block_id, in_block = block_layout((b, length), config.block_size, document_ids)
    # r[:, :L] holds one m per block (block ordinal indexes it), r[:, L:] one Gumbel per position.
    m = config.eps + (1.0 - config.eps) * r[:, :length].gather(1, block_id)
    n_block = torch.zeros(b, length).scatter_add_(1, block_id, maskable.float()).gather(1, block_id)
    k = torch.round(m * n_block)  # same value at every position of a block
    lam = math.log(2.0) / (config.half_life_ratio * config.block_size)
    u = r[:, length:].clamp(min=torch.finfo(torch.float32).tiny)
    key = lam * (1.0 - m) * in_block + (-torch.log(-torch.log(u)))
    key = torch.where(maskable, key, -math.inf)
    # Sort by key (descending), then stably by block: since blocks are contiguous and block ids
    # non-decreasing, block c then fills the same slots as its positions, so the rank of the
    # entry at slot s inside its block is in_block[s]; it is kept iff that rank < k.
    order = key.argsort(dim=1, descending=True, stable=True)
    order = order.gather(1, block_id.gather(1, order).argsort(dim=1, stable=True))
    masked = torch.zeros(b, length, dtype=torch.bool).scatter_(1, order, in_block < k)
    return masked, m
