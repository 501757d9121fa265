"""The diffusion negative ELBO of held-out texts, computed with an exported HF model.

This is the training objective's diffusion term (docs/design.md §2.3-2.4) evaluated in one forward per noise
draw: the doubled sequence ``[x_t ; x_0]``, both halves with position ids 0..L-1, under the training mask
(:func:`ar2dlm.model.masks.dense_mask`, layout ``doubled_causal``, docs/design.md §2.2) passed to the HF model
as a 4D additive float mask. Each text is one document starting at position 0 (blocks counted from its
start) and its right padding another, so no text token ever attends to padding.

Noise: the ``uniform`` schedule (one t ~ U(0,1) per text and draw, p = (1 - eps) t + eps, each token
masked with probability p), drawn by :func:`ar2dlm.training.noise.sample_noise` with sample index =
the text's index and step = the draw's index, so it depends only on (seed, text, draw): never on the
batch size. Reported, over all texts and draws:

- ``loss``: the training estimator, sum over masked tokens of CE / p divided by the number of masked
  tokens (what training logs as the diffusion loss);
- ``nelbo_per_token``: the same sum divided by the number of tokens: an unbiased estimate of the
  negative ELBO per token, an upper bound on the NLL per token (nats), so ``perplexity_bound`` =
  exp(nelbo_per_token) >= the perplexity that the diffusion mode assigns.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ar2dlm.errors import UserError
from ar2dlm.model.masks import dense_mask
from ar2dlm.runtime.decoding_ar2dlm import model_attention_mask
from ar2dlm.training.loss import compute_loss_parts
from ar2dlm.training.noise import NoiseConfig, sample_noise

EPS = 1e-3


def doubled_hidden(model, noisy: torch.Tensor, clean: torch.Tensor, valid: torch.Tensor, block_size: int
                   ) -> torch.Tensor:
    """Final hidden states [B, 2L, H] of ``[noisy ; clean]`` (both [B, L], right-padded: ``valid`` marks the
    real tokens) under the training mask, the padding of each row a document of its own."""
    batch, length = clean.shape
    positions = torch.arange(length, device=clean.device).repeat(2)[None].expand(batch, -1)
    allowed = dense_mask("doubled_causal", length, block_size, document_ids=(~valid.bool()).long())
    mask = model_attention_mask(model, allowed, positions, model.dtype)
    output = model.get_decoder()(input_ids=torch.cat([noisy, clean], dim=1), attention_mask=mask,
                                 position_ids=positions, use_cache=False)
    return output.last_hidden_state


def _block_padded(length: int, block_size: int) -> int:
    return -(-length // block_size) * block_size


def noise_rows(rows: Sequence[Sequence[int]], indices: Sequence[int], draw: int, seed: int,
               config: NoiseConfig) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """Per text: (noisy ids, masked, 1/p weight) at the text's own block-padded length, so the draw
    never depends on what the text is batched with."""
    noisy, masked, weight = [], [], []
    for row, index in zip(rows, indices, strict=True):
        width = _block_padded(len(row), config.block_size)
        ids = torch.tensor([list(row) + [0] * (width - len(row))])
        loss_mask = torch.arange(width)[None] < len(row)
        draw_ = sample_noise(ids, [index], step=draw, seed=seed, config=config, loss_mask=loss_mask)
        noisy.append(draw_.noisy_ids[0, :len(row)])
        masked.append(draw_.masked[0, :len(row)])
        weight.append(draw_.weight[0, :len(row)])
    return noisy, masked, weight


def _stack(parts: Sequence[torch.Tensor], width: int, fill, device) -> torch.Tensor:
    return torch.stack([F.pad(p, (0, width - len(p)), value=fill) for p in parts]).to(device)


@torch.no_grad()
def elbo_batch(model, rows: Sequence[Sequence[int]], indices: Sequence[int], draw: int, seed: int,
               config: NoiseConfig) -> tuple[float, int, int]:
    """(sum over masked tokens of CE / p, masked tokens, tokens) of one batch and one noise draw."""
    device = model.device
    width = _block_padded(max(len(row) for row in rows), config.block_size)
    noisy, masked, weight = noise_rows(rows, indices, draw, seed, config)
    clean = _stack([torch.tensor(list(row)) for row in rows], width, 0, device)
    valid = _stack([torch.ones(len(row), dtype=torch.bool) for row in rows], width, False, device)
    noisy_ids = _stack(noisy, width, 0, device)
    masked_t = _stack(masked, width, False, device)
    weight_t = _stack(weight, width, 0.0, device).double()
    hidden = doubled_hidden(model, noisy_ids, clean, valid, config.block_size)[:, :width]
    logits = model.get_output_embeddings()(hidden[masked_t]).float()
    ce = F.cross_entropy(logits, clean[masked_t], reduction="none").double()
    parts = compute_loss_parts(ce, None, torch.ones_like(ce, dtype=torch.bool), weight_t[masked_t], dlm_weight=1.0,
                               ar_weight=0.0)  # the masked positions only, each with its 1/p
    return float(parts.dlm_sum), int(parts.dlm_tokens), sum(len(row) for row in rows)


def diffusion_elbo(model, token_lists: Sequence[Sequence[int]], *, draws: int = 4, seed: int = 1234,
                   batch_size: int = 8, block_size: int | None = None, eps: float = EPS) -> dict:
    """The diffusion loss and negative ELBO of the texts over ``draws`` seeded noise draws."""
    mask_id = getattr(model.config, "mask_token_id", None)
    if mask_id is None:
        raise UserError("config.mask_token_id is not set: this checkpoint was not exported by ar2dlm")
    vocab = model.get_input_embeddings().num_embeddings
    if not 0 <= int(mask_id) < vocab:
        raise UserError(f"config.mask_token_id={mask_id} is outside the model's vocabulary of {vocab}")
    block_size = block_size or getattr(model.config, "block_size", None)
    if not block_size or block_size < 1:
        raise UserError("no diffusion block size: set config.block_size or pass block_size")
    if draws < 1 or batch_size < 1:
        raise UserError(f"need draws >= 1 and batch_size >= 1, got {draws} and {batch_size}")
    rows = [list(row) for row in token_lists if row]
    if not rows:
        raise UserError("the diffusion ELBO needs at least one non-empty text")
    config = NoiseConfig(mask_token_id=int(mask_id), schedule="uniform", block_size=int(block_size), eps=eps)
    weighted, masked, tokens = 0.0, 0, 0
    for draw in range(draws):
        for start in range(0, len(rows), batch_size):
            chunk = rows[start:start + batch_size]
            parts = elbo_batch(model, chunk, range(start, start + len(chunk)), draw, seed, config)
            weighted, masked, tokens = weighted + parts[0], masked + parts[1], tokens + parts[2]
    nelbo = weighted / tokens
    return {"loss": weighted / masked if masked else float("nan"), "nelbo_per_token": nelbo,
            "perplexity_bound": math.exp(min(nelbo, 700.0)), "draws": draws, "block_size": int(block_size),
            "schedule": "uniform", "eps": eps, "seed": seed, "texts": len(rows), "tokens": tokens,
            "masked_tokens": masked}
