"""``data`` config -> packed train and validation datasets.

Each source is read and tokenised on its own (indexed datasets are memory-mapped, not read), its documents
split into train / validation, and packed into rows; the train rows of all sources are then blended by weight
(:mod:`ar2dlm.data.blend`). Text sources are tokenised in memory at every start: for large corpora run
``ar2dlm data prepare`` once and train from the indexed dataset it writes.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np

from ar2dlm.data.blend import PackedDataset
from ar2dlm.data.indexed import load_indexed
from ar2dlm.data.packing import PackedSource
from ar2dlm.data.sft import encode_conversations
from ar2dlm.data.sources import ReadStats, Record, iter_records, list_files, log_read_stats, resolve_kind
from ar2dlm.data.tokenize import (
    DEFAULT_MAX_DOCUMENT_CHARS,
    EncodedBatch,
    TokenStore,
    encode_prompted,
    encode_records,
    encode_texts,
    eos_id,
    fill_to_block,
    pad_id,
    store_from_batches,
)
from ar2dlm.errors import UserError
from ar2dlm.log import logger, progress

_VALIDATION_STREAM = 7919  # keeps the validation split's randomness apart from the sample order's


def load_store(source, tokenizer, *, sft: bool, strict: bool, block_size: int,
               max_document_chars: int = DEFAULT_MAX_DOCUMENT_CHARS, batch_size: int = 1000,
               eos_fill_to_block: bool = False) -> TokenStore:
    """Every document of ``source``, tokenised (or memory-mapped, for an indexed dataset); with
    ``eos_fill_to_block`` each text document ends with EOS up to a multiple of ``block_size``."""
    if resolve_kind(source) == "indexed":
        _refuse_indexed_sft(source, sft)
        _refuse_indexed_fill(source, eos_fill_to_block)
        _refuse_indexed_prompts(source)
        store = load_indexed(source.path, tokenizer)
    else:
        stats = ReadStats()
        records = progress(iter_records(source, sft=sft, strict=strict, stats=stats),
                           desc=f"tokenizing {source.path}", unit="doc")
        encoder = _encoder(tokenizer, sft, block_size, max_document_chars, eos_fill_to_block,
                           prompted=bool(source.prompt_field))
        batches = encode_records(records, encoder, batch_size)
        store = store_from_batches(batches, eos_id(tokenizer))
        log_read_stats(str(source.path), stats)
    if not len(store):
        raise UserError(f"data source {source.path} has no documents")
    return store


def _encoder(tokenizer, sft: bool, block_size: int, max_chars: int, eos_fill_to_block: bool = False,
             prompted: bool = False) -> Callable[[list[Record]], EncodedBatch]:
    """Batch of records -> tokens: chats (SFT, their responses always filled to a block end), prompt / completion
    pairs or plain texts."""
    if sft:
        return partial(encode_conversations, tokenizer, block_size=block_size, max_chars=max_chars)
    eos = eos_id(tokenizer)

    def encode(batch: list[Record]) -> EncodedBatch:
        encoded = (encode_prompted(tokenizer, batch, max_chars) if prompted
                   else encode_texts(tokenizer, [record.value for record in batch], max_chars))
        return fill_to_block(encoded, block_size, eos) if eos_fill_to_block else encoded

    return encode


def split_validation(store: TokenStore, fraction: float, seed: int,
                     index: int) -> tuple[TokenStore, TokenStore | None]:
    """Hold out ``round(fraction * documents)`` documents (at least one), chosen by (seed, source index)."""
    if fraction <= 0:
        return store, None
    count = len(store)
    held = min(max(1, round(fraction * count)), count - 1)
    if held < 1:
        raise UserError(f"validation_fraction={fraction}: a source with {count} document(s) cannot be split")
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(seed) & (2**63 - 1),
                                                                       _VALIDATION_STREAM, index])))
    chosen = np.zeros(count, dtype=bool)
    chosen[rng.choice(count, size=held, replace=False)] = True
    return store.subset(np.flatnonzero(~chosen)), store.subset(np.flatnonzero(chosen))


def _layout(data_cfg) -> str:
    if not data_cfg.pack:
        return "pad"
    return "whole" if data_cfg.sft else "stream"


def _eval_source(data_cfg):
    from omegaconf import OmegaConf

    first = data_cfg.sources[0]
    eval_cfg = OmegaConf.to_container(first)
    eval_cfg.update(path=data_cfg.eval_path, kind="auto", weight=1.0, max_documents=None)
    return OmegaConf.create(eval_cfg)


def _check_data_config(data_cfg) -> None:
    if not data_cfg.sources:
        raise UserError("data.sources is empty: give at least one source (data.sources=[{path: ...}])")
    weights = [float(s.weight) for s in data_cfg.sources]
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise UserError(f"data.sources weights {weights} must be >= 0 and sum to a positive number")
    if data_cfg.eval_path and data_cfg.validation_fraction > 0:
        raise UserError("set either data.eval_path or data.validation_fraction, not both")


def check_sources(data_cfg) -> None:
    """Fail in seconds, before a model loads, on what can be known without a tokenizer: every source (and
    ``data.eval_path``) exists, has a format it can be read as, its files open, and its first document has the
    field training reads. A hub dataset given by name is not downloaded here."""
    _check_data_config(data_cfg)
    sources = list(data_cfg.sources) + ([_eval_source(data_cfg)] if data_cfg.eval_path else [])
    for source in sources:
        kind = resolve_kind(source)
        if kind == "indexed":
            _refuse_indexed_sft(source, data_cfg.sft)
            _refuse_indexed_fill(source, data_cfg.eos_fill_to_block)
            _refuse_indexed_prompts(source)
            continue
        if kind == "hub" and not Path(source.path).expanduser().exists():
            continue
        if kind == "files":
            for path, _ in list_files(source):
                try:
                    path.open("rb").close()
                except OSError as error:
                    raise UserError(f"data source {path} cannot be read: {error.strerror}") from None
        records = iter_records(source, sft=data_cfg.sft, strict=data_cfg.strict, stats=ReadStats())
        first = next(records, None)
        records.close()
        if first is None:
            raise UserError(f"data source {source.path} has no documents")


def _refuse_indexed_sft(source, sft: bool) -> None:
    if sft:
        raise UserError(f"data source {source.path}: an indexed dataset holds pretokenised text without "
                        "loss masks; SFT needs chat records (JSONL, Parquet or a dataset)")


def _refuse_indexed_fill(source, eos_fill_to_block: bool) -> None:
    if eos_fill_to_block:
        raise UserError(f"data source {source.path}: data.eos_fill_to_block needs the documents' text (JSONL, "
                        "Parquet, text files or a dataset); an indexed dataset is already tokenised and packed "
                        "without the fill")


def _refuse_indexed_prompts(source) -> None:
    if source.prompt_field:
        raise UserError(f"data source {source.path}: prompt_field={source.prompt_field!r} needs prompt / completion "
                        "records (JSONL, Parquet or a dataset); an indexed dataset holds tokens without loss masks")


def build_datasets(data_cfg, tokenizer, *, seq_length: int, block_size: int,
                   seed: int) -> tuple[PackedDataset, PackedDataset | None]:
    """The packed (train, validation) datasets of ``data_cfg`` (validation None when there is none)."""
    _check_data_config(data_cfg)
    sources = list(data_cfg.sources)
    weights = [float(s.weight) for s in sources]
    layout, pad = _layout(data_cfg), pad_id(tokenizer)
    options = dict(sft=data_cfg.sft, strict=data_cfg.strict, block_size=block_size,
                   max_document_chars=data_cfg.max_document_chars, eos_fill_to_block=data_cfg.eos_fill_to_block)
    train, validation = [], []
    for index, source in enumerate(sources):
        store = load_store(source, tokenizer, **options)
        train_store, held_out = split_validation(store, data_cfg.validation_fraction, seed, index)
        train.append(_packed(train_store, seq_length, layout, pad, str(source.path)))
        if held_out is not None:
            validation.append(_packed(held_out, seq_length, layout, pad, f"{source.path} (validation)"))
    if data_cfg.eval_path:
        eval_source = _eval_source(data_cfg)
        validation.append(_packed(load_store(eval_source, tokenizer, **options), seq_length, layout, pad,
                                  f"{data_cfg.eval_path} (evaluation)"))
    train_set = PackedDataset(train, weights)
    if len(train) > 1:
        shares = ", ".join(f"{s.name}: {n}" for s, n in zip(train, train_set.counts, strict=True))
        logger.info("blend: %d samples per epoch (%s)", len(train_set), shares)
    return train_set, PackedDataset(validation, [len(v) for v in validation]) if validation else None


def _packed(store: TokenStore, seq_length: int, layout: str, pad: int, name: str) -> PackedSource:
    packed = PackedSource(store, seq_length, layout, pad, name)
    logger.info("%s: %s", name, packed.stats.describe(seq_length))
    if packed.stats.split_documents:
        logger.info("%s: %d document(s) longer than seq_length=%d were split across rows", name,
                    packed.stats.split_documents, seq_length)
    return packed
