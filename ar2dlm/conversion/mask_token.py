"""Choose the diffusion mask token (docs/design.md §2.5).

In order of preference: the id the user asked for; the tokenizer's own mask token; an unused
special token the tokenizer already has (Qwen's ``<|fim_pad|>``, Llama 3's reserved tokens, ...);
otherwise a new ``<|mask|>`` token, which takes a padded embedding row if the checkpoint has one and
grows the vocabulary by one row if not (new rows are initialised to the mean embedding).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ar2dlm.errors import UserError

NEW_MASK_TOKEN = "<|mask|>"
# Special tokens that ship unused in common tokenizers, most preferred first.
_UNUSED_SPECIAL_PATTERNS = (
    re.compile(r"^<\|fim_pad\|>$"),
    re.compile(r"^<\|mask\|>$|^<mask>$|^\[MASK\]$"),
    re.compile(r"^<\|reserved_special_token_\d+\|>$"),
    re.compile(r"^<SPECIAL_\d+>$|^<unused\d+>$|^\[unused\d+\]$"),
)


@dataclass(frozen=True)
class MaskTokenChoice:
    token_id: int
    token: str | None
    reason: str  # requested | tokenizer mask token | unused special token | new token
    vocab_size: int  # the model's vocabulary size after the choice (grows by one for a new row)
    added_to_tokenizer: bool = False

    def describe(self, old_vocab_size: int) -> str:
        name = f" {self.token!r}" if self.token else ""
        grown = f"; vocabulary grown {old_vocab_size} -> {self.vocab_size}" if self.vocab_size > old_vocab_size else ""
        return f"mask token id {self.token_id}{name} ({self.reason}){grown}"


def _in_use_ids(tokenizer) -> set[int]:
    named = ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id", "sep_token_id", "cls_token_id")
    used = {getattr(tokenizer, name) for name in named} - {None}
    template = getattr(tokenizer, "chat_template", None) or ""
    for token_id, added in tokenizer.added_tokens_decoder.items():
        if added.content in template:
            used.add(token_id)
    return used


def _unused_special_token(tokenizer, vocab_size: int) -> tuple[int, str] | None:
    in_use = _in_use_ids(tokenizer)
    candidates = [(i, t.content) for i, t in sorted(tokenizer.added_tokens_decoder.items())
                  if t.special and i not in in_use and i < vocab_size]
    for pattern in _UNUSED_SPECIAL_PATTERNS:
        for token_id, content in candidates:
            if pattern.match(content):
                return token_id, content
    return None


def choose_mask_token(tokenizer, vocab_size: int, requested: int | None = None) -> MaskTokenChoice:
    """Pick the mask token; adds ``<|mask|>`` to ``tokenizer`` when no existing token fits."""
    if requested is not None:
        if not 0 <= requested < vocab_size:
            raise UserError(f"mask_token_id={requested} is out of range: the vocabulary has {vocab_size} ids (0..{vocab_size - 1})")
        return MaskTokenChoice(requested, tokenizer.convert_ids_to_tokens(requested) if requested < len(tokenizer) else None,
                               "requested", vocab_size)
    if tokenizer.mask_token_id is not None and tokenizer.mask_token_id < vocab_size:
        return MaskTokenChoice(tokenizer.mask_token_id, tokenizer.mask_token, "tokenizer mask token", vocab_size)
    unused = _unused_special_token(tokenizer, vocab_size)
    if unused is not None:
        return MaskTokenChoice(unused[0], unused[1], "unused special token", vocab_size)
    tokenizer.add_special_tokens({"mask_token": NEW_MASK_TOKEN})
    token_id = tokenizer.mask_token_id
    reason = "new token in a padded embedding row" if token_id < vocab_size else "new token"
    return MaskTokenChoice(token_id, NEW_MASK_TOKEN, reason, max(vocab_size, token_id + 1), added_to_tokenizer=True)
