"""ar2dlm decoding algorithms: the batch state, AR and block diffusion (torch + transformers only); the
self-speculation modes are in ``speculation_ar2dlm``.

All modes run on left-padded batches through one :class:`KVState`, which owns the KV cache and, per
row, which cache slots are valid keys and the next position id. Positions that a row must not see
(left padding, rejected speculative tokens) stay in the cache as invalid slots: "holes" that the
custom 4D attention mask hides, so rows can accept different numbers of tokens per forward.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch
from transformers.cache_utils import DynamicCache

CONFIDENCES = ("probability", "position")  # how diffusion ranks masked positions (see commit_rule)
DEFAULT_POSITION_DECAY = 0.9


@dataclass(frozen=True)
class DecodeSettings:
    """Validated arguments shared by the three modes."""

    max_new_tokens: int
    temperature: float
    eos_ids: tuple[int, ...]
    pad_id: int
    mask_id: int | None = None
    block_length: int = 1
    threshold: float = 1.0
    sub_block_length: int | None = None  # diffusion commits only in the leftmost unfinished sub-block; None: block
    confidence: str = "probability"  # one of CONFIDENCES
    position_decay: float = DEFAULT_POSITION_DECAY  # confidence="position" only
    use_prefix_cache: bool = True


@dataclass
class DecodeStats:
    """What a decoding call did: forward passes, cycles (AR steps after the prefill, diffusion blocks,
    or self-speculation cycles) and, per row, the new tokens it produced (EOS included)."""

    mode: str
    nfe: int = 0
    cycles: int = 0
    new_tokens: tuple[int, ...] = ()
    drafted_by_offset: tuple[int, ...] = ()  # self-speculation: times the draft token at offset j + 1 was verified
    accepted_by_offset: tuple[int, ...] = ()  # ... and accepted (open rows only)


def allowed_keys(key_valid: torch.Tensor, num_queries: int, bidirectional_tail: int) -> torch.Tensor:
    """Bool [B, q, K]: the last ``num_queries`` of K tokens attend causally to valid keys; the last
    ``bidirectional_tail`` tokens also see each other (a diffusion block). A token always sees itself."""
    num_keys = key_valid.shape[1]
    device = key_valid.device
    query_index = torch.arange(num_keys - num_queries, num_keys, device=device)[:, None]
    key_index = torch.arange(num_keys, device=device)[None, :]
    tail_start = num_keys - bidirectional_tail
    visible = (key_index <= query_index) | ((query_index >= tail_start) & (key_index >= tail_start))
    return (visible[None] & key_valid[:, None, :]) | (key_index == query_index)[None]


def structured_keys(old_valid: torch.Tensor, new_valid: torch.Tensor | None, within: torch.Tensor, *,
                    old_queries: bool) -> torch.Tensor:
    """Bool [B, q, K] (or [B, K, K] with ``old_queries``, for a forward that recomputes the old tokens too):
    new token i sees the valid old keys and the valid new tokens j with ``within[i, j]`` (``new_valid`` None: all
    are valid); old tokens see earlier valid old tokens. A token always sees itself (``within``'s diagonal must be
    set)."""
    batch, num_old = old_valid.shape
    num_new = within.shape[0]
    seen_new = within[None].expand(batch, num_new, num_new)
    if new_valid is not None:
        seen_new = (seen_new & new_valid[:, None, :]) | torch.eye(num_new, dtype=torch.bool, device=within.device)
    new_rows = torch.cat([old_valid[:, None, :].expand(batch, num_new, num_old), seen_new], 2)
    if not old_queries:
        return new_rows
    old_rows = torch.cat([allowed_keys(old_valid, num_old, 0),
                          old_valid.new_zeros(batch, num_old, num_new)], 2)
    return torch.cat([old_rows, new_rows], 1)


def head_logits(model, hidden: torch.Tensor) -> torch.Tensor:
    """The LM head on final hidden states (any leading shape): the logits the family's ``forward`` gives."""
    return model.get_output_embeddings()(hidden)


def model_attention_mask(model, allowed: torch.Tensor, key_pos: torch.Tensor, dtype: torch.dtype):
    """The additive float mask [B, 1, q, K] (0 = attend) that eager and sdpa both accept, or a
    per-layer-type dict of them when the model has sliding-window layers (Qwen2/Qwen3)."""
    config = model.config
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)

    def additive(keep: torch.Tensor) -> torch.Tensor:
        zero = torch.zeros((), dtype=dtype, device=keep.device)
        return torch.where(keep, zero, torch.finfo(dtype).min)[:, None]

    if not window:
        return additive(allowed)
    query_pos = key_pos[:, key_pos.shape[1] - allowed.shape[1]:]
    in_window = (query_pos[:, :, None] - key_pos[:, None, :]) < window
    windowed = allowed & in_window  # a token is always inside its own window
    if layer_types is not None:
        if "sliding_attention" not in layer_types:
            return additive(allowed)
        return {"full_attention": additive(allowed), "sliding_attention": additive(windowed)}
    return additive(windowed)


class KVState:
    """Token ids, key validity and positions of everything a batch has attended to, plus the KV cache.

    With ``use_cache=False`` the cache is never used: every forward recomputes the whole sequence
    (the reference that the cached path must equal).
    """

    def __init__(self, model, batch_size: int, use_cache: bool = True, drafter=None):
        device = model.device
        self.model = model
        self.drafter = drafter  # a DraftAdapter (drafter_ar2dlm) that the tokens marked ``drafting`` see, or None
        self.use_cache = use_cache
        self.cache = DynamicCache() if use_cache else None
        self.ids = torch.zeros(batch_size, 0, dtype=torch.long, device=device)
        self.valid = torch.zeros(batch_size, 0, dtype=torch.bool, device=device)
        self.pos = torch.zeros(batch_size, 0, dtype=torch.long, device=device)
        self.next_pos = torch.zeros(batch_size, dtype=torch.long, device=device)

    @property
    def length(self) -> int:
        return self.ids.shape[1]

    def _drafting(self, drafting: torch.Tensor | None, input_length: int):
        """The drafter switched on for the new tokens marked in ``drafting`` [B, q] (off without either)."""
        if self.drafter is None or drafting is None:
            return nullcontext()
        gate = drafting.new_zeros(drafting.shape[0], input_length)
        gate[:, input_length - drafting.shape[1]:] = drafting
        return self.drafter.drafting(gate)

    def forward(self, tokens: torch.Tensor, *, bidirectional: bool = False, keep: bool = True,
                new_valid: torch.Tensor | None = None, logits_to_keep: int = 0,
                drafting: torch.Tensor | None = None) -> torch.Tensor:
        """Run the model on ``tokens`` [B, q] after everything kept so far; return logits [B, *, V].

        ``bidirectional``: the q tokens form one diffusion block. ``keep``: append them (their K/V)
        to the state; otherwise the cache is cropped back afterwards. ``new_valid``: which of the
        q tokens are real (left padding of a prompt); real tokens take consecutive positions."""
        if new_valid is None:
            new_valid = torch.ones_like(tokens, dtype=torch.bool)
        new_pos = self.next_pos[:, None] + (new_valid.long().cumsum(1) - 1).clamp(min=0)
        key_valid = torch.cat([self.valid, new_valid], 1)
        key_pos = torch.cat([self.pos, new_pos], 1)
        num_new = tokens.shape[1]
        if self.use_cache:
            inputs, positions, num_queries = tokens, new_pos, num_new
        else:
            inputs, positions, num_queries = torch.cat([self.ids, tokens], 1), key_pos, key_pos.shape[1]
        allowed = allowed_keys(key_valid, num_queries, num_new if bidirectional else 0)
        mask = model_attention_mask(self.model, allowed, key_pos, self.model.dtype)
        old_length = self.length
        with self._drafting(drafting, inputs.shape[1]):
            output = self.model(input_ids=inputs, attention_mask=mask, position_ids=positions,
                                past_key_values=self.cache, use_cache=self.use_cache,
                                logits_to_keep=logits_to_keep or num_new)
        if keep:
            self.ids = torch.cat([self.ids, tokens], 1)
            self.valid, self.pos = key_valid, key_pos
            self.next_pos = self.next_pos + new_valid.sum(1)
        elif self.cache is not None:
            self.cache.crop(old_length)
        return output.logits

    def forward_structured(self, tokens: torch.Tensor, new_pos: torch.Tensor, within: torch.Tensor, *,
                           keep: int, new_valid: torch.Tensor | None = None,
                           drafting: torch.Tensor | None = None) -> torch.Tensor:
        """Run the decoder on ``tokens`` [B, q] at positions ``new_pos`` [B, q], where new token i sees every
        valid key kept so far and the new tokens j with ``within[i, j]`` (bool [q, q], one rule for all rows);
        return the final hidden states [B, q, H] (:func:`head_logits` turns rows of them into logits).
        The first ``keep`` tokens are appended to the state; the K/V of the rest is dropped afterwards.
        ``new_valid`` None: every new token is real."""
        old_length, num_new = self.length, tokens.shape[1]
        key_pos = torch.cat([self.pos, new_pos], 1)
        allowed = structured_keys(self.valid, new_valid, within, old_queries=not self.use_cache)
        if self.use_cache:
            inputs, positions = tokens, new_pos
        else:
            inputs, positions = torch.cat([self.ids, tokens], 1), key_pos
        mask = model_attention_mask(self.model, allowed, key_pos, self.model.dtype)
        with self._drafting(drafting, inputs.shape[1]):
            hidden = self.model.get_decoder()(input_ids=inputs, attention_mask=mask, position_ids=positions,
                                              past_key_values=self.cache, use_cache=self.use_cache).last_hidden_state
        self.ids = torch.cat([self.ids, tokens[:, :keep]], 1)
        self.pos = key_pos[:, : old_length + keep]
        if new_valid is None:
            self.valid = torch.cat([self.valid, self.valid.new_ones(tokens.shape[0], keep)], 1)
            self.next_pos = self.next_pos + keep
        else:
            self.valid = torch.cat([self.valid, new_valid[:, :keep]], 1)
            self.next_pos = self.next_pos + new_valid[:, :keep].sum(1)
        if self.cache is not None and keep < num_new:
            self.cache.crop(old_length + keep)
        return hidden[:, -num_new:]

    def keep_rows(self, keep: list[int]) -> None:
        """Drop every batch row but those at ``keep`` (finished rows need no more forwards)."""
        index = torch.tensor(keep, device=self.ids.device)
        self.ids, self.valid, self.pos, self.next_pos = (t[index] for t in (self.ids, self.valid, self.pos,
                                                                            self.next_pos))
        if self.cache is not None:
            self.cache.batch_select_indices(index)

    def reject_tail(self, keep_counts: torch.Tensor, tail: int, most_kept: int | None = None) -> None:
        """Of the last ``tail`` kept tokens, row b keeps its first ``keep_counts[b]``; the rest become
        holes. Slots that every row rejects are cropped from the cache (``most_kept``: the largest count, if
        the caller has it on the host)."""
        start = self.length - tail
        offsets = torch.arange(tail, device=keep_counts.device)[None, :]
        self.valid[:, start:] &= offsets < keep_counts[:, None]
        self.next_pos = self.next_pos - (tail - keep_counts)
        new_length = start + (int(keep_counts.max()) if most_kept is None else most_kept)
        if new_length < self.length:
            self.ids, self.valid, self.pos = (t[:, :new_length] for t in (self.ids, self.valid, self.pos))
            if self.cache is not None:
                self.cache.crop(new_length)


def choose_tokens(logits: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens (argmax at temperature 0, else sampled from softmax(logits / T)) and their confidence:
    the probability of the chosen token under softmax(logits) (the max probability when greedy)."""
    logits = logits.float()
    probs = torch.softmax(logits, dim=-1)
    if temperature == 0:  # the argmax of the logits themselves, as every greedy path here takes it
        tokens = logits.argmax(-1)
        return tokens, probs.gather(-1, tokens[..., None])[..., 0]
    flat = torch.softmax(logits / temperature, dim=-1).reshape(-1, logits.shape[-1])
    tokens = torch.multinomial(flat, 1).reshape(logits.shape[:-1])
    return tokens, probs.gather(-1, tokens[..., None])[..., 0]


class Output:
    """The new-token slots of a batch: filled in order, a row closes at EOS or at max_new_tokens.

    ``rows``: the batch row of each row the decoder still runs (decoders may drop finished rows, see
    :meth:`open_rows`); ``emit_batch`` takes tensors over those rows."""

    def __init__(self, batch_size: int, settings: DecodeSettings, device: torch.device):
        self.settings = settings
        self.tokens = torch.full((batch_size, settings.max_new_tokens), settings.pad_id, dtype=torch.long)
        self.device = device
        self.count = [0] * batch_size
        self.done = [False] * batch_size
        self.rows = list(range(batch_size))

    def emit(self, row: int, tokens: list[int]) -> None:
        for token in tokens:
            if self.done[row]:
                return
            self.tokens[row, self.count[row]] = token
            self.count[row] += 1
            self.done[row] = token in self.settings.eos_ids or self.count[row] == self.settings.max_new_tokens

    def emit_batch(self, tokens: torch.Tensor, lengths: list[int] | None = None) -> None:
        for index, values in enumerate(tokens.tolist()):
            self.emit(self.rows[index], values if lengths is None else values[: lengths[index]])

    def open_rows(self) -> list[int] | None:
        """Indices (into the rows still run) of the open rows, when some run row has finished; else None."""
        keep = [index for index, row in enumerate(self.rows) if not self.done[row]]
        return keep if len(keep) < len(self.rows) else None

    def keep_rows(self, keep: list[int]) -> None:
        self.rows = [self.rows[index] for index in keep]

    @property
    def all_done(self) -> bool:
        return all(self.done)

    def remaining(self) -> int:
        """The most new tokens any open row may still take."""
        open_counts = [c for c, done in zip(self.count, self.done, strict=True) if not done]
        return self.settings.max_new_tokens - min(open_counts)

    def finish(self, stats: DecodeStats) -> DecodeStats:
        stats.new_tokens = tuple(self.count)
        return stats

    def sequences(self, input_ids: torch.Tensor) -> torch.Tensor:
        return torch.cat([input_ids, self.tokens.to(self.device)], 1)


def drop_finished(state: KVState, out: Output, *per_row: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Stop running the rows that have finished: drop them from ``state``, ``out`` and the ``per_row`` tensors
    (returned, rows kept in order). Rows never see each other, so the others decode exactly as before."""
    keep = out.open_rows()
    if not keep:  # None: every run row is open; []: all finished
        return per_row
    state.keep_rows(keep)
    out.keep_rows(keep)
    index = torch.tensor(keep, device=per_row[0].device)
    return tuple(tensor[index] for tensor in per_row)


def prefill(state: KVState, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Causal pass over the (left-padded) prompt; returns the last position's logits [B, V]."""
    return state.forward(input_ids, new_valid=attention_mask.bool(), logits_to_keep=1)[:, -1]


def ar_decode(model, input_ids, attention_mask, settings: DecodeSettings) -> tuple[torch.Tensor, DecodeStats]:
    """Greedy/sampled AR decoding: prefill gives the first token, then one token per forward."""
    state = KVState(model, input_ids.shape[0], settings.use_prefix_cache)
    out = Output(input_ids.shape[0], settings, input_ids.device)
    stats = DecodeStats("ar", nfe=1)
    token, _ = choose_tokens(prefill(state, input_ids, attention_mask), settings.temperature)
    out.emit_batch(token[:, None])
    while not out.all_done:
        (token,) = drop_finished(state, out, token)
        logits = state.forward(token[:, None], logits_to_keep=1)[:, -1]
        stats.nfe += 1
        stats.cycles += 1
        token, _ = choose_tokens(logits, settings.temperature)
        out.emit_batch(token[:, None])
    return out.sequences(input_ids), out.finish(stats)


def _settled_eos(tokens: list[int], committed: list[bool], eos_ids: tuple[int, ...]) -> int | None:
    """Index of the first EOS when every position before it is committed, else None."""
    for index, (token, is_committed) in enumerate(zip(tokens, committed, strict=True)):
        if not is_committed:
            return None
        if token in eos_ids:
            return index
    return None


def _close_rows_at_eos(block: torch.Tensor, committed: torch.Tensor, out: Output) -> None:
    """Emit and freeze the rows whose block already holds a settled EOS."""
    block_rows, committed_rows = block.tolist(), committed.tolist()
    for row in range(block.shape[0]):
        if out.done[row]:
            committed[row] = True
            continue
        eos_index = _settled_eos(block_rows[row], committed_rows[row], out.settings.eos_ids)
        if eos_index is not None:
            out.emit(row, block_rows[row][: eos_index + 1])
            committed[row] = True


def commit_window(masked: torch.Tensor, sub_block_length: int | None) -> torch.Tensor:
    """Bool [B, L]: the positions of each row's leftmost unfinished sub-block, the block cut into
    sub-blocks of ``sub_block_length`` positions from its first (the seed's); None: the whole block."""
    if sub_block_length is None:
        return torch.ones_like(masked)
    positions = torch.arange(masked.shape[1], device=masked.device)
    leftmost = _leftmost_masked(masked)
    return (positions[None, :] // sub_block_length) == (leftmost[:, None] // sub_block_length)


def _leftmost_masked(masked: torch.Tensor) -> torch.Tensor:
    """[B]: each row's first masked position (0 for a row without masks)."""
    return masked.long().argmax(1)


def position_confidence(probability: torch.Tensor, masked: torch.Tensor, decay: float) -> torch.Tensor:
    """``probability * decay ** d``, d the distance (in positions) from the row's leftmost masked position."""
    positions = torch.arange(masked.shape[1], device=masked.device)
    distance = (positions[None, :] - _leftmost_masked(masked)[:, None]).clamp(min=0)
    return probability * decay ** distance.to(probability.dtype)


def commit_rule(probability: torch.Tensor, masked: torch.Tensor, settings: DecodeSettings) -> torch.Tensor:
    """Bool [B, L]: the masked positions one denoising pass commits (docs/design.md §4.4), given each
    position's probability of its chosen token and what is still masked. Candidates are the masked positions
    of the leftmost unfinished sub-block; a row with any commits the most confident one and every one whose
    confidence is >= threshold. Confidence: the probability, or with ``confidence="position"``
    :func:`position_confidence`. This is the one place that decides commits (the seam for a learned sampler)."""
    candidates = masked & commit_window(masked, settings.sub_block_length)
    confidence = probability
    if settings.confidence == "position":
        confidence = position_confidence(probability, masked, settings.position_decay)
    confidence = confidence.masked_fill(~candidates, -1.0)
    pick = (confidence >= settings.threshold) & candidates
    open_rows = candidates.any(1)
    best = confidence.argmax(1)
    pick[open_rows, best[open_rows]] = True
    return pick


def _denoise_step(logits: torch.Tensor, block: torch.Tensor, committed: torch.Tensor,
                  settings: DecodeSettings) -> None:
    """Fill the positions that :func:`commit_rule` picks with their chosen tokens."""
    tokens, probability = choose_tokens(logits, settings.temperature)
    pick = commit_rule(probability, ~committed, settings)
    block[pick] = tokens[pick]
    committed |= pick


def diffusion_decode(model, input_ids, attention_mask, settings: DecodeSettings
                     ) -> tuple[torch.Tensor, DecodeStats]:
    """Block diffusion with a causal prefix cache (docs/design.md §4.4). Rows move through blocks in lockstep.

    NFE = 1 (prefill) + one pass per denoising step of each block that has masked positions + one
    causal pass per finished block that is followed by another block (the last block's is skipped)."""
    batch = input_ids.shape[0]
    state = KVState(model, batch, settings.use_prefix_cache)
    out = Output(batch, settings, input_ids.device)
    stats = DecodeStats("diffusion", nfe=1)
    seed, _ = choose_tokens(prefill(state, input_ids, attention_mask), settings.temperature)
    generated = 0
    while not out.all_done:
        stats.cycles += 1
        length = min(settings.block_length, settings.max_new_tokens - generated)
        block = torch.full((batch, length), settings.mask_id, dtype=torch.long, device=input_ids.device)
        block[:, 0] = seed
        committed = torch.zeros_like(block, dtype=torch.bool)
        committed[:, 0] = True
        _close_rows_at_eos(block, committed, out)
        while not bool(committed.all()):
            logits = state.forward(block, bidirectional=True, keep=False)
            stats.nfe += 1
            _denoise_step(logits, block, committed, settings)
            _close_rows_at_eos(block, committed, out)
        out.emit_batch(block)
        generated += length
        if out.all_done:
            break
        logits = state.forward(block, logits_to_keep=1)[:, -1]
        stats.nfe += 1
        seed, _ = choose_tokens(logits, settings.temperature)
    return out.sequences(input_ids), out.finish(stats)
