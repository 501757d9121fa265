"""The drafter objective: a LoRA trained so that draft passes agree with the verifier (docs/design.md §4.7).

Input: the doubled sequence ``[x_d ; x_0]`` under the ``doubled_causal`` mask, where x_d is a draft stream:
every block is ``[seed, MASK, ..., MASK]``, the seed being the block's first clean token, except that positions
outside the loss mask (a prompt, a chat's user turns) stay clean: at inference they are context the draft reads,
never drafted. A block that straddles the end of a prompt would otherwise draft the answer with the prompt's last
tokens hidden (on the demo that mismatch held the drafter to +2% acceptance; without it, +7.5%: docs/design.md
§4.7). Blocks are counted from each document's start, as in diffusion training, or with ``random_block_start``
(the default) from a random phase per document and step (:func:`block_phases`): at inference a draft block starts
wherever the last cycle stopped, so aligned blocks would train each answer position at one offset from its seed
only (on the demo the phase raised the acceptance gain from +18.0% to +21.0% over three seeds). The adapters act
on the draft stream only, so one forward gives both distributions the loss needs (a drafter model computes it as
the split forward of :mod:`ar2dlm.model.draft_pass`, which takes the blocks from the layout's draft plan: the same
logits wherever the loss reads them, at about two thirds of the cost; the doubled forward's masks know aligned
blocks only):

- the verifier's, p_j: the clean-stream logit at j-1, i.e. the causal AR pass of the frozen model with the
  adapter off (the clean stream never reads the draft stream, and no adapter acts on it); detached;
- the drafter's, q_j: the draft-stream logit at j (unshifted, as diffusion logits are), computed with the
  adapter on, reading a clean causal prefix written without it, as at inference.

Per draft position j (every position but a block's seed, in the loss mask):

    L_j = lambda_j KL(p_j^T || q_j^T) + (1 - lambda_j) TV(p_j^T, q_j^T) + ce_weight CE(q_j, y_j)

p^T, q^T: softmax of logits / T restricted to the union of the top-K tokens of p and of q, renormalised there.
lambda_j = exp(-0.5 sg[alpha_j]), alpha_j = the product over the earlier draft positions k of j's block of
a_k = sum_x min(p_k(x), q_k(x)) (T = 1, full vocabulary): the chance that a speculative verifier accepts every
draft before j. y_j is the data's token x_0[j] (``ce_target="data"``, the published loss) or the verifier's
greedy token argmax p_j (``"verifier"``: what a greedy verifier accepts). The loss is the sum of w_j L_j over the
step's draft positions divided by their number. w_j = 1, or with ``length_weighting`` w_j is proportional to
t_j = the sum over the draft positions m >= j of j's block of alpha_m a_m (detached), the derivative of the block's
expected acceptance length E = sum_m prod_{k <= m} a_k with respect to log a_j, scaled per row so that a row's
weights sum to its number of draft positions: a draft early in a block, whose rejection would cost every draft
after it, weighs more than one that the verifier is unlikely to reach.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ar2dlm.model.masks import document_starts
from ar2dlm.training.loss import LossParts, split_doubled
from ar2dlm.training.noise import block_ids, row_seed, row_uniforms

LAMBDA_SCALE = 0.5  # lambda_j = exp(-LAMBDA_SCALE * alpha_j)
CE_TARGETS = ("data", "verifier")
_PHASE_SALT = 0x70686173655F7631  # "phase_v1": the draft blocks' phases, a stream apart from the noise's


@dataclass(frozen=True)
class DrafterLossConfig:
    temperature: float = 3.0  # softening of p and q in the KL / TV terms
    top_k: int = 200  # tokens of each distribution kept in the KL / TV terms
    ce_weight: float = 1.0  # weight of the CE term (the KL / TV mix has weight 1)
    ce_target: str = "data"  # the CE term's target: the data's token (data) or the verifier's argmax (verifier)
    length_weighting: bool = False  # weight L_j by its share in the expected acceptance length (module docstring)
    random_block_start: bool = True  # each document's draft blocks start at a random phase (module docstring)

    def __post_init__(self) -> None:
        if not (self.temperature > 0 and math.isfinite(self.temperature)):
            raise ValueError(f"temperature must be finite and > 0, got {self.temperature}")
        if self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")
        if not (self.ce_weight >= 0 and math.isfinite(self.ce_weight)):
            raise ValueError(f"ce_weight must be finite and >= 0, got {self.ce_weight}")
        if self.ce_target not in CE_TARGETS:
            raise ValueError(f"ce_target must be one of {CE_TARGETS}, got {self.ce_target!r}")


def block_phases(sample_index: Tensor | Sequence[int], step: int, seed: int, document_ids: Tensor | None,
                 shape: tuple[int, int], block_size: int) -> Tensor:
    """[B, L] long: each document's draft-block phase (:func:`ar2dlm.training.noise.block_layout`), uniform in
    [0, block_size), at every position of the document. A pure function of (seed, global sample index, step) and the
    row's document layout, as the noise is: the same for every parallel layout and on resume."""
    indices = [int(i) for i in torch.as_tensor(sample_index).reshape(-1).tolist()]
    uniforms = row_uniforms([row_seed(seed, i, step, salt=_PHASE_SALT) for i in indices], shape[1])
    starts = torch.zeros(shape, dtype=torch.long) if document_ids is None else document_starts(document_ids.cpu())
    return (uniforms.gather(1, starts) * block_size).long().clamp(max=block_size - 1)


def draft_stream(x0: Tensor, loss_mask: Tensor, in_block: Tensor, mask_token_id: int) -> tuple[Tensor, Tensor]:
    """(draft-stream ids [B, L], scored [B, L] bool) from the in-block positions [B, L] of the draft blocks: each
    block's seed and every position outside the loss mask (a prompt: context at inference, where the draft block
    starts after it) kept, the rest masked; a position is scored when it is not a seed and is in the loss mask."""
    loss_mask = loss_mask.bool()
    seed = in_block.to(x0.device) == 0
    draft_ids = torch.where(seed | ~loss_mask, x0, torch.full_like(x0, mask_token_id))
    return draft_ids, ~seed & loss_mask


def acceptance_prefix(accept: Tensor, scored: Tensor, in_block: Tensor) -> Tensor:
    """alpha [B, L]: the product of ``accept`` over the scored positions of the same block before each position
    (1 at the first draft position of a block)."""
    log_a = torch.where(scored, accept.double().clamp(min=1e-30).log(), torch.zeros((), dtype=torch.float64,
                                                                                      device=accept.device))
    return _sum_before_in_block(log_a, in_block).exp().to(accept.dtype)


def length_weights(accept: Tensor, scored: Tensor, in_block: Tensor) -> Tensor:
    """w [B, L]: at each scored position j, t_j = the sum over the scored positions m >= j of j's block of
    alpha_m a_m (``accept`` = a, alpha as :func:`acceptance_prefix`), scaled per row so that a row's weights sum to
    its number of scored positions; 0 elsewhere."""
    in_block = in_block.to(accept.device)
    reached = torch.where(scored, acceptance_prefix(accept, scored, in_block).double() * accept.double(), 0.0)
    block = block_ids(in_block)
    block_total = torch.zeros_like(reached).scatter_add(1, block, reached).gather(1, block)
    tail = torch.where(scored, block_total - _sum_before_in_block(reached, in_block), 0.0)
    scale = scored.sum(dim=1, keepdim=True) / tail.sum(dim=1, keepdim=True).clamp(min=1e-30)
    return (tail * scale).to(accept.dtype)


def _sum_before_in_block(values: Tensor, in_block: Tensor) -> Tensor:
    """[B, L]: the sum of ``values`` over the earlier positions of each position's block."""
    before = values.cumsum(dim=1) - values
    position = torch.arange(values.shape[1], device=values.device).expand_as(before)
    start = (position - in_block.to(values.device)).clamp(min=0)
    return before - before.gather(1, start)


def position_losses(draft_logits: Tensor, target_logits: Tensor, targets: Tensor, alpha: Tensor,
                    config: DrafterLossConfig) -> tuple[Tensor, Tensor]:
    """(L_j, CE_j) [N] of N draft positions from draft logits q, verifier logits p (both [N, V]), the true tokens
    [N] and the acceptance estimates alpha [N] (detached here)."""
    draft_logits = draft_logits.float()
    target_logits = target_logits.detach().float()
    k = min(config.top_k, draft_logits.shape[-1])
    kept = torch.zeros_like(draft_logits, dtype=torch.bool)
    kept.scatter_(1, target_logits.topk(k, dim=-1).indices, True)
    kept.scatter_(1, draft_logits.detach().topk(k, dim=-1).indices, True)
    t = config.temperature
    log_p = torch.log_softmax(target_logits.div(t).masked_fill(~kept, float("-inf")), dim=-1)
    log_q = torch.log_softmax(draft_logits.div(t).masked_fill(~kept, float("-inf")), dim=-1)
    p, q = log_p.exp(), log_q.exp()
    kl = torch.where(kept, p * (log_p - log_q), 0.0).sum(dim=-1)
    tv = 0.5 * (p - q).abs().sum(dim=-1)
    lam = torch.exp(-LAMBDA_SCALE * alpha.detach().float())
    ce = F.cross_entropy(draft_logits, targets, reduction="none")
    return lam * kl + (1 - lam) * tv + config.ce_weight * ce, ce


def acceptance(draft_logits: Tensor, target_logits: Tensor) -> Tensor:
    """sum_x min(p(x), q(x)) at temperature 1 over the whole vocabulary, detached: [..., V] -> [...]."""
    with torch.no_grad():
        p = torch.softmax(target_logits.float(), dim=-1)
        q = torch.softmax(draft_logits.float(), dim=-1)
        return torch.minimum(p, q).sum(dim=-1)


def full_vocabulary(logits: Tensor) -> Tensor:
    """Vocabulary-parallel logits [..., V / TP] gathered into [..., V] (the backward keeps each rank's slice)."""
    from megatron.core import parallel_state, tensor_parallel

    if not parallel_state.model_parallel_is_initialized() or \
            parallel_state.get_tensor_model_parallel_world_size() == 1:
        return logits
    return tensor_parallel.gather_from_tensor_model_parallel_region(logits)


def drafter_loss_parts(logits: Tensor, x0: Tensor, scored: Tensor, in_block: Tensor,
                       config: DrafterLossConfig) -> LossParts:
    """Loss parts of a drafter micro-batch from the model's logits [B, 2L, V (/ TP)] of ``[x_d ; x_0]``.

    ``dlm_sum`` is the sum of L_j (the loss; weight 1), ``ar_sum`` the sum of the CE term alone (reported as
    the draft CE; weight 0), both over the ``dlm_tokens`` = ``ar_tokens`` scored positions.
    """
    draft, clean = split_doubled(full_vocabulary(logits))
    device = draft.device
    scored, x0, in_block = scored.to(device), x0.to(device), in_block.to(device)
    # position j of the draft stream against the clean stream's prediction at j-1 (position 0 is a seed)
    draft, target, shifted_scored = draft[:, 1:], clean[:, :-1], scored[:, 1:]
    accept = torch.ones(x0.shape, dtype=torch.float32, device=device)
    accept[:, 1:][shifted_scored] = acceptance(draft[shifted_scored], target[shifted_scored])
    alpha = acceptance_prefix(accept, scored, in_block)[:, 1:]
    target = target[shifted_scored]
    ce_targets = x0[:, 1:][shifted_scored] if config.ce_target == "data" else target.argmax(dim=-1)
    losses, ce = position_losses(draft[shifted_scored], target, ce_targets, alpha[shifted_scored], config)
    if config.length_weighting:
        losses = losses * length_weights(accept, scored, in_block)[:, 1:][shifted_scored]
    count = scored.sum()
    return LossParts(losses.sum(), count, ce.sum(), count, dlm_weight=1.0, ar_weight=0.0)
