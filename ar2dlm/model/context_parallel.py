"""Context parallelism for the block-diffusion attention: each rank holds a share of the sequence.

Sharding follows megatron-core's load balancing: a stream of L positions is cut into 2 x CP chunks
and rank r keeps chunks r and 2CP-1-r, so causal work is even across ranks. The doubled layouts
shard both streams at the same positions, so a rank's tokens are ``[noisy share ; clean share]``
and its per-token losses still split into halves.

Attention: a rank's queries attend to the keys and values of the whole sequence, all-gathered over
the context-parallel group (the gradient is reduce-scattered back), under the rows of the global
mask that belong to its tokens. Everything outside attention is per token and needs no exchange.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention.flex_attention import create_block_mask

from ar2dlm.model.attention import compiled_flex_attention
from ar2dlm.model.masks import Layout, dense_mask, is_doubled, make_mask_mod


def local_positions(seq_len: int, rank: int, size: int) -> Tensor:
    """Positions 0..L-1 held by ``rank`` of ``size``: chunks ``rank`` and ``2 * size - 1 - rank`` of 2 x size."""
    if seq_len % (2 * size):
        raise ValueError(f"sequence length {seq_len} must be divisible by 2 x context parallel size = {2 * size}")
    chunk = seq_len // (2 * size)
    first, second = rank * chunk, (2 * size - 1 - rank) * chunk
    return torch.cat([torch.arange(first, first + chunk), torch.arange(second, second + chunk)])


def shard_index(layout: Layout, seq_len: int, rank: int, size: int) -> Tensor:
    """Indices into the attention sequence (length L, or 2L when doubled) of the tokens ``rank`` holds."""
    positions = local_positions(seq_len, rank, size)
    return torch.cat([positions, positions + seq_len]) if is_doubled(layout) else positions


@dataclass(frozen=True)
class ContextShard:
    """This rank's share of the attention sequence."""

    positions: Tensor  # [L / CP]: stream positions held (the same in both streams when doubled)
    token_index: Tensor  # [S / CP]: sequence index of each local token
    gathered_index: Tensor  # [S]: sequence index of each row of the all-gathered keys (rank-major)
    group: object  # the context-parallel process group

    @classmethod
    def of_rank(cls, layout: Layout, seq_len: int, group) -> ContextShard:
        rank, size = dist.get_rank(group), dist.get_world_size(group)
        gathered = torch.cat([shard_index(layout, seq_len, r, size) for r in range(size)])
        return cls(local_positions(seq_len, rank, size), shard_index(layout, seq_len, rank, size), gathered, group)


class _GatherSequence(torch.autograd.Function):
    """All-gather along dim 0; the backward sums the gradients of all ranks and keeps this rank's rows."""

    @staticmethod
    def forward(ctx, tensor: Tensor, group) -> Tensor:
        ctx.group = group
        parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, tensor.contiguous(), group=group)
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: Tensor):
        size, rank = dist.get_world_size(ctx.group), dist.get_rank(ctx.group)
        grad = grad.contiguous()
        if dist.get_backend(ctx.group) == dist.Backend.NCCL:
            local = torch.empty_like(grad.chunk(size, dim=0)[rank])
            dist.reduce_scatter_tensor(local, grad, group=ctx.group)
            return local, None
        dist.all_reduce(grad, group=ctx.group)  # gloo has no reduce-scatter
        return grad.chunk(size, dim=0)[rank].contiguous(), None


def gather_sequence(tensor: Tensor, group) -> Tensor:
    """[s_local, ...] on every rank -> [s_local x CP, ...] in rank order (differentiable)."""
    return _GatherSequence.apply(tensor, group)


def _memo(cache: dict, key, build):
    if key not in cache:
        cache[key] = build()
    return cache[key]


def sharded_attention(query: Tensor, key: Tensor, value: Tensor, *, layout: Layout, seq_len: int, block_size: int,
                      shard: ContextShard, document_ids: Tensor | None, kernel: str, scale: float | None,
                      cache: dict) -> Tensor:
    """Local queries [b, heads, S/CP, d] against gathered keys/values [b, groups, S, d] in gather order.

    FlexAttention on CUDA (the layout's mask_mod with indices translated to the sequence), else SDPA
    with the matching rows and columns of the dense mask.
    """
    gqa = query.shape[1] != key.shape[1]
    device = query.device
    rows, cols = shard.token_index.to(device), shard.gathered_index.to(device)
    if kernel in ("auto", "flex") and device.type == "cuda":
        def build_block_mask():
            base = make_mask_mod(layout, seq_len, block_size, document_ids)
            mask_mod = lambda b, h, q, kv: base(b, h, rows[q], cols[kv])  # noqa: E731
            batch = None if document_ids is None else document_ids.shape[0]
            return create_block_mask(mask_mod, batch, None, rows.numel(), cols.numel(), device=device)

        block_mask = _memo(cache, ("cp_block_mask", device), build_block_mask)
        return compiled_flex_attention()(query, key, value, block_mask=block_mask, scale=scale, enable_gqa=gqa)

    def build_dense():
        full = dense_mask(layout, seq_len, block_size, document_ids, device=device)
        return full[..., rows, :][..., cols] if document_ids is None else full[:, rows][:, :, cols].unsqueeze(1)

    mask = _memo(cache, ("cp_dense", device), build_dense)
    return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scale, enable_gqa=gqa)
