"""AR likelihoods through the model's plain (causal) forward: perplexity and continuation log-probs.

Texts are encoded as the training data is (the tokenizer's special tokens, e.g. a BOS, then EOS at the
end), right-padded into batches with an ``attention_mask``. Every token but the first is scored given
the tokens before it. Sums are kept in float64, so results do not depend on the batch size (up to the
float rounding of the forward itself).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ar2dlm.errors import UserError


def encode_texts(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each text as training sees a document: special tokens, then EOS."""
    eos = tokenizer.eos_token_id
    encoded = tokenizer(list(texts), add_special_tokens=True)["input_ids"]
    out = []
    for ids in encoded:
        if eos is not None and (not ids or ids[-1] != eos):
            ids = ids + [eos]
        out.append(list(ids))
    return out


def right_pad(rows: Sequence[Sequence[int]], pad_id: int, device, width: int | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """``input_ids`` and a bool ``valid`` mask [B, width] with padding last."""
    width = width or max(len(row) for row in rows)
    ids = torch.tensor([list(row) + [pad_id] * (width - len(row)) for row in rows], device=device)
    valid = torch.tensor([[True] * len(row) + [False] * (width - len(row)) for row in rows], device=device)
    return ids, valid


def _pad_id(model) -> int:
    pad = model.config.pad_token_id
    return int(pad) if pad is not None else 0


@torch.no_grad()
def next_token_logprobs(model, rows: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(x[j+1] | x[:j+1]) [B, W-1] (float32) and which of them are real targets."""
    ids, valid = right_pad(rows, _pad_id(model), model.device)
    logits = model(input_ids=ids, attention_mask=valid.long()).logits[:, :-1].float()
    logprobs = torch.log_softmax(logits, dim=-1).gather(-1, ids[:, 1:, None])[..., 0]
    return logprobs, valid[:, 1:]


def perplexity(model, token_lists: Sequence[Sequence[int]], batch_size: int = 8) -> dict:
    """exp(mean token cross entropy) of the texts under the AR forward: ``nll`` (mean nats per scored
    token), ``tokens`` (scored tokens: all but each text's first) and ``perplexity``."""
    if batch_size < 1:
        raise UserError(f"batch_size={batch_size} must be >= 1")
    rows = [row for row in token_lists if len(row) >= 2]
    if not rows:
        raise UserError("perplexity needs at least one text of two or more tokens")
    total, count = 0.0, 0
    for start in range(0, len(rows), batch_size):
        logprobs, targets = next_token_logprobs(model, rows[start:start + batch_size])
        total -= logprobs.double()[targets].sum().item()
        count += int(targets.sum())
    nll = total / count
    return {"nll": nll, "tokens": count, "texts": len(rows), "perplexity": math.exp(nll)}


@torch.no_grad()
def continuation_logprobs(model, pairs: Sequence[tuple[Sequence[int], Sequence[int]]], batch_size: int = 8
                          ) -> list[tuple[float, bool]]:
    """For each (context ids, continuation ids): the log-probability of the continuation given the
    context under the AR forward, and whether greedy decoding would produce exactly the continuation."""
    results = []
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start:start + batch_size]
        for context, continuation in chunk:
            if not context or not continuation:
                raise UserError("loglikelihood needs a non-empty context and continuation (in tokens)")
        rows = [list(context) + list(continuation) for context, continuation in chunk]
        ids, valid = right_pad(rows, _pad_id(model), model.device)
        logits = model(input_ids=ids, attention_mask=valid.long()).logits
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        for row, (context, continuation) in enumerate(chunk):
            first, last = len(context) - 1, len(context) + len(continuation) - 1
            scores = logprobs[row, first:last]
            target = torch.tensor(list(continuation), device=scores.device)
            logprob = scores.gather(-1, target[:, None])[:, 0].double().sum().item()
            results.append((logprob, bool((scores.argmax(-1) == target).all())))
    return results


def prefix_token_id(tokenizer) -> int:
    """The token that stands for an empty context: BOS, else EOS."""
    value = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if value is None:
        raise UserError("the tokenizer has neither a BOS nor an EOS token to stand for an empty context")
    return int(value)


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids of (context, continuation) such that together they are the encoding of the whole text;
    trailing spaces of the context move to the continuation (lm-evaluation-harness' convention). An empty
    context becomes the prefix token."""
    if not context:
        return [prefix_token_id(tokenizer)], tokenizer(continuation, add_special_tokens=False)["input_ids"]
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer(context + continuation, add_special_tokens=True)["input_ids"]
    context_ids = tokenizer(context, add_special_tokens=True)["input_ids"]
    return context_ids, whole[len(context_ids):]
