"""Decode evaluation prompts with an exported tri-mode model, in batches, and score them.

Prompts are encoded as the demo trains (the tokenizer's own special tokens, no chat template), left-
padded into batches with an ``attention_mask``, and decoded greedily (temperature 0) by
``ar_generate`` / ``generate`` / ``linear_spec_generate`` / ``quadratic_spec_generate``. Per-example NFE and cycles are those of
decoding the example alone (see :mod:`ar2dlm.eval.metrics`): taken from the stats the batched call
returns where they can be (batch 1, or AR), otherwise, when asked (``decode_alone``), from a
second pass that decodes each example alone; that pass also checks that batching did not change any
output. Without it those examples carry their batch's NFE (:func:`ar2dlm.eval.metrics.batch_costs`).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from ar2dlm.errors import UserError
from ar2dlm.eval.metrics import (
    ExampleResult,
    ModeResult,
    OffsetCounts,
    alone_costs,
    answer_from_text,
    batch_costs,
    exact_match,
    summarize,
)
from ar2dlm.generation.modes import MODES, decode
from ar2dlm.log import logger
from ar2dlm.runtime.modeling_ar2dlm import eos_token_ids

WARMUP_TOKENS = 4


@dataclass(frozen=True)
class DecodeConfig:
    """One decoding setting of a sweep."""

    mode: str
    max_new_tokens: int = 64
    block_length: int | None = None  # every mode but AR
    threshold: float | None = None  # diffusion
    sub_block_length: int | None = None  # diffusion's levers (docs/design.md §4.4); None: the runtime's default
    confidence: str | None = None
    position_decay: float | None = None
    draft_length: int | None = None  # quad_spec; None: block_length - 1
    use_drafter: bool | None = None  # self_spec / quad_spec: the export's drafter LoRA (None: when it has one)

    def levers(self) -> dict:
        """Diffusion's decoding levers as keyword arguments of ``decode``."""
        return {"sub_block_length": self.sub_block_length, "confidence": self.confidence,
                "position_decay": self.position_decay}

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise UserError(f"mode {self.mode!r} is not one of: {', '.join(MODES)}")
        if self.max_new_tokens < 1:
            raise UserError(f"max_new_tokens={self.max_new_tokens} must be >= 1")
        if self.mode != "ar" and (self.block_length is None or self.block_length < 1):
            raise UserError(f"mode {self.mode} needs block_length >= 1, got {self.block_length}")
        if self.mode == "quad_spec" and self.block_length < 2:
            raise UserError(f"mode quad_spec needs block_length >= 2 (a seed and a draft), got {self.block_length}")
        if self.mode == "diffusion" and (self.threshold is None or not 0.0 <= self.threshold <= 1.0):
            raise UserError(f"diffusion needs a threshold in [0, 1], got {self.threshold}")


@dataclass
class DecodedBatch:
    """New tokens of each row up to and including EOS, and the call's stats and wall seconds."""

    new_ids: list[list[int]]
    stats: object
    seconds: float


def encode_prompts(tokenizer, prompts: Sequence[str], context: int | None, max_new_tokens: int
                   ) -> list[list[int]]:
    """Token ids of each prompt (UserError for an empty one or one that leaves no room to answer)."""
    encoded = tokenizer(list(prompts), add_special_tokens=True)["input_ids"]
    for prompt, ids in zip(prompts, encoded, strict=True):
        if not ids:
            raise UserError(f"prompt {prompt!r} encodes to no tokens")
        if context is not None and len(ids) + max_new_tokens > context:
            raise UserError(f"prompt {prompt[:40]!r}... has {len(ids)} tokens; with max_new_tokens="
                            f"{max_new_tokens} it exceeds the context window ({context})")
    return encoded


def left_pad(rows: Sequence[Sequence[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """``input_ids`` and ``attention_mask`` [B, S] with padding first."""
    width = max(len(row) for row in rows)
    ids = torch.tensor([[pad_id] * (width - len(row)) + list(row) for row in rows], device=device)
    mask = torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in rows], device=device)
    return ids, mask


def pad_token_id(model, tokenizer) -> int:
    for value in (tokenizer.pad_token_id, model.config.pad_token_id, tokenizer.eos_token_id):
        if value is not None:
            return int(value)
    return 0


def _synchronize(model) -> None:
    if model.device.type == "cuda":
        torch.cuda.synchronize(model.device)


def decode_batch(model, rows: Sequence[Sequence[int]], config: DecodeConfig, pad_id: int) -> DecodedBatch:
    """Decode a batch of prompts (token ids) and time it."""
    input_ids, attention_mask = left_pad(rows, pad_id, model.device)
    _synchronize(model)
    start = time.perf_counter()
    sequences, stats = decode(model, config.mode, input_ids, config.max_new_tokens, block_length=config.block_length,
                              threshold=config.threshold, attention_mask=attention_mask,
                              draft_length=config.draft_length, use_drafter=config.use_drafter, **config.levers())
    _synchronize(model)
    seconds = time.perf_counter() - start
    new = sequences[:, input_ids.shape[1]:].tolist()
    new_ids = [tokens[:count] for tokens, count in zip(new, stats.new_tokens, strict=True)]
    return DecodedBatch(new_ids, stats, seconds)


def batches(items: Sequence, size: int) -> list[Sequence]:
    return [items[start:start + size] for start in range(0, len(items), size)]


def decode_each_alone(model, rows: Sequence[Sequence[int]], config: DecodeConfig, pad_id: int,
                      offsets: OffsetCounts | None = None) -> tuple[list[list[int]], list[tuple[int, int]]]:
    """Each prompt decoded alone: its new tokens and (NFE, cycles); its draft acceptance added to ``offsets``."""
    outputs, costs = [], []
    for row in rows:
        decoded = decode_batch(model, [row], config, pad_id)
        outputs.append(decoded.new_ids[0])
        costs.extend(alone_costs(decoded.stats, config.mode))
        if offsets is not None:
            offsets.add(decoded.stats)
    return outputs, costs


def evaluate_setting(model, tokenizer, examples: Sequence, encoded: Sequence[Sequence[int]],
                     config: DecodeConfig, batch_size: int, warmup: bool = True, decode_alone: bool = False
                     ) -> ModeResult:
    """Decode every example in ``config`` with batches of ``batch_size`` and aggregate the metrics.

    ``decode_alone``: decode again, one at a time, the examples whose cost alone the batched call does not
    give (diffusion and self-speculation in batches of more than one); otherwise they get the batch's."""
    if batch_size < 1:
        raise UserError(f"batch_size={batch_size} must be >= 1")
    pad_id = pad_token_id(model, tokenizer)
    if warmup and encoded:
        short = replace(config, max_new_tokens=min(WARMUP_TOKENS, config.max_new_tokens))
        decode_batch(model, list(encoded[:batch_size]), short, pad_id)
    outputs: list[list[int]] = []
    costs: list[tuple[int, int] | None] = []
    seconds, batch_forwards, missing = 0.0, 0, []
    offsets = OffsetCounts()
    for start, chunk in zip(range(0, len(encoded), batch_size), batches(encoded, batch_size), strict=True):
        decoded = decode_batch(model, chunk, config, pad_id)
        seconds += decoded.seconds
        batch_forwards += int(decoded.stats.nfe)
        outputs.extend(decoded.new_ids)
        row_costs = alone_costs(decoded.stats, config.mode)
        if row_costs is not None or not decode_alone:
            offsets.add(decoded.stats)
        if row_costs is None:
            missing.extend(range(start, start + len(chunk)))
            row_costs = [None] * len(chunk) if decode_alone else batch_costs(decoded.stats)
        costs.extend(row_costs)
    mismatches = 0
    if missing and decode_alone:
        alone_outputs, alone = decode_each_alone(model, [encoded[i] for i in missing], config, pad_id, offsets)
        for index, output, cost in zip(missing, alone_outputs, alone, strict=True):
            costs[index] = cost
            mismatches += output != outputs[index]
        if mismatches:
            logger.warning("%s: %d of %d outputs differ between batch size %d and decoding alone",
                           config.mode, mismatches, len(missing), batch_size)
    eos = set(eos_token_ids(model))
    rows = [score_example(example, tokenizer, new_ids, cost, eos)
            for example, new_ids, cost in zip(examples, outputs, costs, strict=True)]
    result = summarize(config.mode, config.block_length, config.threshold, rows, seconds, batch_forwards,
                       mismatches, nfe_basis="batch" if missing and not decode_alone else "alone",
                       acceptance_by_offset=offsets.rates(), draft_length=config.draft_length)
    result.drafter = config.use_drafter
    return result


def score_example(example, tokenizer, new_ids: list[int], cost: tuple[int, int], eos: set[int]
                  ) -> ExampleResult:
    """Decode the answer (the new tokens before EOS, up to the first newline) and score it."""
    text_ids = new_ids[:-1] if new_ids and new_ids[-1] in eos else new_ids
    prediction = answer_from_text(tokenizer.decode(text_ids, skip_special_tokens=True))
    nfe, cycles = cost
    return ExampleResult(task=example.task, prompt=example.prompt, answer=example.answer.strip(),
                         prediction=prediction, correct=exact_match(prediction, example.answer),
                         new_tokens=len(new_ids), nfe=nfe, cycles=cycles)


def cut_at_stop(text: str, stops: Sequence[str]) -> str:
    """``text`` up to the earliest of the ``stops`` strings (all of it when none occurs)."""
    cut = len(text)
    for stop in stops:
        if stop:
            index = text.find(stop)
            if index != -1:
                cut = min(cut, index)
    return text[:cut]


def generate_texts(model, tokenizer, prompts: Sequence[Sequence[int]], config: DecodeConfig, batch_size: int,
                   stops: Sequence[str] = ()) -> list[str]:
    """Greedy continuations (special tokens dropped, cut at the first stop string) of tokenised prompts."""
    pad_id, eos = pad_token_id(model, tokenizer), set(eos_token_ids(model))
    texts = []
    for chunk in batches(prompts, batch_size):
        decoded = continuation_texts(tokenizer, decode_batch(model, chunk, config, pad_id).new_ids, eos)
        texts.extend(cut_at_stop(text, stops) for text in decoded)
    return texts


def continuation_texts(tokenizer, new_ids: Sequence[Sequence[int]], eos: set[int]) -> list[str]:
    """The text of each row's new tokens, a final EOS and every special token dropped."""
    return [tokenizer.decode(ids[:-1] if ids and ids[-1] in eos else ids, skip_special_tokens=True)
            for ids in new_ids]
