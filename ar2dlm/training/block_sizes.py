"""Random diffusion block sizes during training (docs/design.md §2.7).

With probability ``probability`` a training step uses a block size drawn uniformly from ``candidates`` instead
of ``diffusion.block_size`` (the released NLD model's ``random_length_prob``). The draw is one per step, shared
by every row, micro-batch and rank of the step: one forward pass has one block grid, so the attention kernels
and their cached masks stay those of a fixed block size. It is a pure function of (seed, step), so every
parallel layout and a resumed run train each step with the same block size. Training steps count from 1;
step 0 (the fixed noise of the validation pass) always uses ``block_size``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ar2dlm.training.noise import splitmix64

_MASK64 = (1 << 64) - 1
_BLOCK_SALT = 0x626C6F636B5F7631  # "block_v1": keeps this stream apart from the noise's


def candidate_block_sizes(block_size: int, sizes: Sequence[int] = ()) -> tuple[int, ...]:
    """The block sizes a step may draw: ``sizes`` (each a divisor of ``block_size``), or by default every power
    of two >= 2 that divides ``block_size``, and ``block_size`` itself."""
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    if sizes:
        bad = [s for s in sizes if int(s) < 1 or block_size % int(s)]
        if bad:
            raise ValueError(f"random block sizes must divide block_size={block_size}, got {bad}")
        return tuple(sorted({int(s) for s in sizes}))
    powers = {1 << k for k in range(1, block_size.bit_length()) if block_size % (1 << k) == 0}
    return tuple(sorted(powers | {block_size}))


def _unit(h: int) -> float:
    """The top 53 bits of a 64-bit hash as a float in [0, 1)."""
    return (h >> 11) * 2.0**-53


@dataclass(frozen=True)
class RandomBlockSizes:
    """How a training step chooses its diffusion block size."""

    block_size: int  # diffusion.block_size: the size of every step that does not draw
    probability: float  # diffusion.random_block_prob
    candidates: tuple[int, ...]  # see candidate_block_sizes

    def __post_init__(self) -> None:
        if not 0.0 <= self.probability <= 1.0:
            raise ValueError(f"random block probability must be in [0, 1], got {self.probability}")
        if not self.candidates or any(c < 1 or self.block_size % c for c in self.candidates):
            raise ValueError(f"candidate block sizes {self.candidates} must be divisors of {self.block_size}")

    def at_step(self, seed: int, step: int) -> int:
        """The block size of training step ``step`` (>= 1) of the run seeded ``seed``; ``block_size`` at step 0."""
        if step < 1 or self.probability == 0.0:
            return self.block_size
        h = splitmix64(splitmix64((seed ^ _BLOCK_SALT) & _MASK64) ^ (step & _MASK64))
        if _unit(h) >= self.probability:
            return self.block_size
        return self.candidates[splitmix64(h) % len(self.candidates)]
