"""Batched tokenisation with the checkpoint's HF (fast) tokenizer, and the token store that packing reads.

A text document is tokenised with the tokenizer's own special tokens (``add_special_tokens=True``: a BOS for
the families that use one) and always ends with EOS, which separates it from the next document.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from itertools import chain, islice

import numpy as np

from ar2dlm.data.sources import Record
from ar2dlm.errors import UserError
from ar2dlm.log import logger

TOKEN_DTYPE = np.int32


def load_tokenizer(path: str):
    """The HF tokenizer at ``path`` (a local folder, or a hub name when the hub is reachable)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    except Exception as error:  # transformers raises many types for a missing/broken tokenizer
        raise UserError(f"cannot load the tokenizer {path}: {error}".splitlines()[0]) from None
    if not tokenizer.is_fast:
        logger.warning("tokenizer %s is not a fast (Rust) tokenizer: tokenisation will be slow", path)
    return tokenizer


def eos_id(tokenizer) -> int:
    if tokenizer.eos_token_id is None:
        raise UserError("the tokenizer has no EOS token; documents cannot be separated")
    return int(tokenizer.eos_token_id)


def pad_id(tokenizer) -> int:
    """The padding id: the tokenizer's pad token, else EOS (padding is never in the loss)."""
    return int(tokenizer.pad_token_id) if tokenizer.pad_token_id is not None else eos_id(tokenizer)


@dataclass
class EncodedBatch:
    """Tokenised documents, flat: ``tokens[offsets[i]:offsets[i+1]]`` is document i."""

    tokens: np.ndarray
    lengths: np.ndarray
    loss_mask: np.ndarray | None = None  # per token (SFT); None: every token is in the loss


def encode_texts(tokenizer, texts: list[str]) -> EncodedBatch:
    """Tokenise a batch of texts in one call and end each with EOS."""
    eos = eos_id(tokenizer)
    ids = tokenizer(texts, add_special_tokens=True, return_attention_mask=False, return_token_type_ids=False,
                    verbose=False)["input_ids"]
    for sequence in ids:
        if not sequence or sequence[-1] != eos:
            sequence.append(eos)
    lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
    tokens = np.fromiter(chain.from_iterable(ids), dtype=TOKEN_DTYPE, count=int(lengths.sum()))
    return EncodedBatch(tokens, lengths)


def encode_records(records: Iterable[Record], encode: Callable[[list[Record]], EncodedBatch],
                   batch_size: int = 1000) -> Iterator[EncodedBatch]:
    """``encode`` applied to consecutive batches of ``records``."""
    iterator = iter(records)
    while batch := list(islice(iterator, batch_size)):
        yield encode(batch)


@dataclass
class TokenStore:
    """Documents as ranges of one flat token array (in memory, or a memory-mapped Megatron .bin).

    ``needs_eos`` marks documents that do not end with EOS (e.g. from an indexed dataset written without
    ``--append-eod``): packing reads them with one EOS appended.
    """

    tokens: np.ndarray
    starts: np.ndarray
    ends: np.ndarray
    eos_id: int
    loss_mask: np.ndarray | None = None
    needs_eos: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.starts)

    @property
    def lengths(self) -> np.ndarray:
        """Document lengths as packing sees them (with the appended EOS)."""
        lengths = self.ends - self.starts
        return lengths + self.needs_eos if self.needs_eos is not None else lengths

    def read(self, doc: int, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """Tokens ``[start, stop)`` of document ``doc`` and their loss mask."""
        base, end = int(self.starts[doc]), int(self.ends[doc])
        tokens = np.asarray(self.tokens[base + start:min(base + stop, end)], dtype=np.int64)
        mask = (np.ones(len(tokens), dtype=bool) if self.loss_mask is None
                else np.asarray(self.loss_mask[base + start:min(base + stop, end)]))
        if base + stop > end:  # the appended EOS
            tokens, mask = np.append(tokens, self.eos_id), np.append(mask, True)
        return tokens, mask

    def subset(self, docs: np.ndarray) -> TokenStore:
        """The documents ``docs`` (indices, in that order) of this store; the tokens are shared."""
        return TokenStore(self.tokens, self.starts[docs], self.ends[docs], self.eos_id, self.loss_mask,
                          None if self.needs_eos is None else self.needs_eos[docs])

    @property
    def num_tokens(self) -> int:
        return int(self.lengths.sum())


def store_from_batches(batches: Iterable[EncodedBatch], eos: int) -> TokenStore:
    """One in-memory store holding every document of ``batches``."""
    batches = list(batches)
    lengths = np.concatenate([b.lengths for b in batches]) if batches else np.zeros(0, np.int64)
    ends = np.cumsum(lengths)
    tokens = np.concatenate([b.tokens for b in batches]) if batches else np.zeros(0, TOKEN_DTYPE)
    mask = None
    if batches and batches[0].loss_mask is not None:
        mask = np.concatenate([b.loss_mask for b in batches])
    return TokenStore(tokens, ends - lengths, ends, eos, mask)
