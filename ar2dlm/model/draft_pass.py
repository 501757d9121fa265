"""The drafter's split forward: the clean stream outside autograd, then only the draft blocks the loss scores.

One forward of the doubled ``[x_d ; x_0]`` sequence with the adapters on x_d only (``noisy_stream`` mode,
:mod:`ar2dlm.model.lora`) gives the drafter loss both distributions it needs (docs/design.md §4.7), but it runs
autograd through the clean stream, whose keys and values the drafts read although no trainable parameter acts
on them, and it computes every block of x_d, about half of which (a prompt's blocks) hold no scored position and
are read by none. A :class:`DrafterTransformerBlock` given a layout with a :class:`DraftPlan` computes the same
logits at every position the loss reads, in two passes through its layers:

1. the clean pass: x_0 under the causal mask, the adapters off, under ``torch.no_grad()``; each layer keeps its
   keys and values;
2. the draft pass: the positions of x_d in the plan (every position of each block holding a scored position,
   padded with other positions to a common width), the adapters on, each layer's attention reading the clean
   pass's keys and values and the plan's draft keys under the ``doubled_causal`` mask's draft rows.

The block returns ``[x_d ; x_0]`` hidden states as the doubled forward does, with zeros at the draft positions
outside the plan: neither scored nor read by a scored position, their output is never used. Activation
recompute re-runs the draft pass only (the clean pass keeps no graph), which is why a drafter model's adapters
stay on and the clean pass turns them off for its own duration.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from megatron.core.transformer.transformer_block import TransformerBlock
from megatron.core.utils import WrappedTensor
from torch import Tensor

from ar2dlm.model.core_attention import AttentionLayout, LayoutTensor, layout_tensor
from ar2dlm.model.draft_plan import DraftPlan, draft_rows_mask
from ar2dlm.model.lora import adapter_mode


@dataclass
class _CleanPass:
    """The clean pass's attention: the core attention's own over the causal layout of x_0, each layer's keys
    (before rotary) and values kept in ``store``."""

    layout: AttentionLayout
    store: dict = field(default_factory=dict)

    def attend(self, module, query: Tensor, key: Tensor, value: Tensor) -> Tensor:
        self.store[module.layer_number] = (key, value)
        return module.forward(query, key, value, self.layout)


@dataclass
class _DraftPass:
    """The draft pass's attention: the plan's draft queries over the clean pass's keys and values and their own."""

    clean: _CleanPass
    plan: DraftPlan
    mask: Tensor  # draft_rows_mask
    cache: dict = field(default_factory=dict)

    def attend(self, module, query: Tensor, key: Tensor, value: Tensor) -> Tensor:
        clean_key, clean_value = self.clean.store[module.layer_number]
        draft_positions = self.plan.index.T  # [P, B]: a position per token and row
        clean_positions = torch.arange(clean_key.shape[0], device=draft_positions.device)
        positions = torch.cat([clean_positions[:, None].expand(-1, draft_positions.shape[1]), draft_positions])
        query = module.apply_rotary(query, draft_positions, self.cache)
        key = module.apply_rotary(torch.cat([clean_key, key]), positions, None)
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, torch.cat([clean_value, value])))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask, scale=module.softmax_scale,
                                             enable_gqa=q.shape[1] != k.shape[1])
        return out.permute(2, 0, 1, 3).reshape(query.shape[0], out.shape[0], -1)


class DrafterTransformerBlock(TransformerBlock):
    """megatron-core's transformer block, with the split forward (module docstring) for layouts with a plan."""

    def forward(self, hidden_states, attention_mask, *args, **kwargs):
        layout = attention_mask.attention_layout if isinstance(attention_mask, LayoutTensor) else attention_mask
        if not isinstance(layout, AttentionLayout) or layout.draft_plan is None:
            return super().forward(hidden_states, attention_mask, *args, **kwargs)
        if isinstance(hidden_states, WrappedTensor):
            hidden_states = hidden_states.unwrap()
        doubled = hidden_states if self.pre_process else self.input_tensor  # a later pipeline stage's input
        if torch.is_grad_enabled() and not doubled.requires_grad:
            # as megatron-bridge's PEFT patch of the block: with every base weight frozen, activation recompute
            # reaches the adapters only through an input that requires grad
            doubled = doubled.detach().requires_grad_(True)
        length = layout.seq_len
        draft, clean = doubled[:length], doubled[length:]
        plan = layout.draft_plan
        clean_pass = _CleanPass(replace(layout, layout="causal", draft_plan=None, cache={}))
        with torch.no_grad(), adapter_mode([self], "off"):
            clean_out = self._pass(clean, clean_pass, args, kwargs)
        rows = plan.index.T.unsqueeze(-1).expand(-1, -1, draft.shape[-1])  # [P, B, hidden]
        draft_pass = _DraftPass(clean_pass, plan, draft_rows_mask(plan, layout.document_ids))
        draft_out = self._pass(draft.gather(0, rows), draft_pass, args, kwargs)
        return torch.cat([torch.zeros_like(draft_out[:1]).expand(length, -1, -1).scatter(0, rows, draft_out),
                          clean_out])

    def _pass(self, hidden_states: Tensor, attention, args, kwargs) -> Tensor:
        """The block's layers over ``hidden_states`` with ``attention`` as every layer's core attention's mask
        (a pipeline stage after the first reads its input from ``input_tensor``: it is swapped for the pass)."""
        stage_input = self.input_tensor
        if not self.pre_process:
            self.input_tensor = hidden_states
        try:
            return super().forward(hidden_states, layout_tensor(attention), *args, **kwargs)
        finally:
            self.input_tensor = stage_input


def use_split_forward(model_chunks: list) -> list:
    """Give every chunk's transformer block the split forward (in place; parameters and checkpoint keys are those
    of megatron-core's block). megatron-bridge's LoRA patches a block's ``forward`` on the instance when only
    adapters train; the split forward does what that patch does, so the patch is dropped."""
    for chunk in model_chunks:
        for module in chunk.modules():
            if isinstance(module, TransformerBlock):
                module.__dict__.pop("forward", None)
                module.__class__ = DrafterTransformerBlock
    return model_chunks
