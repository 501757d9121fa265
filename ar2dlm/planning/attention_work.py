"""Query-key pairs of one sequence: those its mask lets attend, and those each kernel computes.

The mask rules are docs/design.md §2.2 (ar2dlm/model/masks.py); the counts assume one document per row,
the most work a packed row can take (document boundaries only remove pairs). Tests pin every count to the
real masks: ``dense_mask(...).sum()`` and the ``BlockMask`` that ``build_block_mask`` builds.
"""

from __future__ import annotations

import numpy as np

from ar2dlm.model.masks import is_doubled, total_length

FLEX_TILE = 128  # FlexAttention's block size in ar2dlm.model.masks.build_block_mask


def attended_pairs(layout: str, seq_len: int, block_size: int) -> int:
    """Pairs the mask allows in one sequence of ``seq_len`` data tokens (L; the doubled layouts have 2L rows)."""
    n, b = seq_len, block_size
    causal = n * (n + 1) // 2
    if layout == "causal":
        return causal
    if layout == "bidirectional":
        return n * n
    blocks = n // b
    noisy_noisy = n * b  # each noisy block sees itself
    noisy_clean = b * b * blocks * (blocks - 1) // 2  # and the clean text of every earlier block
    clean_clean = causal if layout == "doubled_causal" else b * b * blocks * (blocks + 1) // 2
    return noisy_noisy + noisy_clean + clean_clean


def flex_tiles(layout: str, seq_len: int, block_size: int, tile: int = FLEX_TILE) -> tuple[int, int]:
    """(non-empty tiles, pairs inside them) of FlexAttention's block-sparse mask for one sequence."""
    size = total_length(layout, seq_len)
    starts = np.arange(0, size, tile)
    stops = np.minimum(starts + tile, size)
    q_start, q_stop = starts[:, None], stops[:, None]
    k_start, k_stop = starts[None, :], stops[None, :]
    if is_doubled(layout):
        occupied = _doubled_tile_occupied(layout, seq_len, block_size, q_start, q_stop, k_start, k_stop)
    elif layout == "causal":
        occupied = k_start <= q_stop - 1
    else:
        occupied = np.ones((len(starts), len(starts)), dtype=bool)
    area = (q_stop - q_start) * (k_stop - k_start)
    return int(occupied.sum()), int((occupied * area).sum())


def _doubled_tile_occupied(layout, n, b, q_start, q_stop, k_start, k_stop) -> np.ndarray:
    """Whether a tile of the 2L x 2L square holds an allowed pair, quadrant by quadrant (a tile may straddle
    the noisy / clean boundary when L is not a multiple of the tile)."""
    def halves(start, stop):  # (first, last) stream positions of the tile's noisy part and of its clean part
        return (start, np.minimum(stop, n) - 1), (np.maximum(start, n) - n, stop - n - 1)

    (qn0, qn1), (qc0, qc1) = halves(q_start, q_stop)
    (kn0, kn1), (kc0, kc1) = halves(k_start, k_stop)
    q_noisy, q_clean, k_noisy, k_clean = qn0 <= qn1, qc0 <= qc1, kn0 <= kn1, kc0 <= kc1
    same_block = (np.maximum(qn0 // b, kn0 // b) <= np.minimum(qn1 // b, kn1 // b)) & q_noisy & k_noisy
    earlier_block = (kc0 // b < qn1 // b) & q_noisy & k_clean
    if layout == "doubled_causal":
        clean_rule = kc0 <= qc1
    else:
        clean_rule = kc0 // b <= qc1 // b
    return same_block | earlier_block | (clean_rule & q_clean & k_clean)


def kernel_pairs(kernel: str, layout: str, seq_len: int, block_size: int, documents: bool) -> int:
    """Pairs the kernel computes for one sequence: FlexAttention the non-empty tiles, SDPA the whole square,
    ``split`` the clean square and each noisy chunk against its keys (ar2dlm.model.attention.noisy_chunks)."""
    if kernel == "flex":
        return flex_tiles(layout, seq_len, block_size)[1]
    if kernel == "split":
        from ar2dlm.model.attention import noisy_chunks

        chunks = noisy_chunks(seq_len, block_size, documents)
        return seq_len * seq_len + sum((q1 - q0) * (q1 + k1 - k0) for q0, q1, k0, k1 in chunks)
    return total_length(layout, seq_len) ** 2


def split_chunk_keys(seq_len: int, block_size: int, documents: bool) -> tuple[int, int]:
    """(keys gathered for all noisy chunks, query x key entries of their masks) of the ``split`` kernel."""
    from ar2dlm.model.attention import noisy_chunks

    chunks = noisy_chunks(seq_len, block_size, documents)
    keys = [q1 + k1 - k0 for _, q1, k0, k1 in chunks]
    return sum(keys), sum((q1 - q0) * k for (q0, q1, _, _), k in zip(chunks, keys, strict=True))
