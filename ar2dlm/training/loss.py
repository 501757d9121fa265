"""Joint AR + diffusion loss from per-token cross entropy (docs/design.md §2.4).

The model computes per-token CE (Megatron's vocab-parallel CE given labels); this module turns
it into sums and token counts that add over micro-batches and data-parallel ranks:

    loss = sum(w_dlm * dlm_sum + w_ar * ar_sum) / sum(num_tokens)            (normalization "shared")
    loss = w_dlm * sum(dlm_sum) / sum(dlm_tokens) + w_ar * sum(ar_sum) / sum(ar_tokens)   ("per_term")
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist
from torch import Tensor

OBJECTIVES = ("ar", "joint", "diffusion", "drafter")  # drafter: training/drafter.py
NORMALIZATIONS = ("shared", "per_term")  # one denominator for both terms (Megatron-Bridge) | a mean per term (NeMo)


@dataclass(frozen=True)
class ObjectiveWeights:
    """Loss weights of one training objective."""

    dlm: float
    ar: float

    @property
    def has_diffusion_term(self) -> bool:
        """Whether the model reads noised input x_t (every objective but "ar"): as ``[x_t ; x_0]``, or x_t alone
        when there is no clean stream."""
        return self.dlm > 0


def objective_weights(objective: str, dlm_weight: float = 0.3, ar_weight: float = 1.0) -> ObjectiveWeights:
    """Map "ar" | "joint" | "diffusion" to (w_dlm, w_ar); the weights of unused terms become 0.

    "drafter" reads ``[x_d ; x_0]`` like a diffusion objective and has one loss (its own, weight 1: the
    ``drafter.*`` settings weigh its parts), so it is (1, 0) whatever the diffusion weights."""
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    if objective == "drafter":
        return ObjectiveWeights(dlm=1.0, ar=0.0)
    for name, w in (("dlm_weight", dlm_weight), ("ar_weight", ar_weight)):
        if not math.isfinite(w) or w < 0:
            raise ValueError(f"{name} must be finite and >= 0, got {w}")
    dlm = 0.0 if objective == "ar" else float(dlm_weight)
    ar = 0.0 if objective == "diffusion" else float(ar_weight)
    if objective != "ar" and dlm == 0:
        raise ValueError(f"objective {objective!r} needs dlm_weight > 0")
    if objective != "diffusion" and ar == 0:
        raise ValueError(f"objective {objective!r} needs ar_weight > 0")
    return ObjectiveWeights(dlm=dlm, ar=ar)


def doubled_labels(input_ids: Tensor, pad_id: int) -> Tensor:
    """Labels [B, 2L] for [x_t ; x_0]: x_0 unshifted (diffusion), then x_0 shifted left (AR).

    The last AR label has no target and is ``pad_id`` (use a valid vocabulary id: vocab-parallel
    CE does not skip -100); ``ar_target_mask`` excludes it.
    """
    pad = input_ids.new_full((input_ids.shape[0], 1), pad_id)
    return torch.cat([input_ids, input_ids[:, 1:], pad], dim=1)


def split_doubled(x: Tensor) -> tuple[Tensor, Tensor]:
    """Split a [B, 2L, ...] tensor (e.g. per-token CE) into its noisy and clean halves."""
    half = x.shape[1] // 2
    if x.shape[1] != 2 * half:
        raise ValueError(f"second dimension must be even, got {x.shape[1]}")
    return x[:, :half], x[:, half:]


def ar_target_mask(loss_mask: Tensor, document_ids: Tensor | None = None) -> Tensor:
    """Bool [B, L]: j is an AR target iff j+1 < L, loss_mask[j+1], and j, j+1 share a document."""
    out = torch.zeros_like(loss_mask, dtype=torch.bool)
    nxt = loss_mask[:, 1:].bool()
    if document_ids is not None:
        nxt = nxt & (document_ids[:, 1:] == document_ids[:, :-1])
    out[:, :-1] = nxt
    return out


@dataclass
class LossParts:
    """Additive pieces of the loss of some tokens (a micro-batch, a rank, a step)."""

    dlm_sum: Tensor  # sum over masked positions of CE / p (unweighted by w_dlm)
    dlm_tokens: Tensor  # number of masked positions
    ar_sum: Tensor  # sum of AR CE over AR targets
    ar_tokens: Tensor  # number of AR targets
    dlm_weight: float = 0.3
    ar_weight: float = 1.0
    normalization: str = "shared"  # see NORMALIZATIONS

    def __post_init__(self) -> None:
        if self.normalization not in NORMALIZATIONS:
            raise ValueError(f"loss normalization must be one of {NORMALIZATIONS}, got {self.normalization!r}")

    @property
    def loss_sum(self) -> Tensor:
        """w_dlm * dlm_sum + w_ar * ar_sum (differentiable)."""
        return self.dlm_weight * self.dlm_sum + self.ar_weight * self.ar_sum

    @property
    def num_tokens(self) -> Tensor:
        """Tokens of the enabled (weight > 0) terms."""
        n = torch.zeros_like(self.dlm_tokens)
        if self.dlm_weight > 0:
            n = n + self.dlm_tokens
        if self.ar_weight > 0:
            n = n + self.ar_tokens
        return n

    @property
    def term_tokens(self) -> Tensor:
        """[dlm_tokens, ar_tokens]: the denominators of the "per_term" normalization."""
        return torch.stack([self.dlm_tokens, self.ar_tokens])

    def loss(self, num_tokens: Tensor | None = None) -> Tensor:
        """The loss of these parts; pass the global (all-reduced) denominator to normalise a local sum: a count
        (``shared``: loss_sum / num_tokens) or the two counts [dlm, ar] (``per_term``: a mean per term)."""
        if self.normalization == "shared":
            n = self.num_tokens if num_tokens is None else num_tokens
            return self.loss_sum / n.clamp(min=1)
        dlm_n, ar_n = (self.term_tokens if num_tokens is None else num_tokens).clamp(min=1).unbind(0)
        return self.dlm_weight * self.dlm_sum / dlm_n + self.ar_weight * self.ar_sum / ar_n

    def scaled(self, denominator: Tensor) -> Tensor:
        """The differentiable share of these (local) parts in the loss of a step whose global denominator is
        ``denominator`` (see :meth:`loss`); summed over every micro-batch and rank it is the step's loss."""
        if self.normalization == "shared":
            return self.loss_sum / denominator.to(self.loss_sum.dtype)
        dlm_n, ar_n = denominator.to(self.dlm_sum.dtype).clamp(min=1).unbind(0)
        return self.dlm_weight * self.dlm_sum / dlm_n + self.ar_weight * self.ar_sum / ar_n

    def step_loss(self, denominator: Tensor) -> float:
        """The loss of (all-reduced) parts under the step's denominator, as a Python float."""
        if self.normalization == "shared":
            return float(self.loss_sum) / float(denominator)
        dlm_n, ar_n = (float(n) for n in denominator.clamp(min=1))
        return self.dlm_weight * float(self.dlm_sum) / dlm_n + self.ar_weight * float(self.ar_sum) / ar_n

    @property
    def dlm_loss(self) -> Tensor:
        """Mean weighted diffusion CE per masked token, for reporting."""
        return self.dlm_sum / self.dlm_tokens.clamp(min=1)

    @property
    def ar_loss(self) -> Tensor:
        """Mean AR CE per target token, for reporting."""
        return self.ar_sum / self.ar_tokens.clamp(min=1)

    def __add__(self, other: LossParts) -> LossParts:
        if not isinstance(other, LossParts):
            return NotImplemented
        if (self.dlm_weight, self.ar_weight, self.normalization) != (
                other.dlm_weight, other.ar_weight, other.normalization):
            raise ValueError("cannot add LossParts with different loss weights or normalizations")
        return replace(
            self,
            dlm_sum=self.dlm_sum + other.dlm_sum,
            dlm_tokens=self.dlm_tokens + other.dlm_tokens,
            ar_sum=self.ar_sum + other.ar_sum,
            ar_tokens=self.ar_tokens + other.ar_tokens,
        )

    def __radd__(self, other: object) -> LossParts:
        if isinstance(other, int) and other == 0:  # lets builtin sum() start from 0
            return self
        return NotImplemented

    def all_reduce(self, group: dist.ProcessGroup | None = None) -> LossParts:
        """Detached copy summed over ``group`` (no autograd); a detached copy if not distributed."""
        fields = (self.dlm_sum, self.dlm_tokens, self.ar_sum, self.ar_tokens)
        buf = torch.stack([t.detach().to(torch.float64) for t in fields])
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=group)
        vals = [v.to(t.dtype) for v, t in zip(buf.unbind(0), fields, strict=True)]
        return replace(self, dlm_sum=vals[0], dlm_tokens=vals[1], ar_sum=vals[2], ar_tokens=vals[3])

    def metrics(self) -> dict[str, float]:
        """Python floats for logging (syncs with the device)."""
        return {
            "loss": self.loss().item(),
            "dlm_loss": self.dlm_loss.item(),
            "ar_loss": self.ar_loss.item(),
            "dlm_tokens": float(self.dlm_tokens.item()),
            "ar_tokens": float(self.ar_tokens.item()),
        }


def _at_least_float32(ce: Tensor) -> Tensor:
    """bf16 / fp16 CE in float32 for the sums; float64 (the evaluation's ELBO) stays float64."""
    return ce.to(torch.promote_types(ce.dtype, torch.float32))


def compute_loss_parts(
    dlm_ce: Tensor | None,
    ar_ce: Tensor | None,
    masked: Tensor | None = None,
    weight: Tensor | None = None,
    ar_mask: Tensor | None = None,
    dlm_weight: float = 0.3,
    ar_weight: float = 1.0,
) -> LossParts:
    """Sums and counts from per-token CE [B, L] of the noisy half (unshifted) and the clean half.

    ``dlm_ce[i]`` is the CE of the noisy-half logit at i against x_0[i]; ``ar_ce[j]`` that of the
    clean-half logit at j against x_0[j+1]. A term with weight > 0 needs its CE.
    """
    ref = dlm_ce if dlm_ce is not None else ar_ce
    if ref is None:
        raise ValueError("need at least one of dlm_ce, ar_ce")
    zero_f = torch.zeros((), dtype=torch.float32, device=ref.device)
    zero_i = torch.zeros((), dtype=torch.long, device=ref.device)
    dlm_sum, dlm_tokens, ar_sum, ar_tokens = zero_f, zero_i, zero_f, zero_i
    if dlm_ce is not None:
        if masked is None or weight is None:
            raise ValueError("dlm_ce needs masked and weight")
        dlm_sum = torch.where(masked, _at_least_float32(dlm_ce) * weight, 0.0).sum()
        dlm_tokens = masked.sum()
    elif dlm_weight > 0:
        raise ValueError("dlm_weight > 0 but no dlm_ce given")
    if ar_ce is not None:
        if ar_mask is None:
            raise ValueError("ar_ce needs ar_mask")
        ar_sum = torch.where(ar_mask, _at_least_float32(ar_ce), 0.0).sum()
        ar_tokens = ar_mask.sum()
    elif ar_weight > 0:
        raise ValueError("ar_weight > 0 but no ar_ce given")
    return LossParts(dlm_sum, dlm_tokens, ar_sum, ar_tokens, dlm_weight=dlm_weight, ar_weight=ar_weight)
