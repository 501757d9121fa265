"""Batched tokenisation with the checkpoint's HF (fast) tokenizer, and the token store that packing reads.

A text document is tokenised with the tokenizer's own special tokens (``add_special_tokens=True``: a BOS for
the families that use one) and always ends with EOS, which separates it from the next document.

No tokenizer call sees more than ``max_chars`` characters (``data.max_document_chars``): a fast tokenizer
holds ~100+ bytes per character while it works, so a longer document is cut into pieces before a
whitespace, tokenised piece by piece and concatenated (special tokens of the first piece, one EOS at the end).

A prompt / completion record (``prompt_field`` of a source) is its prompt, out of the loss, then its
completion and EOS, in it: what a model sees and writes when it answers that prompt.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import islice

import numpy as np

from ar2dlm.data.sources import Record
from ar2dlm.errors import UserError
from ar2dlm.log import logger

TOKEN_DTYPE = np.int32
DEFAULT_MAX_DOCUMENT_CHARS = 1_000_000  # the default of data.max_document_chars
_WHITESPACE = " \n\t\r\f\v"


def load_tokenizer(path: str):
    """The HF tokenizer at ``path`` (a local folder, or a hub name when the hub is reachable)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
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
    loss_mask: np.ndarray | None = None  # per token (SFT, prompt / completion); None: every token is in the loss


def split_text(text: str, max_chars: int) -> Iterator[str]:
    """``text`` in consecutive pieces of at most ``max_chars`` characters, each cut just before the last
    whitespace that fits (so the next piece starts with it, as a pre-tokenizer would split), else hard."""
    start = 0
    while len(text) - start > max_chars:
        end = start + max_chars
        cut = max(text.rfind(space, start + 1, end + 1) for space in _WHITESPACE)
        cut = cut if cut > start else end
        yield text[start:cut]
        start = cut
    yield text[start:] if start else text


def char_bounded_groups(items: Iterable, size: Callable[[object], int], max_chars: int) -> Iterator[list]:
    """Consecutive groups of ``items`` of at most ``max_chars`` characters in all (an item longer than that
    alone)."""
    group, total = [], 0
    for item in items:
        if group and total + size(item) > max_chars:
            yield group
            group, total = [], 0
        group.append(item)
        total += size(item)
    if group:
        yield group


def _token_ids(tokenizer, texts: Sequence[str], special: bool) -> list[np.ndarray]:
    ids = tokenizer(list(texts), add_special_tokens=special, return_attention_mask=False,
                    return_token_type_ids=False, verbose=False)["input_ids"] if texts else []
    return [np.asarray(sequence, dtype=TOKEN_DTYPE) for sequence in ids]


def encode_texts(tokenizer, texts: list[str], max_chars: int = DEFAULT_MAX_DOCUMENT_CHARS) -> EncodedBatch:
    """Tokenise a batch of texts, at most ``max_chars`` characters per tokenizer call, and end each with EOS.

    A text longer than ``max_chars`` becomes the concatenated tokens of its :func:`split_text` pieces: the
    first with the tokenizer's special tokens (less an EOS it ends with), the others without.
    """
    eos = eos_id(tokenizer)
    pieces = ((index, position, piece) for index, text in enumerate(texts)
              for position, piece in enumerate(split_text(text, max_chars)))
    documents: list[list[np.ndarray]] = [[] for _ in texts]
    for group in char_bounded_groups(pieces, lambda item: len(item[2]), max_chars):
        firsts = [item for item in group if item[1] == 0]
        later = [item for item in group if item[1] > 0]
        encoded = (_token_ids(tokenizer, [piece for _, _, piece in firsts], special=True)
                   + _token_ids(tokenizer, [piece for _, _, piece in later], special=False))
        for (index, _, _), ids in zip(firsts + later, encoded, strict=True):
            documents[index].append(ids)
    sequences = []
    for parts in documents:
        if len(parts) > 1 and len(parts[0]) and parts[0][-1] == eos:
            parts[0] = parts[0][:-1]
        sequence = np.concatenate(parts)
        if not len(sequence) or sequence[-1] != eos:
            sequence = np.append(sequence, np.asarray(eos, dtype=TOKEN_DTYPE))
        sequences.append(sequence)
    lengths = np.fromiter(map(len, sequences), dtype=np.int64, count=len(sequences))
    tokens = np.concatenate(sequences) if sequences else np.zeros(0, TOKEN_DTYPE)
    return EncodedBatch(tokens, lengths)


def encode_prompted(tokenizer, records: list[Record], max_chars: int = DEFAULT_MAX_DOCUMENT_CHARS) -> EncodedBatch:
    """Tokenise (prompt, completion) records: the prompt as inference encodes one (alone, with the tokenizer's
    special tokens, less an EOS it ends with) out of the loss, then the completion's tokens and one EOS in it.

    A pair cannot be cut without losing its prompt: one longer than ``max_chars`` characters is refused.
    """
    for record in records:
        if sum(map(len, record.value)) > max_chars:
            raise UserError(f"{record.where}: the prompt and completion have {sum(map(len, record.value)):,} "
                            f"characters, more than data.max_document_chars={max_chars:,}; a pair cannot be split "
                            "into pieces: shorten or drop it, or raise data.max_document_chars")
    eos = np.asarray([eos_id(tokenizer)], dtype=TOKEN_DTYPE)
    sequences, masks = [], []
    for group in char_bounded_groups(records, lambda record: sum(map(len, record.value)), max_chars):
        prompts = _token_ids(tokenizer, [record.value[0] for record in group], special=True)
        completions = _token_ids(tokenizer, [record.value[1] for record in group], special=False)
        for prompt, completion in zip(prompts, completions, strict=True):
            if len(prompt) and prompt[-1] == eos[0]:
                prompt = prompt[:-1]
            sequences.append(np.concatenate([prompt, completion, eos]))
            masks.append(np.arange(len(sequences[-1])) >= len(prompt))
    lengths = np.fromiter(map(len, sequences), dtype=np.int64, count=len(sequences))
    return EncodedBatch(np.concatenate(sequences), lengths, np.concatenate(masks))


def fill_to_block(batch: EncodedBatch, block_size: int, eos: int) -> EncodedBatch:
    """Each document of ``batch`` followed by EOS tokens up to a multiple of ``block_size``, the fill in the loss.

    Training counts diffusion blocks from each document's start and cuts the last block at the document's end, so
    without the fill no block ever holds positions after an answer's end, while a decoded block of B masks runs
    past it: the fill teaches the model to write the EOS there (what SFT does to responses, data/sft.py).
    """
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    fills = -batch.lengths % block_size
    ends = np.cumsum(batch.lengths)
    tokens = np.insert(batch.tokens, np.repeat(ends, fills), np.asarray(eos, dtype=batch.tokens.dtype))
    loss_mask = None if batch.loss_mask is None else np.insert(batch.loss_mask, np.repeat(ends, fills), True)
    return EncodedBatch(tokens, batch.lengths + fills, loss_mask)


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
