"""The decoding modes by the names that `generate`, `eval` and the lm-eval adapter take, and the runtime call
each one makes."""

from __future__ import annotations

MODES: tuple[str, ...] = ("ar", "diffusion", "self_spec", "quad_spec")
SPECULATIVE_MODES: tuple[str, ...] = ("self_spec", "quad_spec")  # lossless: the same tokens as AR
LEVERS: tuple[str, ...] = ("sub_block_length", "confidence", "position_decay")  # diffusion's, docs/design.md §4.4


def diffusion_levers(cfg) -> dict:
    """The diffusion decoding levers of a `generate` or `eval` config as keyword arguments of :func:`decode`
    (a key the config lacks: None, the runtime's default)."""
    return {key: cfg.get(key) for key in LEVERS}


def decode(model, mode: str, input_ids, max_new_tokens: int, *, block_length: int | None = None,
           threshold: float | None = None, temperature: float = 0.0, attention_mask=None,
           sub_block_length: int | None = None, confidence: str | None = None, position_decay: float | None = None,
           draft_length: int | None = None, use_drafter: bool | None = None):
    """One runtime call in ``mode`` (``block_length`` for every mode but AR; ``threshold``, ``sub_block_length``,
    ``confidence`` and ``position_decay`` for diffusion; ``draft_length`` for quad_spec; ``use_drafter`` for both
    self-speculation modes; None: the runtime's default): ``(sequences, stats)``, the call's ``DecodeStats``."""
    if mode == "ar":
        return model.ar_generate(input_ids, max_new_tokens, temperature=temperature, attention_mask=attention_mask,
                                 return_stats=True)
    if mode == "diffusion":
        return model.generate(input_ids, max_new_tokens, block_length=block_length, threshold=threshold,
                              temperature=temperature, attention_mask=attention_mask, return_stats=True,
                              sub_block_length=sub_block_length, confidence=confidence,
                              position_decay=position_decay)
    if mode == "self_spec":
        return model.linear_spec_generate(input_ids, max_new_tokens, block_length=block_length,
                                          temperature=temperature, attention_mask=attention_mask, return_stats=True,
                                          use_drafter=use_drafter)
    if mode == "quad_spec":
        return model.quadratic_spec_generate(input_ids, max_new_tokens, block_length=block_length,
                                             draft_length=draft_length, temperature=temperature,
                                             attention_mask=attention_mask, return_stats=True,
                                             use_drafter=use_drafter)
    raise ValueError(f"mode {mode!r} is not one of: {', '.join(MODES)}")
