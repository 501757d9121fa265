"""The block-diffusion core attention: one function, three interchangeable kernels.

Kernels (all compute the same result; the mask rules live in :mod:`ar2dlm.model.masks`):

- ``"flex"``: FlexAttention with a block-sparse ``BlockMask`` (compiled on CUDA, eager on CPU).
  torch has no FlexAttention backward on CPU, so CPU use is forward-only.
- ``"sdpa"``: ``scaled_dot_product_attention`` with the dense boolean mask (CPU training path).
- ``"split"``: doubled layouts only. The clean half is attended on its own (plain causal SDPA for
  ``doubled_causal`` without documents); the noisy half in query chunks of whole blocks (about L/8
  tokens each, at least 256), each against only the clean keys before the chunk's end and the noisy
  keys of its own blocks. The result equals ``"sdpa"`` at a fraction of the 2L x 2L dense work.
- ``"auto"``: ``"flex"`` on CUDA; on CPU ``"split"`` for doubled layouts, else ``"sdpa"`` (eager
  CPU flex materialises the full score matrix and is an order of magnitude slower than SDPA).
"""

from __future__ import annotations

import functools
from typing import Literal, NamedTuple, get_args

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention.flex_attention import flex_attention

from ar2dlm.model.masks import (
    Layout,
    build_block_mask,
    dense_mask,
    is_doubled,
    total_length,
    validate_mask_args,
)

Kernel = Literal["auto", "flex", "sdpa", "split"]
KERNELS: tuple[str, ...] = get_args(Kernel)


def block_diffusion_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    *,
    layout: Layout,
    block_size: int,
    seq_len: int,
    document_ids: Tensor | None = None,
    kernel: Kernel = "auto",
    scale: float | None = None,
    cache: dict | None = None,
) -> Tensor:
    """Masked attention over [batch, heads, S, head_dim] tensors; returns [batch, q_heads, S, v_dim].

    S is ``seq_len`` (single-stream layouts) or ``2 * seq_len`` (doubled ``[x_t ; x_0]``). Key/value
    heads may divide query heads (GQA). ``document_ids`` [batch, seq_len] restricts attention to
    the same packed document. The output has the input dtype.

    ``cache``: a dict owned by one forward pass (the same layout and documents for every layer), where
    the checked arguments and the masks built from ``document_ids`` are kept for the next layers.
    """
    cache = {} if cache is None else cache
    if "checked" not in cache:  # the document check reads the tensor (a device sync): once per forward
        validate_mask_args(layout, seq_len, block_size, document_ids)
        cache["checked"] = True
    _validate_qkv(query, key, value, layout, seq_len, document_ids)
    if document_ids is not None:
        document_ids = document_ids.to(query.device)
    chosen = select_kernel(kernel, layout, query.device, _needs_grad(query, key, value))
    gqa = query.shape[1] != key.shape[1]
    if chosen == "flex":
        block_mask = _memo(cache, ("block_mask", query.device),
                           lambda: build_block_mask(layout, seq_len, block_size, document_ids, device=query.device))
        if query.device.type == "cpu":  # CPU flex refuses inputs that require grad, even under no_grad
            query, key, value = query.detach(), key.detach(), value.detach()
        flex = compiled_flex_attention() if query.device.type == "cuda" else flex_attention
        return flex(query, key, value, block_mask=block_mask, scale=scale, enable_gqa=gqa)
    if chosen == "split":
        return _split_attention(query, key, value, layout, block_size, seq_len, document_ids, scale, gqa, cache)
    mask = _sdpa_mask(layout, seq_len, block_size, document_ids, query.device, cache)
    return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scale, enable_gqa=gqa)


def select_kernel(kernel: str, layout: Layout, device: torch.device, needs_grad: bool) -> str:
    """Resolve ``"auto"`` and check the request is possible; returns ``"flex"``, ``"sdpa"`` or ``"split"``."""
    if kernel not in KERNELS:
        raise ValueError(f"unknown attention kernel {kernel!r}; expected one of {KERNELS}")
    if kernel == "split" and not is_doubled(layout):
        raise ValueError(f"kernel 'split' needs a doubled layout, got layout {layout!r}")
    if kernel == "flex" and device.type == "cpu" and needs_grad:
        raise ValueError(
            "kernel 'flex' has no backward on CPU (torch FlexAttention); use kernel 'sdpa' or 'split', "
            "or run under torch.no_grad()"
        )
    if kernel != "auto":
        return kernel
    if device.type == "cuda":
        return "flex"
    return "split" if is_doubled(layout) else "sdpa"


def _needs_grad(*tensors: Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _validate_qkv(
    query: Tensor, key: Tensor, value: Tensor, layout: Layout, seq_len: int, document_ids: Tensor | None
) -> None:
    tensors = {"query": query, "key": key, "value": value}
    for name, t in tensors.items():
        if not isinstance(t, Tensor) or t.dim() != 4:
            shape = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"{name} must be a 4-D tensor [batch, heads, seq, head_dim], got {shape}")
    if len({t.dtype for t in tensors.values()}) != 1:
        raise ValueError(
            f"query, key and value must share a dtype, got {[str(t.dtype) for t in tensors.values()]}"
        )
    if len({t.device for t in tensors.values()}) != 1:
        raise ValueError(
            f"query, key and value must share a device, got {[str(t.device) for t in tensors.values()]}"
        )
    size = total_length(layout, seq_len)
    for name, t in tensors.items():
        if t.shape[0] != query.shape[0] or t.shape[2] != size:
            raise ValueError(
                f"{name} has shape {tuple(t.shape)}; layout {layout!r} with seq_len={seq_len} needs "
                f"[batch={query.shape[0]}, heads, {size}, head_dim]"
            )
    if key.shape[1] != value.shape[1]:
        raise ValueError(
            f"key and value must have the same number of heads, got {key.shape[1]} and {value.shape[1]}"
        )
    if query.shape[1] % key.shape[1] != 0:
        raise ValueError(
            f"query heads ({query.shape[1]}) must be a multiple of key/value heads ({key.shape[1]}) for GQA"
        )
    if query.shape[3] != key.shape[3]:
        raise ValueError(f"query and key head_dim differ: {query.shape[3]} vs {key.shape[3]}")
    if document_ids is not None and document_ids.shape[0] != query.shape[0]:
        raise ValueError(f"document_ids batch ({document_ids.shape[0]}) != query batch ({query.shape[0]})")


@functools.cache
def compiled_flex_attention():  # returns torch.compile's wrapper
    return torch.compile(flex_attention, dynamic=False)


@functools.lru_cache(maxsize=16)
def _cached_dense(layout: Layout, seq_len: int, block_size: int, device: torch.device) -> Tensor:
    return dense_mask(layout, seq_len, block_size, device=device)


def _memo(cache: dict, key, build):
    if key not in cache:
        cache[key] = build()
    return cache[key]


def _document_mask(layout: Layout, seq_len: int, block_size: int, document_ids: Tensor, device: torch.device,
                   cache: dict) -> Tensor:
    """Dense [batch, 1, S, S] mask for packed documents, built once per forward (kept in ``cache``)."""
    return _memo(cache, ("dense", device),
                 lambda: dense_mask(layout, seq_len, block_size, document_ids, device=device).unsqueeze(1))


def _sdpa_mask(
    layout: Layout, seq_len: int, block_size: int, document_ids: Tensor | None, device: torch.device, cache: dict
) -> Tensor:
    """Dense boolean mask shaped for SDPA: [S, S], or [batch, 1, S, S] with documents."""
    if document_ids is None:
        return _cached_dense(layout, seq_len, block_size, device)
    return _document_mask(layout, seq_len, block_size, document_ids, device, cache)


# The split kernel runs the noisy queries in about _NOISY_CHUNKS chunks of at least _MIN_CHUNK tokens
# (on CPU, smaller chunks cost more in per-call overhead than they save in masked work).
_NOISY_CHUNKS = 8
_MIN_CHUNK = 256


def noisy_chunks(seq_len: int, block_size: int, documents: bool) -> list[tuple[int, int, int, int]]:
    """(q0, q1, k0, k1) per chunk: noisy queries [q0, q1) read clean keys [0, q1) and noisy keys [k0, k1).

    Chunks are runs of whole blocks. A noisy query reads noisy keys of its own block and clean keys
    of earlier blocks (so before itself). With documents, blocks count from each document's start
    and may straddle a chunk edge: the noisy window then widens by block_size - 1 on both sides.
    """
    step = block_size * max(-(-(seq_len // block_size) // _NOISY_CHUNKS), -(-_MIN_CHUNK // block_size))
    pad = block_size - 1 if documents else 0
    return [(q0, min(q0 + step, seq_len), max(q0 - pad, 0), min(q0 + step + pad, seq_len))
            for q0 in range(0, seq_len, step)]


class _SplitPlan(NamedTuple):
    """How the split kernel cuts one doubled layout (built once per layout, or per forward with documents)."""

    clean_mask: Tensor  # the clean rows' mask over clean keys
    chunks: list  # ((q0, q1, k0, k1), mask) per noisy chunk; mask columns follow the chunk's keys
    query_sizes: list[int]  # the noisy chunks' lengths, then seq_len (the clean rows)
    key_index: Tensor  # doubled-sequence positions of every chunk's keys (clean [0, q1), noisy [k0, k1)), back to back
    key_sizes: list[int]


def _split_plan(full: Tensor, seq_len: int, block_size: int, documents: bool) -> _SplitPlan:
    """Cut the doubled mask ([S, S] or [batch, 1, S, S]) into the clean-row mask and one mask per noisy chunk,
    whose columns are picked by the same key index that gathers the chunk's keys."""
    n = seq_len
    bounds = noisy_chunks(n, block_size, documents)
    keys = [torch.cat([torch.arange(n, n + q1), torch.arange(k0, k1)]).to(full.device) for _, q1, k0, k1 in bounds]
    chunks = [(bound, full[..., bound[0]:bound[1], :].index_select(-1, index))
              for bound, index in zip(bounds, keys, strict=True)]
    return _SplitPlan(full[..., n:, n:].contiguous(), chunks, [q1 - q0 for q0, q1, _, _ in bounds] + [n],
                      torch.cat(keys), [len(index) for index in keys])


@functools.lru_cache(maxsize=16)
def _cached_split_plan(layout: Layout, seq_len: int, block_size: int, device: torch.device) -> _SplitPlan:
    return _split_plan(dense_mask(layout, seq_len, block_size, device=device), seq_len, block_size, False)


def _split_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    layout: Layout,
    block_size: int,
    seq_len: int,
    document_ids: Tensor | None,
    scale: float | None,
    gqa: bool,
    cache: dict,
) -> Tensor:
    """Doubled layouts: clean rows (L x L, never see noisy keys) apart, noisy rows chunk by chunk."""
    n = seq_len
    if document_ids is None:
        plan = _cached_split_plan(layout, n, block_size, query.device)
    else:
        full = _document_mask(layout, n, block_size, document_ids, query.device, cache)
        plan = _memo(cache, ("split", query.device), lambda: _split_plan(full, n, block_size, True))
    sdpa = functools.partial(F.scaled_dot_product_attention, scale=scale, enable_gqa=gqa)
    # One split and one gather each (rather than a slice per chunk): their backward passes then
    # build each input gradient in one buffer instead of one zero-filled copy per chunk.
    *noisy_queries, clean_queries = query.split(plan.query_sizes, dim=-2)
    (_, k_clean), (_, v_clean) = key.split(n, dim=-2), value.split(n, dim=-2)
    chunk_keys = key.index_select(-2, plan.key_index).split(plan.key_sizes, dim=-2)
    chunk_values = value.index_select(-2, plan.key_index).split(plan.key_sizes, dim=-2)
    if layout == "doubled_causal" and document_ids is None:
        clean = sdpa(clean_queries, k_clean, v_clean, is_causal=True)
    else:
        clean = sdpa(clean_queries, k_clean, v_clean, attn_mask=plan.clean_mask)
    noisy = [sdpa(q, k, v, attn_mask=mask)
             for q, k, v, (_, mask) in zip(noisy_queries, chunk_keys, chunk_values, plan.chunks, strict=True)]
    return torch.cat([*noisy, clean], dim=-2)
