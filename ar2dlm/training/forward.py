"""One micro-batch of the training objective: noise, the (doubled) model input, and the loss terms.

``objective: joint`` feeds ``[x_t ; x_0]`` through one forward pass: the noisy half gives the
unshifted diffusion loss, the clean half the shifted AR loss (docs/design.md §2.1-2.4). ``objective: ar``
is a plain causal pass. ``objective: diffusion`` keeps the doubled sequence (the clean half is the
context the noisy blocks read) but drops the AR term; with ``clean_pattern: none`` there is no clean stream,
only x_t with full attention (the single-stream LLaDA-style baseline). ``objective: drafter`` feeds
``[x_d ; x_0]`` (x_d: ``[seed, MASK ...]`` blocks) to a model whose LoRA acts on x_d only, and trains the
adapter towards the clean stream's distribution (:mod:`ar2dlm.training.drafter`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor

from ar2dlm.model.context_parallel import ContextShard
from ar2dlm.model.core_attention import AttentionLayout, LayoutTensor, layout_tensor
from ar2dlm.model.draft_plan import draft_plan
from ar2dlm.model.masks import doubled_layout
from ar2dlm.training.block_sizes import RandomBlockSizes
from ar2dlm.training.complementary import first_of_pair, paired, repeat_rows
from ar2dlm.training.drafter import DrafterLossConfig, block_phases, draft_stream, drafter_loss_parts
from ar2dlm.training.loss import (
    LossParts,
    ObjectiveWeights,
    ar_target_mask,
    compute_loss_parts,
    doubled_labels,
    split_doubled,
)
from ar2dlm.training.noise import NoiseConfig, NoiseDraw, block_layout, in_block_positions, sample_noise


@dataclass(frozen=True)
class ObjectiveSettings:
    weights: ObjectiveWeights
    noise: NoiseConfig
    clean_pattern: str  # causal | block_causal | none (no clean stream: x_t alone)
    attention_kernel: str
    seed: int
    pad_id: int
    complementary_masking: bool = False  # each draw and its complement, as two rows (training/complementary.py)
    normalization: str = "shared"  # shared | per_term (training/loss.py)
    random_blocks: RandomBlockSizes | None = None  # block size drawn per step (training/block_sizes.py)
    drafter: DrafterLossConfig | None = None  # objective drafter: its loss (training/drafter.py)

    def block_size_at(self, step: int) -> int:
        """The diffusion block size of training step ``step`` (the configured one at step 0, validation's)."""
        if self.random_blocks is None:
            return self.noise.block_size
        return self.random_blocks.at_step(self.seed, step)

    @property
    def layout(self) -> str:
        if not self.weights.has_diffusion_term:
            return "causal"
        if self.clean_pattern == "none":
            return "bidirectional"
        return doubled_layout(self.clean_pattern)


@dataclass
class PreparedBatch:
    """Everything one forward pass needs, computed before the model runs (noise needs no model)."""

    input_ids: Tensor
    labels: Tensor
    layout: AttentionLayout
    noise: NoiseDraw | None
    ar_mask: Tensor | None
    loss_mask: Tensor  # [B, L]: positions that may be masked / are trained on

    @property
    def maskable(self) -> int:
        return int(self.loss_mask.sum())

    @property
    def loss_tokens(self) -> Tensor:
        """Tokens this micro-batch contributes to the loss denominator (enabled terms only)."""
        count = torch.zeros((), dtype=torch.float64)
        if self.noise is not None:
            count += self.noise.masked.sum()
        if self.ar_mask is not None:
            count += self.ar_mask.sum()
        return count

    @property
    def term_tokens(self) -> Tensor:
        """[masked positions, AR targets] of this micro-batch: the denominators of per-term normalization."""
        counts = torch.zeros(2, dtype=torch.float64)
        if self.noise is not None:
            counts[0] = self.noise.masked.sum()
        if self.ar_mask is not None:
            counts[1] = self.ar_mask.sum()
        return counts


def prepare_batch(batch, step: int, settings: ObjectiveSettings) -> PreparedBatch:
    """Noise the micro-batch (seeded by its global sample indices and the step) and lay out the input."""
    x0, loss_mask, documents = batch.input_ids, batch.loss_mask, batch.document_ids
    length = x0.shape[1]
    layout_name = settings.layout
    block_size = settings.block_size_at(step)
    noise_config = settings.noise if block_size == settings.noise.block_size else replace(settings.noise,
                                                                                           block_size=block_size)
    layout = AttentionLayout(layout_name, length, block_size, documents, settings.attention_kernel)
    if settings.drafter is not None:
        return _drafter_batch(batch, step, layout, settings)
    if layout_name == "causal":
        labels = doubled_labels(x0, settings.pad_id)[:, length:]
        return PreparedBatch(x0, labels, layout, None, ar_target_mask(loss_mask, documents), loss_mask)
    noise = sample_noise(x0, batch.sample_index, step, settings.seed, noise_config, loss_mask, documents)
    ar_mask = ar_target_mask(loss_mask, documents) if settings.weights.ar > 0 else None
    if settings.complementary_masking:  # rows B..2B-1: the complements, with no AR targets
        maskable = torch.ones_like(x0, dtype=torch.bool) if loss_mask is None else loss_mask
        noise = paired(noise, x0, maskable, noise_config)
        ar_mask = None if ar_mask is None else first_of_pair(ar_mask)
        x0, loss_mask, documents = repeat_rows(x0), repeat_rows(loss_mask), repeat_rows(documents)
        layout = replace(layout, document_ids=documents)
    if layout_name == "bidirectional":
        return PreparedBatch(noise.noisy_ids, x0, layout, noise, None, loss_mask)
    inputs = torch.cat([noise.noisy_ids, x0], dim=1)
    return PreparedBatch(inputs, doubled_labels(x0, settings.pad_id), layout, noise, ar_mask, loss_mask)


def _drafter_batch(batch, step: int, layout: AttentionLayout, settings: ObjectiveSettings) -> PreparedBatch:
    """objective drafter: ``[x_d ; x_0]`` with x_d the ``[seed, MASK ...]`` blocks; no labels (the model returns
    logits); ``noise.masked`` marks the scored draft positions, the layout's draft plan the blocks
    (training/drafter.py)."""
    x0, documents = batch.input_ids, batch.document_ids
    loss_mask = torch.ones_like(x0, dtype=torch.bool) if batch.loss_mask is None else batch.loss_mask
    shape = tuple(x0.shape)
    phase = None
    if settings.drafter.random_block_start:
        phase = block_phases(batch.sample_index, step, settings.seed, documents, shape, layout.block_size)
    blocks, in_block = block_layout(shape, layout.block_size, documents, phase)
    draft_ids, scored = draft_stream(x0, loss_mask, in_block, settings.noise.mask_token_id)
    weight = scored.float()
    noise = NoiseDraw(draft_ids, scored, weight, torch.ones_like(weight),
                      weight.sum(dim=1) / loss_mask.sum(dim=1).clamp(min=1))
    layout = replace(layout, draft_plan=draft_plan(scored, blocks))
    return PreparedBatch(torch.cat([draft_ids, x0], dim=1), None, layout, noise, None, loss_mask)


def shard_for_context_parallel(prepared: PreparedBatch, group) -> PreparedBatch:
    """This context-parallel rank's tokens of a micro-batch (see :mod:`ar2dlm.model.context_parallel`)."""
    layout = prepared.layout
    shard = ContextShard.of_rank(layout.layout, layout.seq_len, group)
    positions, tokens = shard.positions, shard.token_index
    noise = prepared.noise
    if noise is not None:
        noise = replace(noise, noisy_ids=noise.noisy_ids[:, positions], masked=noise.masked[:, positions],
                        weight=noise.weight[:, positions], rate=noise.rate[:, positions])
    return PreparedBatch(
        input_ids=prepared.input_ids[:, tokens], labels=prepared.labels[:, tokens], layout=replace(layout, shard=shard),
        noise=noise, ar_mask=None if prepared.ar_mask is None else prepared.ar_mask[:, positions],
        loss_mask=prepared.loss_mask[:, positions],
    )


def model_inputs(prepared: PreparedBatch, device: torch.device) -> tuple[Tensor, Tensor, LayoutTensor]:
    """input ids, labels and attention layout (as the model's attention mask) of a micro-batch, on ``device``."""
    layout = prepared.layout
    if layout.document_ids is not None:
        layout = replace(layout, document_ids=layout.document_ids.to(device), cache={})
    if layout.draft_plan is not None:
        layout = replace(layout, draft_plan=layout.draft_plan.to(device), cache={})
    labels = None if prepared.labels is None else prepared.labels.to(device)  # None: the model returns logits
    return prepared.input_ids.to(device), labels, layout_tensor(layout)


def loss_parts(token_ce: Tensor, prepared: PreparedBatch, settings: ObjectiveSettings,
               device: torch.device) -> LossParts:
    """Combine the model's per-token CE [batch, sequence] into the enabled loss terms."""
    parts = _loss_terms(token_ce, prepared, settings, device)
    return parts if settings.normalization == parts.normalization else replace(parts,
                                                                               normalization=settings.normalization)


def _loss_terms(token_ce: Tensor, prepared: PreparedBatch, settings: ObjectiveSettings,
                device: torch.device) -> LossParts:
    if settings.drafter is not None:  # the model's output is logits, not CE
        in_block = in_block_positions(prepared.layout.draft_plan.blocks)
        return drafter_loss_parts(token_ce, prepared.input_ids[:, prepared.layout.seq_len:], prepared.noise.masked,
                                  in_block, settings.drafter)
    weights = settings.weights
    noise = prepared.noise
    layout = prepared.layout.layout
    if layout == "causal":
        return compute_loss_parts(None, token_ce, ar_mask=prepared.ar_mask.to(device), dlm_weight=0.0,
                                  ar_weight=weights.ar)
    if layout == "bidirectional":
        return compute_loss_parts(token_ce, None, noise.masked.to(device), noise.weight.to(device),
                                  dlm_weight=weights.dlm, ar_weight=0.0)
    noisy_ce, clean_ce = split_doubled(token_ce)
    ar_mask = prepared.ar_mask.to(device) if prepared.ar_mask is not None else None
    return compute_loss_parts(noisy_ce, clean_ce if ar_mask is not None else None, noise.masked.to(device),
                              noise.weight.to(device), ar_mask, dlm_weight=weights.dlm, ar_weight=weights.ar)


def forward_loss(model, prepared: PreparedBatch, settings: ObjectiveSettings) -> LossParts:
    """Run the model with labels (per-token CE from megatron, vocab-parallel) and combine the terms."""
    device = next(model.parameters()).device
    input_ids, labels, layout = model_inputs(prepared, device)
    return loss_parts(model(input_ids, None, layout, labels=labels), prepared, settings, device)
