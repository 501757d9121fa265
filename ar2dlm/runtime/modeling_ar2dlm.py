"""ar2dlm tri-mode runtime: HF remote code copied into every exported checkpoint (torch + transformers only).

``AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)`` returns the source family's
causal LM (same tensor names, same ``forward`` and logits) with three decoding modes added:

- ``ar_generate``: autoregressive decoding with a KV cache;
- ``generate``: block diffusion with a causal prefix cache, as the published runtime names it; a call in
  HF's style (``do_sample=``, ``generation_config=``, ``pipeline``, ...) reaches HF's ``GenerationMixin.generate``
  (also ``hf_generate``);
- ``linear_spec_generate``: self-speculation (bidirectional draft, causal verify), lossless;
- ``quadratic_spec_generate``: self-speculation with one forward per cycle (this cycle's verify pass and the
  drafts of the next cycle for every acceptance length share it), lossless.

Diffusion and self-speculation serve models whose clean stream was trained causal (``config.clean_pattern``);
they refuse any other pattern.

Each takes a left-padded ``input_ids`` [B, S] (``attention_mask`` 1 = real token) and returns
``(sequences, nfe)``: the prompt followed by exactly ``max_new_tokens`` slots (padded after EOS) and
the number of model forward passes. With ``return_stats=True`` it returns ``(sequences, stats)`` instead, a
:class:`DecodeStats` with the call's passes (``stats.nfe``), cycles and new tokens per row (EOS included).
An empty ``eos_token_id`` list decodes all ``max_new_tokens``.

NFE: AR = max_new_tokens (the prefill gives the first token). Diffusion = 1 prefill + one pass per
denoising step of each block + one causal pass per finished block that another block follows.
Self-speculation = 1 prefill + 2 per cycle (draft, verify); a cycle that drafts one position has no
mask to fill and runs the verify pass only (so block_length 1 is exactly AR, NFE included). Quadratic
self-speculation = 1 prefill (which also drafts the first cycle) + 1 per cycle. Every NFE counts the prefill.
"""

from __future__ import annotations

import torch
from transformers import (
    GenerationConfig,
    GenerationMixin,
    LlamaForCausalLM,
    MistralForCausalLM,
    Qwen2ForCausalLM,
    Qwen3ForCausalLM,
)

from .decoding_ar2dlm import (
    CONFIDENCES,
    DEFAULT_POSITION_DECAY,
    DecodeSettings,
    DecodeStats,
    ar_decode,
    diffusion_decode,
)
from .drafter_ar2dlm import DraftAdapter, find_adapter_folder, read_adapter
from .speculation_ar2dlm import linear_spec_decode, quadratic_spec_decode

DEFAULT_THRESHOLD = 0.9
SERVED_CLEAN_PATTERN = "causal"  # the clean stream a causal prefix cache reproduces (config.clean_pattern)


class TriModeMixin:
    """AR, diffusion and self-speculative decoding on top of a family's causal LM."""

    hf_generate = GenerationMixin.generate  # HF's own generate, shadowed by the diffusion `generate`
    _use_prefix_cache: bool = True  # False recomputes the whole prefix every forward (reference path)

    @torch.no_grad()
    def ar_generate(self, input_ids, max_new_tokens, temperature=0.0, eos_token_id=None, attention_mask=None,
                    return_stats=False):
        """Autoregressive decoding: prefill (gives the first token), then one token per forward."""
        input_ids, attention_mask, settings = self._prepare(
            input_ids, attention_mask, max_new_tokens, temperature, eos_token_id, needs_mask=False)
        return _result(*ar_decode(self, input_ids, attention_mask, settings), return_stats)

    def generate(self, input_ids=None, max_new_tokens=None, block_length=None, threshold=None, temperature=None,
                 eos_token_id=None, attention_mask=None, return_stats=False, sub_block_length=None,
                 confidence=None, position_decay=None, **hf_kwargs):
        """Block-diffusion decoding (docs/design.md §4.4) when called with NLD's arguments only; defaults:
        ``config.block_size``, ``config.diffusion_threshold`` (0.9), temperature 0.

        Decoding levers (§4.4): ``sub_block_length`` commits only inside the leftmost unfinished sub-block of
        that many positions (None: the whole block); ``confidence`` ranks masked positions by ``"probability"``
        (default) or ``"position"``: the probability times ``position_decay`` (default 0.9) to the power of the
        distance from the leftmost masked position.

        A call in HF's style (any other argument, e.g. ``do_sample``, ``generation_config``, ``max_length``,
        ``num_beams``, ``streamer``; or no ``max_new_tokens``) runs HF's ``GenerationMixin.generate`` and
        returns what it returns, so ``model.generate(**enc, do_sample=False)`` and ``pipeline`` work.
        HF's generate is also ``hf_generate``."""
        if isinstance(max_new_tokens, GenerationConfig):  # HF's second positional argument
            hf_kwargs["generation_config"], max_new_tokens = max_new_tokens, None
        if hf_kwargs or max_new_tokens is None:
            if return_stats:
                raise ValueError("return_stats applies to diffusion decoding, not to a call in HF's style")
            named = dict(max_new_tokens=max_new_tokens, block_length=block_length, threshold=threshold,
                         temperature=temperature, eos_token_id=eos_token_id, attention_mask=attention_mask,
                         sub_block_length=sub_block_length, confidence=confidence, position_decay=position_decay)
            return self.hf_generate(input_ids, **{k: v for k, v in named.items() if v is not None}, **hf_kwargs)
        levers = _diffusion_levers(sub_block_length, confidence, position_decay)
        sequences, stats = self._diffusion_generate(input_ids, max_new_tokens, block_length, threshold,
                                                    0.0 if temperature is None else temperature, eos_token_id,
                                                    attention_mask, levers)
        return _result(sequences, stats, return_stats)

    @torch.no_grad()
    def _diffusion_generate(self, input_ids, max_new_tokens, block_length, threshold, temperature, eos_token_id,
                            attention_mask, levers) -> tuple[torch.Tensor, DecodeStats]:
        block_length = self._default_block_length(block_length)
        if threshold is None:
            threshold = getattr(self.config, "diffusion_threshold", DEFAULT_THRESHOLD)
        _check_block_length(block_length)
        if not isinstance(threshold, (int, float)) or not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {threshold!r}")
        input_ids, attention_mask, settings = self._prepare(
            input_ids, attention_mask, max_new_tokens, temperature, eos_token_id, needs_mask=True,
            block_length=block_length, threshold=float(threshold), **levers)
        return diffusion_decode(self, input_ids, attention_mask, settings)

    @torch.no_grad()
    def linear_spec_generate(self, input_ids, max_new_tokens, block_length=None, temperature=0.0,
                             eos_token_id=None, attention_mask=None, return_stats=False, use_drafter=None):
        """Self-speculation: draft a block in one bidirectional pass, verify it in one causal pass.

        ``use_drafter``: draft with the export's drafter LoRA (``linear_spec_lora/``) when there is one (None,
        the default), or never (False), or require it (True). Only draft tokens see it: the output stays AR's."""
        block_length = self._default_block_length(block_length)
        _check_block_length(block_length)
        input_ids, attention_mask, settings = self._prepare(
            input_ids, attention_mask, max_new_tokens, temperature, eos_token_id, needs_mask=True,
            block_length=block_length)
        return _result(*linear_spec_decode(self, input_ids, attention_mask, settings, self._drafter(use_drafter)),
                       return_stats)

    @torch.no_grad()
    def quadratic_spec_generate(self, input_ids, max_new_tokens, block_length=None, temperature=0.0,
                                eos_token_id=None, attention_mask=None, return_stats=False, draft_length=None,
                                use_drafter=None):
        """Quadratic self-speculation (docs/design.md §4.6): one forward per cycle verifies the draft
        ``[seed, d_1 .. d_k]`` and drafts the next cycle for every acceptance length at once, so it holds
        (k + 1)(k + 2) tokens. ``draft_length`` = k, at most ``block_length - 1`` (the default); a smaller k makes
        the shared forward cheaper where compute, not memory bandwidth, bounds it (a CPU). ``use_drafter``: as
        in :meth:`linear_spec_generate` (the mask blocks see the drafter, the draft being verified never does)."""
        block_length = self._default_block_length(block_length)
        if isinstance(block_length, bool) or not isinstance(block_length, int) or block_length < 2:
            raise ValueError(f"quadratic self-speculation needs block_length >= 2 (a seed and a draft), "
                             f"got {block_length!r}")
        draft_length = block_length - 1 if draft_length is None else draft_length
        if (isinstance(draft_length, bool) or not isinstance(draft_length, int)
                or not 1 <= draft_length <= block_length - 1):
            raise ValueError(f"draft_length must be an integer in [1, block_length - 1 = {block_length - 1}], "
                             f"got {draft_length!r}")
        input_ids, attention_mask, settings = self._prepare(
            input_ids, attention_mask, max_new_tokens, temperature, eos_token_id, needs_mask=True,
            block_length=block_length)
        drafter = self._drafter(use_drafter)
        return _result(*quadratic_spec_decode(self, input_ids, attention_mask, settings, draft_length, drafter),
                       return_stats)

    def has_drafter(self) -> bool:
        """Whether the folder the model was loaded from has a drafter LoRA (``linear_spec_lora/``)."""
        return self._drafter(None) is not None

    def _drafter(self, use_drafter) -> DraftAdapter | None:
        """The drafter LoRA of the folder the model was loaded from (read once), per ``use_drafter``."""
        if use_drafter not in (None, True, False):
            raise ValueError(f"use_drafter must be None, True or False, got {use_drafter!r}")
        if use_drafter is False:
            return None
        if not hasattr(self, "_draft_adapter"):
            folder = find_adapter_folder(self)
            self._draft_adapter = None
            if folder is not None:
                self._draft_adapter = DraftAdapter(self, *read_adapter(folder), source=str(folder))
        if use_drafter and self._draft_adapter is None:
            raise ValueError("use_drafter=True but this model has no drafter (no linear_spec_lora/ folder next to "
                             "its weights)")
        return self._draft_adapter

    def _prepare(self, input_ids, attention_mask, max_new_tokens, temperature, eos_token_id, *,
                 needs_mask: bool, **extra) -> tuple[torch.Tensor, torch.Tensor, DecodeSettings]:
        """Check the arguments (ValueError) and resolve the defaults from the config."""
        if not isinstance(input_ids, torch.Tensor) or input_ids.ndim != 2 or input_ids.shape[1] == 0:
            raise ValueError("input_ids must be a non-empty 2D tensor [batch, prompt_length]")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
        if not isinstance(temperature, (int, float)) or temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature!r}")
        input_ids = input_ids.to(self.device)
        attention_mask = _check_attention_mask(input_ids, attention_mask)
        context = getattr(self.config, "max_position_embeddings", None)
        longest = int(attention_mask.sum(1).max())
        if context is not None and longest + max_new_tokens > context:
            raise ValueError(f"prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) exceeds the "
                             f"context window ({context})")
        block_length = extra.get("block_length", 1)
        if context is not None and block_length > context:
            raise ValueError(f"block_length ({block_length}) exceeds the context window ({context})")
        mask_id = getattr(self.config, "mask_token_id", None)
        if needs_mask:
            if mask_id is None:
                raise ValueError("config.mask_token_id is not set: this checkpoint was not exported by ar2dlm")
            _check_clean_pattern(self.config)
        eos_ids = eos_token_ids(self, eos_token_id)
        pad_id = self.config.pad_token_id
        if pad_id is None:
            pad_id = eos_ids[0] if eos_ids else 0
        settings = DecodeSettings(max_new_tokens=max_new_tokens, temperature=float(temperature),
                                  eos_ids=eos_ids, pad_id=pad_id, mask_id=mask_id,
                                  use_prefix_cache=self._use_prefix_cache, **extra)
        return input_ids, attention_mask, settings

    def _default_block_length(self, block_length):
        if block_length is not None:
            return block_length
        if getattr(self.config, "block_size", None) is None:
            raise ValueError("block_length not given and config.block_size is not set")
        return self.config.block_size


def eos_token_ids(model, eos_token_id=None) -> tuple[int, ...]:
    """The ids decoding stops at: ``eos_token_id`` if given, else the model's generation config's, else its
    config's (empty: none)."""
    if eos_token_id is None:
        eos_token_id = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos_token_id is None:
        eos_token_id = model.config.eos_token_id
    if eos_token_id is None:
        return ()
    ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise ValueError(f"eos_token_id must be an int or a list of ints, got {eos_token_id!r}")
    return tuple(ids)


def _result(sequences: torch.Tensor, stats: DecodeStats, return_stats: bool):
    """``(sequences, stats)`` when asked, else the public ``(sequences, nfe)``."""
    return (sequences, stats) if return_stats else (sequences, stats.nfe)


def _check_clean_pattern(config) -> None:
    """Diffusion and self-speculation read a causal prefix cache: refuse a model trained for another one."""
    pattern = getattr(config, "clean_pattern", None) or SERVED_CLEAN_PATTERN  # exports before ar2dlm kept it
    if pattern != SERVED_CLEAN_PATTERN:
        raise ValueError(f"this model was trained with the clean-stream pattern {pattern!r} (config.clean_pattern): "
                         f"diffusion and self-speculation decode over a {SERVED_CLEAN_PATTERN!r} prefix cache, which "
                         f"it was not trained to read; only ar_generate serves it")


def _diffusion_levers(sub_block_length, confidence, position_decay) -> dict:
    """The checked decoding levers of ``generate`` as DecodeSettings fields (None: the default)."""
    if sub_block_length is not None and (isinstance(sub_block_length, bool) or not isinstance(sub_block_length, int)
                                         or sub_block_length < 1):
        raise ValueError(f"sub_block_length must be None or an integer >= 1, got {sub_block_length!r}")
    confidence = CONFIDENCES[0] if confidence is None else confidence
    if confidence not in CONFIDENCES:
        raise ValueError(f"confidence must be one of {', '.join(CONFIDENCES)}, got {confidence!r}")
    position_decay = DEFAULT_POSITION_DECAY if position_decay is None else position_decay
    if isinstance(position_decay, bool) or not isinstance(position_decay, (int, float)) or not 0 < position_decay <= 1:
        raise ValueError(f"position_decay must be in (0, 1], got {position_decay!r}")
    return dict(sub_block_length=sub_block_length, confidence=confidence, position_decay=float(position_decay))


def _check_block_length(block_length) -> None:
    if isinstance(block_length, bool) or not isinstance(block_length, int) or block_length < 1:
        raise ValueError(f"block_length must be an integer >= 1, got {block_length!r}")


def _check_attention_mask(input_ids: torch.Tensor, attention_mask) -> torch.Tensor:
    """A [B, S] 0/1 mask with left padding only and at least one real token per row."""
    if attention_mask is None:
        return torch.ones_like(input_ids)
    attention_mask = attention_mask.to(input_ids.device).long()
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} != input_ids shape "
                         f"{tuple(input_ids.shape)}")
    if bool(((attention_mask != 0) & (attention_mask != 1)).any()):
        raise ValueError("attention_mask must hold only 0 and 1")
    if bool((attention_mask[:, 1:] < attention_mask[:, :-1]).any()) or not bool(attention_mask[:, -1].all()):
        raise ValueError("attention_mask must be left-padded (padding first, then the real tokens)")
    return attention_mask


class Ar2dlmLlamaForCausalLM(TriModeMixin, LlamaForCausalLM):
    """Llama with AR, diffusion and self-speculative decoding."""


class Ar2dlmQwen2ForCausalLM(TriModeMixin, Qwen2ForCausalLM):
    """Qwen2 with AR, diffusion and self-speculative decoding."""


class Ar2dlmQwen3ForCausalLM(TriModeMixin, Qwen3ForCausalLM):
    """Qwen3 with AR, diffusion and self-speculative decoding."""


class Ar2dlmMistralForCausalLM(TriModeMixin, MistralForCausalLM):
    """Mistral with AR, diffusion and self-speculative decoding."""


RUNTIME_CLASSES = {
    "LlamaForCausalLM": Ar2dlmLlamaForCausalLM,
    "Qwen2ForCausalLM": Ar2dlmQwen2ForCausalLM,
    "Qwen3ForCausalLM": Ar2dlmQwen3ForCausalLM,
    "MistralForCausalLM": Ar2dlmMistralForCausalLM,
}
