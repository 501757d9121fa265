"""Megatron indexed datasets (``PREFIX.bin`` / ``PREFIX.idx``), read and written with megatron-core's
``IndexedDataset`` / ``IndexedDatasetBuilder``.

ar2dlm writes one sequence per document, each ending with EOS (Megatron's ``--append-eod`` convention), plus a
small ``PREFIX.ar2dlm.json`` naming the tokenizer, so that training with another tokenizer is refused. Indexed
datasets written by other tools are read as they are: a document may span several sequences, and one that
does not end with EOS gets one appended when packed.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ar2dlm.data.sources import indexed_prefix
from ar2dlm.data.tokenize import EncodedBatch, TokenStore, eos_id
from ar2dlm.errors import UserError

META_SUFFIX = ".ar2dlm.json"


@dataclass
class IndexedMeta:
    tokenizer: str
    vocab_size: int
    eos_token_id: int
    documents: int = 0
    tokens: int = 0


def _megatron_indexed():
    """megatron-core's indexed_dataset, imported without its "Transformer Engine not installed" noise."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        from megatron.core.datasets import indexed_dataset
    return indexed_dataset


def write_indexed(prefix: str, batches: Iterable[EncodedBatch], meta: IndexedMeta,
                  overwrite: bool = False) -> IndexedMeta:
    """Write every document of ``batches`` to ``prefix``.bin/.idx; the files appear only when complete."""
    megatron = _megatron_indexed()
    targets = [prefix + suffix for suffix in (".bin", ".idx", META_SUFFIX)]
    existing = [t for t in targets if os.path.exists(t)]
    if existing and not overwrite:
        raise UserError(f"output {existing[0]} exists (pass overwrite=true to replace it)")
    Path(prefix).parent.mkdir(parents=True, exist_ok=True)
    staging = f"{prefix}.partial-{os.getpid()}"
    dtype = megatron.DType.optimal_dtype(meta.vocab_size)
    builder = megatron.IndexedDatasetBuilder(staging + ".bin", dtype=dtype)
    try:
        for batch in batches:
            ends = np.cumsum(batch.lengths)
            for start, end in zip(ends - batch.lengths, ends, strict=True):
                builder.add_document(batch.tokens[start:end], [int(end - start)])
            meta.documents += len(batch.lengths)
            meta.tokens += int(batch.lengths.sum())
        builder.finalize(staging + ".idx")
        Path(staging + META_SUFFIX).write_text(json.dumps(asdict(meta), indent=1) + "\n")
    except BaseException:
        builder.data_file.close()
        for suffix in (".bin", ".idx", META_SUFFIX):
            Path(staging + suffix).unlink(missing_ok=True)
        raise
    for suffix, target in zip((".bin", ".idx", META_SUFFIX), targets, strict=True):
        os.replace(staging + suffix, target)
    return meta


def load_indexed(path: str, tokenizer) -> TokenStore:
    """The documents of an indexed dataset as a store over its memory-mapped .bin."""
    megatron = _megatron_indexed()
    prefix = indexed_prefix(path)
    if prefix is None:
        raise UserError(f"data source {path}: no Megatron indexed dataset there (need {path}.bin and "
                        f"{path}.idx)")
    _check_meta(prefix, tokenizer)
    try:
        dataset = megatron.IndexedDataset(prefix, mmap=True)
    except (AssertionError, ValueError, OSError) as error:
        raise UserError(f"{prefix}.idx: not a readable Megatron index ({error})".splitlines()[0]) from None
    index = dataset.index
    itemsize = np.dtype(index.dtype).itemsize
    lengths = np.array(index.sequence_lengths, dtype=np.int64)  # copies: the index closes its mmap
    documents = np.array(index.document_indices, dtype=np.int64)
    if os.path.getsize(megatron.get_bin_path(prefix)) < int(lengths.sum()) * itemsize:
        raise UserError(f"{megatron.get_bin_path(prefix)}: shorter than its index says (truncated?)")
    cumulative = np.concatenate([[0], np.cumsum(lengths)])
    doc_lengths = cumulative[documents[1:]] - cumulative[documents[:-1]]
    keep = np.flatnonzero(doc_lengths > 0)
    starts = np.array(index.sequence_pointers, dtype=np.int64)[documents[:-1][keep]] // itemsize
    ends = starts + doc_lengths[keep]
    tokens = np.memmap(megatron.get_bin_path(prefix), dtype=index.dtype, mode="r")
    eos = eos_id(tokenizer)
    needs_eos = np.asarray(tokens[ends - 1] != eos) if len(ends) else np.zeros(0, bool)
    return TokenStore(tokens, starts, ends, eos, needs_eos=needs_eos if needs_eos.any() else None)


def _check_meta(prefix: str, tokenizer) -> None:
    path = Path(prefix + META_SUFFIX)
    if not path.is_file():
        return
    meta = json.loads(path.read_text())
    if meta.get("vocab_size") != len(tokenizer) or meta.get("eos_token_id") != tokenizer.eos_token_id:
        raise UserError(f"{prefix}: prepared with tokenizer {meta.get('tokenizer')} (vocabulary "
                        f"{meta.get('vocab_size')}, EOS {meta.get('eos_token_id')}), but this run's "
                        f"tokenizer has vocabulary {len(tokenizer)}, EOS {tokenizer.eos_token_id}; "
                        "prepare it again")
