"""ar2dlm self-speculation: linear (a draft pass and a verify pass per cycle) and quadratic (one shared
forward per cycle), both lossless (torch + transformers only).

A cycle verifies the draft ``[seed, d_1 .. d_k]`` causally: ``ar[i]`` is the verifier's token after
``d_i`` (after the seed for i = 0). Row b accepts the ``m_b`` leading drafts with ``ar[i] == d_{i+1}`` and
emits ``ar[0 .. m_b]``; ``ar[m_b]`` is the next seed. Every emitted token is the verifier's own choice given
the tokens before it, so the output is AR's (exactly AR's greedy tokens at temperature 0, AR's distribution
when sampling). Rejected draft positions stay in the cache as holes (see :class:`KVState`).
"""

from __future__ import annotations

from functools import lru_cache

import torch

from .decoding_ar2dlm import (
    DecodeSettings,
    DecodeStats,
    KVState,
    Output,
    choose_tokens,
    drop_finished,
    head_logits,
    prefill,
)


class AcceptanceCounter:
    """How often the draft token at each offset (1 .. k) was verified and accepted, over open rows (host
    integers: a few per row and cycle, cheaper than tensor ops at decoding batch sizes)."""

    def __init__(self, max_drafts: int):
        self.drafted = [0] * max_drafts
        self.accepted = [0] * max_drafts

    def count(self, matched: list[int], drafts: int, was_open: list[bool]) -> None:
        rows = [m for m, is_open in zip(matched, was_open, strict=True) if is_open]
        for offset in range(drafts):
            self.drafted[offset] += len(rows)
            self.accepted[offset] += sum(m > offset for m in rows)

    def finish(self, stats: DecodeStats) -> None:
        stats.drafted_by_offset, stats.accepted_by_offset = tuple(self.drafted), tuple(self.accepted)


def verifier_tokens(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """The verifier's tokens: the argmax at temperature 0 (its confidence is not needed), else sampled."""
    return logits.argmax(-1) if temperature == 0 else choose_tokens(logits, temperature)[0]


def leading_matches(verified: torch.Tensor, draft: torch.Tensor) -> torch.Tensor:
    """[B]: the number of leading drafts ``draft[:, 1:]`` that equal the verifier's ``verified[:, :-1]``."""
    return (verified[:, :-1] == draft[:, 1:]).long().cumprod(1).sum(1)


def _accept(state: KVState, out: Output, counter: AcceptanceCounter, verified: torch.Tensor,
            draft: torch.Tensor) -> torch.Tensor:
    """Emit each row's accepted tokens, turn its rejected draft slots into holes; return the matches [B]."""
    matches = leading_matches(verified, draft)
    matched = matches.tolist()
    was_open = [not out.done[row] for row in out.rows]
    out.emit_batch(verified, [m + 1 for m in matched])
    counter.count(matched, draft.shape[1] - 1, was_open)
    state.reject_tail(matches + 1, draft.shape[1], most_kept=max(matched) + 1)
    return matches


def linear_spec_decode(model, input_ids, attention_mask, settings: DecodeSettings, drafter=None
                       ) -> tuple[torch.Tensor, DecodeStats]:
    """Linear self-speculation: a bidirectional draft pass over ``[seed, MASK ...]``, then a causal verify pass.

    NFE = 1 (prefill) + per cycle: a draft pass (skipped when the draft has no mask, i.e. length 1) and a
    verify pass. ``drafter``: a DraftAdapter that the draft pass's tokens see."""
    batch = input_ids.shape[0]
    state = KVState(model, batch, settings.use_prefix_cache, drafter)
    out = Output(batch, settings, input_ids.device)
    stats = DecodeStats("self_spec", nfe=1)
    counter = AcceptanceCounter(settings.block_length - 1)
    seed, _ = choose_tokens(prefill(state, input_ids, attention_mask), settings.temperature)
    out.emit_batch(seed[:, None])
    while not out.all_done:
        (seed,) = drop_finished(state, out, seed)
        batch = seed.shape[0]
        stats.cycles += 1
        length = min(settings.block_length, out.remaining())
        draft = torch.full((batch, length), settings.mask_id, dtype=torch.long, device=input_ids.device)
        draft[:, 0] = seed
        if length > 1:
            logits = state.forward(draft, bidirectional=True, keep=False,
                                   drafting=torch.ones_like(draft, dtype=torch.bool))
            stats.nfe += 1
            draft[:, 1:] = logits[:, 1:].argmax(-1)
        verified = verifier_tokens(state.forward(draft), settings.temperature)
        stats.nfe += 1
        matches = _accept(state, out, counter, verified, draft)
        seed = verified.gather(1, matches[:, None])[:, 0]
    counter.finish(stats)
    return out.sequences(input_ids), out.finish(stats)


@lru_cache(maxsize=64)
def quadratic_layout(drafts: int, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """The shared forward of a quadratic cycle with ``drafts`` = k: ``(offsets [q], within [q, q])``.

    Tokens: the draft ``D = [seed, d_1 .. d_k]`` (w = k + 1 tokens), then for each acceptance hypothesis
    c = 0 .. k a block ``H_c`` of w masks. ``offsets``: positions after the seed's (D[i] at i, H_c[j] at
    c + 1 + j: H_c continues the text after d_c). ``within``: D is causal; H_c sees D[0 .. c] and itself
    (bidirectionally), never another hypothesis. q = w (w + 1)."""
    width = drafts + 1
    offsets = [*range(width)] + [c + 1 + j for c in range(width) for j in range(width)]
    within = torch.zeros(len(offsets), len(offsets), dtype=torch.bool)
    within[:width, :width] = torch.ones(width, width, dtype=torch.bool).tril()
    for c in range(width):
        start = width + c * width
        within[start:start + width, : c + 1] = True
        within[start:start + width, start:start + width] = True
    return torch.tensor(offsets, device=device), within.to(device)


@lru_cache(maxsize=64)
def _prefill_within(prompt_length: int, drafts: int, device: str) -> torch.Tensor:
    """Bool [S + w, S + w]: a causal prompt, then one block of w masks that sees the prompt and itself."""
    size = prompt_length + drafts + 1
    within = torch.ones(size, size, dtype=torch.bool, device=device).tril()
    within[prompt_length:, prompt_length:] = True
    return within


def quadratic_spec_decode(model, input_ids, attention_mask, settings: DecodeSettings, drafts: int, drafter=None
                          ) -> tuple[torch.Tensor, DecodeStats]:
    """Quadratic self-speculation: each cycle is one forward over the draft (verified causally) and, for every
    possible acceptance length c, a block of masks that drafts the next cycle after d_c (:func:`quadratic_layout`).
    After it, each row keeps the K/V of its accepted prefix only and drafts from the block of its c.

    The prefill carries one mask block after the prompt, so it gives the seed and the first draft.
    NFE = 1 (prefill) + 1 per cycle. ``drafts`` (k) is the most draft tokens per cycle; fewer near the end.
    ``drafter``: a DraftAdapter that the mask blocks see (the draft being verified never does)."""
    batch, device = input_ids.shape[0], input_ids.device
    state = KVState(model, batch, settings.use_prefix_cache, drafter)
    out = Output(batch, settings, device)
    stats = DecodeStats("quad_spec", nfe=1)
    counter = AcceptanceCounter(drafts)
    width = min(drafts, settings.max_new_tokens - 1)
    masks = torch.full((batch, width + 1), settings.mask_id, dtype=torch.long, device=device)
    prompt_length = input_ids.shape[1]
    prompt_valid = attention_mask.bool()
    prompt_pos = (prompt_valid.long().cumsum(1) - 1).clamp(min=0)
    mask_pos = prompt_valid.sum(1, keepdim=True) + torch.arange(width + 1, device=device)[None, :]
    hidden = state.forward_structured(
        torch.cat([input_ids, masks], 1), torch.cat([prompt_pos, mask_pos], 1),
        _prefill_within(prompt_length, width, str(device)), keep=prompt_length,
        new_valid=torch.cat([prompt_valid, torch.ones_like(masks, dtype=torch.bool)], 1),
        drafting=_after(batch, prompt_length, width + 1, device))
    seed = verifier_tokens(head_logits(model, hidden[:, prompt_length - 1]), settings.temperature)
    out.emit_batch(seed[:, None])
    block_start = torch.full((batch,), prompt_length, dtype=torch.long, device=device)
    next_drafts = _block_drafts(model, hidden, block_start, width)
    while not out.all_done:
        seed, next_drafts = drop_finished(state, out, seed, next_drafts)
        batch = seed.shape[0]
        stats.cycles += 1
        width = min(drafts, out.remaining() - 1)
        draft = torch.cat([seed[:, None], next_drafts[:, :width]], 1)
        tokens = draft
        offsets, within = quadratic_layout(width, str(device))
        if width > 0:
            masks = torch.full((batch, (width + 1) ** 2), settings.mask_id, dtype=torch.long, device=device)
            tokens = torch.cat([draft, masks], 1)
        else:
            offsets, within = offsets[:1], within[:1, :1]
        drafting = None if drafter is None else _after(batch, width + 1, tokens.shape[1] - width - 1, device)
        hidden = state.forward_structured(tokens, state.next_pos[:, None] + offsets[None, :], within,
                                          keep=width + 1, drafting=drafting)
        stats.nfe += 1
        verified = verifier_tokens(head_logits(model, hidden[:, : width + 1]), settings.temperature)
        matches = _accept(state, out, counter, verified, draft)
        seed = verified.gather(1, matches[:, None])[:, 0]
        next_drafts = _block_drafts(model, hidden, (width + 1) * (matches + 1), width)
    counter.finish(stats)
    return out.sequences(input_ids), out.finish(stats)


def _after(batch: int, before: int, after: int, device) -> torch.Tensor:
    """Bool [B, before + after]: the last ``after`` tokens (the mask blocks) are draft tokens."""
    drafting = torch.zeros(batch, before + after, dtype=torch.bool, device=device)
    drafting[:, before:] = True
    return drafting


def _block_drafts(model, hidden: torch.Tensor, block_start: torch.Tensor, drafts: int) -> torch.Tensor:
    """[B, drafts]: the argmax tokens at positions 1 .. drafts of each row's mask block, which starts at
    ``block_start[b]`` in ``hidden`` (its position 0 stands for the next seed, which the verifier gives)."""
    index = block_start[:, None] + 1 + torch.arange(drafts, device=hidden.device)[None, :]
    rows = hidden.gather(1, index[:, :, None].expand(-1, -1, hidden.shape[2]))
    return head_logits(model, rows).argmax(-1)
