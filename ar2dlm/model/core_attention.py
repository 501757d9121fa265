"""The block-diffusion core attention that replaces megatron-core's in every transformer layer.

Megatron's self-attention projects q/k/v (and applies q/k norms), then calls ``core_attention``.
Rotary embeddings are applied *here* rather than by the GPT model, because both halves of the
doubled training sequence ``[x_t ; x_0]`` reuse positions 0..L-1. The GPT model is therefore
built with ``position_embedding_type="none"`` (see :mod:`ar2dlm.model.gpt`), and the rotary
settings (base, scaling) come from the model config that megatron-bridge fills from the HF config.

What a forward attends to is described by an :class:`AttentionLayout`, passed through the GPT
model as its ``attention_mask`` argument (as itself, or wrapped by :func:`layout_tensor` where
megatron-core needs a tensor). A plain boolean tensor in Megatron's convention (True =
masked out) is accepted too, and so is an object with an ``attend(module, query, key, value)``
method, which then computes the attention itself (the drafter's split forward,
:mod:`ar2dlm.model.draft_pass`). ``None`` is refused: megatron-core silently applies no mask at
all in that case for arbitrary mask types.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from megatron.core.transformer.module import MegatronModule
from torch import Tensor

from ar2dlm.model.attention import Kernel, block_diffusion_attention
from ar2dlm.model.context_parallel import ContextShard, gather_sequence, sharded_attention
from ar2dlm.model.draft_plan import DraftPlan
from ar2dlm.model.masks import Layout, is_doubled, total_length


@dataclass(frozen=True)
class AttentionLayout:
    """The attention pattern of one forward pass (see :mod:`ar2dlm.model.masks` for the layouts).

    Every layer of the forward receives the same object, so what is computed once (rotary cos/sin,
    masks of packed documents) is kept in ``cache`` and shared by all layers.
    """

    layout: Layout
    seq_len: int
    block_size: int = 1
    document_ids: Tensor | None = None
    kernel: Kernel = "auto"
    shard: ContextShard | None = None  # this rank's tokens under context parallelism
    draft_plan: DraftPlan | None = None  # objective drafter: the split forward's plan (model/draft_pass.py)
    cache: dict = field(default_factory=dict, compare=False, repr=False)

    def positions(self, device: torch.device) -> Tensor:
        """Rotary positions of this rank's tokens: 0..L-1, twice for the doubled layouts (all of them without
        context parallelism)."""
        single = torch.arange(self.seq_len, device=device)
        positions = single.repeat(2) if is_doubled(self.layout) else single
        return positions if self.shard is None else positions[self.shard.token_index.to(device)]

    @property
    def total_length(self) -> int:
        return total_length(self.layout, self.seq_len)

    @property
    def local_length(self) -> int:
        """Tokens of the sequence this rank holds."""
        return self.total_length if self.shard is None else self.shard.token_index.numel()


class LayoutTensor(torch.Tensor):
    """An empty tensor carrying an :class:`AttentionLayout` (or an object with ``attend``) through megatron-core
    code that only passes tensors (activation recompute keeps the layer inputs, the attention mask among them, with
    ``save_for_backward``)."""

    __torch_function__ = torch._C._disabled_torch_function_impl
    attention_layout: AttentionLayout  # or an object with ``attend`` (module docstring)

    def detach(self) -> LayoutTensor:  # recompute detaches the saved inputs before re-running the layers
        return layout_tensor(self.attention_layout)


def layout_tensor(layout) -> LayoutTensor:
    carrier = torch.Tensor._make_subclass(LayoutTensor, torch.empty(0, dtype=torch.bool))
    carrier.attention_layout = layout
    return carrier


class BlockDiffusionCoreAttention(MegatronModule):
    """Drop-in ``core_attention`` for megatron-core layer specs (local and Transformer Engine)."""

    def __init__(self, config, layer_number: int, attn_mask_type=None, attention_type: str = "self",
                 cp_comm_type: str | None = None, softmax_scale: float | None = None, pg_collection=None,
                 **kwargs):
        super().__init__(config=config)
        self.layer_number = layer_number
        self.softmax_scale = softmax_scale
        self.rotary = RotaryEmbedding(
            kv_channels=config.kv_channels,
            rotary_percent=getattr(config, "rotary_percent", 1.0),
            rotary_interleaved=config.rotary_interleaved,
            seq_len_interpolation_factor=getattr(config, "seq_len_interpolation_factor", None),
            rotary_base=getattr(config, "rotary_base", 10000),
            rope_scaling=getattr(config, "rope_scaling", False),
            rope_scaling_factor=getattr(config, "rope_scaling_factor", 8.0),
            use_cpu_initialization=True,
        )
        inv_freq = getattr(config, "rotary_inv_freq", None)  # exact HF table for scaled RoPE variants
        if inv_freq is not None:
            self.rotary.inv_freq = torch.tensor(inv_freq, dtype=torch.float32)

    def _frequencies(self, positions: Tensor) -> Tensor:
        """[S, 1, 1, rotary_dim] for positions [S], or [S, B, 1, rotary_dim] for positions per row [S, B]."""
        freqs = self.rotary.get_emb(int(positions.max()) + 1).to(positions.device)[positions]
        return freqs if positions.dim() == 1 else freqs.flatten(2, 3)

    def _rotary_tables(self, positions: Tensor, dtype: torch.dtype, cache: dict | None) -> tuple[Tensor, Tensor]:
        """cos/sin of :meth:`_frequencies`, computed once per forward when ``cache`` is given."""
        key = ("rotary", dtype, positions.device)
        if cache is not None and key in cache:
            return cache[key]
        freqs = self._frequencies(positions)
        tables = (torch.cos(freqs).to(dtype), torch.sin(freqs).to(dtype))
        if cache is not None:
            cache[key] = tables
        return tables

    def apply_rotary(self, tensor: Tensor, positions: Tensor, cache: dict | None) -> Tensor:
        """``tensor`` [S, B, heads, d] rotated to ``positions`` ([S], or [S, B] per row)."""
        if self.config.rotary_interleaved or self.config.apply_rope_fusion:
            return apply_rotary_pos_emb(tensor, self._frequencies(positions.to(tensor.device)), config=self.config)
        cos, sin = self._rotary_tables(positions, tensor.dtype, cache)
        rotary_dim = cos.shape[-1]
        rotated, passed = tensor[..., :rotary_dim], tensor[..., rotary_dim:]
        first, second = rotated.chunk(2, dim=-1)
        out = rotated * cos + torch.cat((-second, first), dim=-1) * sin  # as megatron-core and transformers
        return out if passed.shape[-1] == 0 else torch.cat((out, passed), dim=-1)

    def forward(self, query: Tensor, key: Tensor, value: Tensor, attention_mask, attn_mask_type=None,
                attention_bias=None, packed_seq_params=None) -> Tensor:
        """q [sq, b, heads, d], k/v [sk, b, groups, d] -> [sq, b, heads * d]."""
        if attention_bias is not None or packed_seq_params is not None:
            raise NotImplementedError("attention bias and THD packed sequences are not supported")
        if attention_mask is None:
            raise ValueError("block-diffusion attention needs an AttentionLayout or an explicit boolean mask")
        if isinstance(attention_mask, LayoutTensor):
            attention_mask = attention_mask.attention_layout
        if callable(getattr(attention_mask, "attend", None)):
            return attention_mask.attend(self, query, key, value)
        seq = query.shape[0]
        if isinstance(attention_mask, AttentionLayout):
            if attention_mask.local_length != seq:
                raise ValueError(f"layout expects {attention_mask.local_length} tokens, got {seq}")
            positions = attention_mask.positions(query.device)
        else:
            positions = torch.arange(seq, device=query.device)
        cache = attention_mask.cache if isinstance(attention_mask, AttentionLayout) else None
        query = self.apply_rotary(query, positions, cache)
        key = self.apply_rotary(key, positions, cache)
        shard = attention_mask.shard if isinstance(attention_mask, AttentionLayout) else None
        if shard is not None:
            key, value = gather_sequence(key, shard.group), gather_sequence(value, shard.group)
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, heads, s, d]
        if shard is not None:
            out = sharded_attention(
                q, k, v, layout=attention_mask.layout, seq_len=attention_mask.seq_len,
                block_size=attention_mask.block_size, shard=shard, document_ids=attention_mask.document_ids,
                kernel=attention_mask.kernel, scale=self.softmax_scale, cache=attention_mask.cache,
            )
        elif isinstance(attention_mask, AttentionLayout):
            out = block_diffusion_attention(
                q, k, v, layout=attention_mask.layout, block_size=attention_mask.block_size,
                seq_len=attention_mask.seq_len, document_ids=attention_mask.document_ids,
                kernel=attention_mask.kernel, scale=self.softmax_scale, cache=attention_mask.cache,
            )
        else:
            allowed = ~attention_mask.to(torch.bool)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=self.softmax_scale,
                                                 enable_gqa=q.shape[1] != k.shape[1])
        return out.permute(2, 0, 1, 3).reshape(seq, out.shape[0], -1)
