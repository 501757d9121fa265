"""The decoding modes by the names that `generate`, `eval` and the lm-eval adapter take, and the runtime call
each one makes."""

from __future__ import annotations

MODES: tuple[str, ...] = ("ar", "diffusion", "self_spec")


def decode(model, mode: str, input_ids, max_new_tokens: int, *, block_length: int | None = None,
           threshold: float | None = None, temperature: float = 0.0, attention_mask=None):
    """One runtime call in ``mode`` (``block_length`` for diffusion and self_spec, ``threshold`` for diffusion):
    ``(sequences, stats)``, the runtime's ``DecodeStats`` of the call."""
    if mode == "ar":
        return model.ar_generate(input_ids, max_new_tokens, temperature=temperature, attention_mask=attention_mask,
                                 return_stats=True)
    if mode == "diffusion":
        return model.generate(input_ids, max_new_tokens, block_length=block_length, threshold=threshold,
                              temperature=temperature, attention_mask=attention_mask, return_stats=True)
    if mode == "self_spec":
        return model.linear_spec_generate(input_ids, max_new_tokens, block_length=block_length,
                                          temperature=temperature, attention_mask=attention_mask, return_stats=True)
    raise ValueError(f"mode {mode!r} is not one of: {', '.join(MODES)}")
