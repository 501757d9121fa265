"""`ar2dlm data prepare`: tokenise a text source once into a Megatron indexed dataset (``OUTPUT.bin/.idx``).

Each document becomes one sequence ending with EOS, so the document boundaries survive; training then
memory-maps the files instead of tokenising again (``data.sources=[{path: OUTPUT}]``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from omegaconf import DictConfig

from ar2dlm.data.indexed import IndexedMeta, write_indexed
from ar2dlm.data.sources import ReadStats, iter_records, log_read_stats, resolve_kind
from ar2dlm.data.tokenize import (
    DEFAULT_MAX_DOCUMENT_CHARS,
    encode_records,
    encode_texts,
    eos_id,
    load_tokenizer,
)
from ar2dlm.errors import UserError
from ar2dlm.log import progress


@dataclass
class PrepareResult:
    prefix: str
    documents: int
    tokens: int
    seconds: float


def prepare(source, tokenizer, output: str, *, tokenizer_name: str = "", overwrite: bool = False,
            strict: bool = False, batch_size: int = 1000,
            max_document_chars: int = DEFAULT_MAX_DOCUMENT_CHARS) -> PrepareResult:
    """Tokenise every document of ``source`` (text field) and write them to ``output``.bin/.idx."""
    start = time.perf_counter()
    if resolve_kind(source) == "indexed":
        raise UserError(f"data source {source.path} is already a Megatron indexed dataset")
    if batch_size < 1:
        raise UserError(f"batch_size={batch_size} must be >= 1")
    if source.prompt_field:
        raise UserError(f"data source {source.path}: prompt_field={source.prompt_field!r}: an indexed dataset holds "
                        "tokens without loss masks, so prompt / completion records train from their JSONL / "
                        "Parquet / dataset source directly")
    stats = ReadStats()
    records = progress(iter_records(source, sft=False, strict=strict, stats=stats),
                       desc=f"tokenizing {source.path}", unit="doc")
    batches = encode_records(records, lambda batch: encode_texts(tokenizer, [r.value for r in batch],
                                                                 max_document_chars), batch_size)
    meta = IndexedMeta(tokenizer=tokenizer_name or getattr(tokenizer, "name_or_path", ""),
                       vocab_size=len(tokenizer), eos_token_id=eos_id(tokenizer))
    meta = write_indexed(output, _non_empty(batches, source.path), meta, overwrite=overwrite)
    log_read_stats(str(source.path), stats)
    return PrepareResult(output, meta.documents, meta.tokens, time.perf_counter() - start)


def _non_empty(batches, path):
    """The batches, or a UserError (before anything is written) when the source has no documents."""
    batches = iter(batches)
    first = next(batches, None)
    if first is None:
        raise UserError(f"data source {path} has no documents")
    yield first
    yield from batches


def run_prepare(cfg: DictConfig) -> int:
    """CLI entry point of `ar2dlm data prepare`."""
    tokenizer = load_tokenizer(cfg.tokenizer)
    result = prepare(cfg.source, tokenizer, cfg.output, tokenizer_name=cfg.tokenizer, overwrite=cfg.overwrite,
                     strict=cfg.strict, batch_size=cfg.batch_size, max_document_chars=cfg.max_document_chars)
    rate = result.tokens / max(result.seconds, 1e-9)
    print(f"prepared {result.documents} documents, {result.tokens} tokens -> {result.prefix}.bin/.idx "
          f"in {result.seconds:.1f}s ({rate:,.0f} tokens/s)")
    return 0
