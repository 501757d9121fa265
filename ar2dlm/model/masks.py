"""Attention masks for block-diffusion training (docs/design.md §2.2), as pure functions.

Convention: a mask is a boolean tensor where **True means "query may attend to key"** (the
convention of ``torch.nn.functional.scaled_dot_product_attention`` and FlexAttention's
``mask_mod``). Megatron-core uses the opposite (True = masked out); convert with
:func:`to_megatron_mask`.

Layouts (``seq_len`` is L, the length of one stream):

- ``"causal"``: one stream of length L, token-causal (plain AR).
- ``"bidirectional"``: one stream of length L, full attention (``diffusion.clean_pattern=none``: no clean
  stream, the LLaDA-style baseline).
- ``"doubled_causal"`` / ``"doubled_block_causal"``: the doubled sequence ``[x_t ; x_0]`` of
  length 2L, noisy half first, both halves with positions 0..L-1. With blk(i) = i // block_size:
  noisy->noisy same block; noisy->clean key block strictly earlier; clean->clean token-causal
  (``doubled_causal``, the default) or block-causal (``doubled_block_causal``); clean->noisy never.

Packed sequences: ``document_ids`` [batch, L] (non-decreasing per row) adds "same document" and
counts blocks from each document's start: blk(i) = (i - doc_start(i)) // block_size. In the
doubled layouts the ids apply to both halves.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Literal, get_args

import torch
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask, create_block_mask

Layout = Literal["causal", "bidirectional", "doubled_causal", "doubled_block_causal"]
CleanPattern = Literal["causal", "block_causal"]
MaskMod = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]

LAYOUTS: tuple[str, ...] = get_args(Layout)
CLEAN_PATTERNS: tuple[str, ...] = get_args(CleanPattern)
DOUBLED_LAYOUTS: tuple[str, ...] = ("doubled_causal", "doubled_block_causal")


def doubled_layout(clean_pattern: CleanPattern = "causal") -> Layout:
    """The doubled ``[x_t ; x_0]`` layout for a clean-stream pattern (``causal`` or ``block_causal``)."""
    if clean_pattern not in CLEAN_PATTERNS:
        raise ValueError(f"unknown clean-stream pattern {clean_pattern!r}; expected one of {CLEAN_PATTERNS}")
    return "doubled_causal" if clean_pattern == "causal" else "doubled_block_causal"


def is_doubled(layout: Layout) -> bool:
    """Whether the layout is a doubled ``[x_t ; x_0]`` sequence."""
    return layout in DOUBLED_LAYOUTS


def total_length(layout: Layout, seq_len: int) -> int:
    """Length of the attention sequence: 2L for doubled layouts, L otherwise."""
    return 2 * seq_len if is_doubled(layout) else seq_len


def to_megatron_mask(allowed: Tensor) -> Tensor:
    """Convert an SDPA-convention mask (True = attend) to Megatron's (True = masked out)."""
    return ~allowed


def validate_mask_args(
    layout: str, seq_len: int, block_size: int, document_ids: Tensor | None = None
) -> None:
    """Raise ValueError with a clear message when the mask arguments are inconsistent."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")
    if not isinstance(seq_len, int) or isinstance(seq_len, bool) or seq_len < 1:
        raise ValueError(f"seq_len must be a positive int, got {seq_len!r}")
    if not isinstance(block_size, int) or isinstance(block_size, bool) or block_size < 1:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")
    if is_doubled(layout) and seq_len % block_size != 0:
        raise ValueError(
            f"seq_len ({seq_len}) must be a multiple of block_size ({block_size}) for layout {layout!r}"
        )
    if document_ids is None:
        return
    if (
        not isinstance(document_ids, Tensor)
        or document_ids.dtype.is_floating_point
        or document_ids.is_complex()
    ):
        raise ValueError("document_ids must be an integer tensor of shape [batch, seq_len]")
    if document_ids.dim() != 2 or document_ids.shape[1] != seq_len:
        raise ValueError(
            f"document_ids must have shape [batch, seq_len={seq_len}], got {tuple(document_ids.shape)}"
        )
    if bool((document_ids[:, 1:] < document_ids[:, :-1]).any()):
        raise ValueError("document_ids must be non-decreasing along each row (packed documents)")


def document_starts(document_ids: Tensor) -> Tensor:
    """For each position, the index where its document starts: [batch, L] long tensor."""
    pos = torch.arange(document_ids.shape[1], device=document_ids.device)
    is_start = torch.ones_like(document_ids, dtype=torch.bool)
    is_start[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
    return torch.where(is_start, pos, torch.zeros_like(pos)).cummax(dim=1).values


def dense_mask(
    layout: Layout,
    seq_len: int,
    block_size: int,
    document_ids: Tensor | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """Dense boolean reference mask (True = attend).

    Returns [S, S] without documents, [batch, S, S] with them (S = ``total_length``). Built from
    the four L x L quadrants by broadcast comparisons; independent of :func:`make_mask_mod`.
    """
    validate_mask_args(layout, seq_len, block_size, document_ids)
    if document_ids is not None:
        device = document_ids.device if device is None else device
        document_ids = document_ids.to(device)
    pos = torch.arange(seq_len, device=device)
    if document_ids is None:
        rel = pos[None, :]  # [1, L]
        same_doc = torch.ones(1, seq_len, seq_len, dtype=torch.bool, device=device)
    else:
        rel = pos[None, :] - document_starts(document_ids)
        same_doc = document_ids[:, :, None] == document_ids[:, None, :]
    q_blk, k_blk = (rel // block_size)[:, :, None], (rel // block_size)[:, None, :]
    token_causal = (pos[:, None] >= pos[None, :])[None]
    if layout == "causal":
        mask = token_causal & same_doc
    elif layout == "bidirectional":
        mask = same_doc
    else:
        noisy_noisy = q_blk == k_blk
        noisy_clean = k_blk < q_blk
        clean_clean = token_causal if layout == "doubled_causal" else k_blk <= q_blk
        clean_noisy = torch.zeros_like(noisy_noisy)
        top = torch.cat(torch.broadcast_tensors(noisy_noisy, noisy_clean), dim=-1)
        bottom = torch.cat(torch.broadcast_tensors(clean_noisy, clean_clean), dim=-1)
        mask = torch.cat([top, bottom], dim=-2) & same_doc.repeat(1, 2, 2)
    return mask[0] if document_ids is None else mask


def make_mask_mod(
    layout: Layout, seq_len: int, block_size: int, document_ids: Tensor | None = None
) -> MaskMod:
    """A FlexAttention ``mask_mod(b, h, q_idx, kv_idx) -> bool tensor`` for the layout.

    Pure tensor arithmetic (no branching on tensor values), so it works under vmap and with
    broadcast index tensors. ``document_ids`` is captured; ``b`` indexes its rows.
    """
    validate_mask_args(layout, seq_len, block_size, document_ids)
    starts = None if document_ids is None else document_starts(document_ids)
    doubled = is_doubled(layout)
    clean_causal = layout == "doubled_causal"

    def stream_pos(idx: Tensor) -> tuple[Tensor, Tensor]:
        clean = idx >= seq_len if doubled else torch.zeros_like(idx, dtype=torch.bool)
        return clean, torch.where(clean, idx - seq_len, idx)

    def block_of(b: Tensor, pos: Tensor) -> Tensor:
        return (pos if starts is None else pos - starts[b, pos]) // block_size

    def mask_mod(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        q_clean, q_pos = stream_pos(q_idx)
        k_clean, k_pos = stream_pos(kv_idx)
        if layout == "causal":
            allowed = k_pos <= q_pos
        elif layout == "bidirectional":
            allowed = (q_pos >= 0) & (k_pos >= 0)
        else:
            q_blk, k_blk = block_of(b, q_pos), block_of(b, k_pos)
            noisy_noisy = ~q_clean & ~k_clean & (q_blk == k_blk)
            noisy_clean = ~q_clean & k_clean & (k_blk < q_blk)
            clean_rule = (k_pos <= q_pos) if clean_causal else (k_blk <= q_blk)
            allowed = noisy_noisy | noisy_clean | (q_clean & k_clean & clean_rule)
        if document_ids is not None:
            allowed = allowed & (document_ids[b, q_pos] == document_ids[b, k_pos])
        return allowed

    return mask_mod


def _normalize_device(device: torch.device | str | None) -> torch.device:
    device = torch.device("cpu" if device is None else device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


@functools.lru_cache(maxsize=32)
def _cached_block_mask(
    layout: Layout, seq_len: int, block_size: int, device: torch.device, flex_block_size: int
) -> BlockMask:
    size = total_length(layout, seq_len)
    mask_mod = make_mask_mod(layout, seq_len, block_size)
    return create_block_mask(mask_mod, None, None, size, size, device=device, BLOCK_SIZE=flex_block_size)


def build_block_mask(
    layout: Layout,
    seq_len: int,
    block_size: int,
    document_ids: Tensor | None = None,
    device: torch.device | str | None = None,
    flex_block_size: int = 128,
) -> BlockMask:
    """FlexAttention ``BlockMask`` for the layout (cached by shape/layout/device without documents).

    ``device`` defaults to the device of ``document_ids``, else CPU.
    """
    validate_mask_args(layout, seq_len, block_size, document_ids)
    if document_ids is None:
        return _cached_block_mask(layout, seq_len, block_size, _normalize_device(device), flex_block_size)
    device = _normalize_device(document_ids.device if device is None else device)
    document_ids = document_ids.to(device)
    size = total_length(layout, seq_len)
    mask_mod = make_mask_mod(layout, seq_len, block_size, document_ids)
    return create_block_mask(
        mask_mod, document_ids.shape[0], None, size, size, device=device, BLOCK_SIZE=flex_block_size
    )
