"""A few steps of a joint AR + diffusion loss run directly on an exported HF model, to make tiny test models
behave like trained ones.

Not a training stage (that is ``ar2dlm train`` on Megatron): a way to turn a tiny random export into one
that behaves like a trained model, stopping at EOS, committing several tokens per diffusion pass and
getting drafts accepted, so that evaluation tests and benchmarks exercise every path. It uses the training
mask and noise through the ELBO's doubled forward (:func:`ar2dlm.eval.elbo.doubled_hidden`), but normalises
each loss term by its own token count (NeMo Automodel's form), not by the shared count of the training loss
(docs/design.md §2.4).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ar2dlm.eval.elbo import doubled_hidden
from ar2dlm.eval.likelihood import encode_texts, right_pad
from ar2dlm.training.noise import NoiseConfig, sample_noise


def per_term_joint_loss(model, ids: torch.Tensor, valid: torch.Tensor, sample_index: list[int], step: int,
                        noise: NoiseConfig, dlm_weight: float = 0.3) -> torch.Tensor:
    """dlm_weight * (sum of CE / p over masked tokens) / masked + mean AR CE, for right-padded ``ids``: each term
    divided by its own count, unlike :class:`ar2dlm.training.loss.LossParts`, which divides by their sum."""
    length = ids.shape[1]
    draw = sample_noise(ids, sample_index, step, 0, noise, loss_mask=valid)
    hidden = doubled_hidden(model, draw.noisy_ids, ids, valid, noise.block_size)
    logits = model.get_output_embeddings()(hidden).float()
    dlm = (F.cross_entropy(logits[:, :length].transpose(1, 2), ids, reduction="none") * draw.weight).sum()
    targets = valid[:, 1:]
    ar = F.cross_entropy(logits[:, length:-1][targets], ids[:, 1:][targets])
    return dlm_weight * dlm / draw.masked.sum().clamp(min=1) + ar


def train_toy(model, tokenizer, texts: Sequence[str], steps: int, *, batch_size: int = 16, length: int = 32,
              lr: float = 1e-2, seed: int = 0) -> list[float]:
    """``steps`` AdamW steps of :func:`per_term_joint_loss` on random batches of ``texts`` (cut to ``length``
    tokens, a multiple of the model's block size); returns the losses. Leaves the model in eval mode."""
    noise = NoiseConfig(mask_token_id=int(model.config.mask_token_id), block_size=int(model.config.block_size))
    if length % noise.block_size:
        raise ValueError(f"length {length} is not a multiple of the block size {noise.block_size}")
    rows = [row[:length] for row in encode_texts(tokenizer, texts)]
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    losses = []
    model.train()
    for step in range(steps):
        index = torch.randint(0, len(rows), (batch_size,), generator=generator).tolist()
        ids, valid = right_pad([rows[i] for i in index], 0, model.device, width=length)
        loss = per_term_joint_loss(model, ids, valid, index, step, noise)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    model.eval()
    return losses
