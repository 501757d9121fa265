"""Read the documents of one ``data.sources`` entry: local text / JSONL / Parquet files and folders, or a
``datasets`` dataset (a hub name, or a local dataset folder), optionally streamed.

Every document carries where it was read (``file:line`` or ``... record N``), so that a bad one is named in
a one-line :class:`~ar2dlm.errors.UserError`. Megatron indexed datasets hold tokens, not text: see
:mod:`ar2dlm.data.indexed`.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

from ar2dlm.errors import UserError
from ar2dlm.log import logger

KINDS = ("auto", "text", "jsonl", "parquet", "hub", "indexed")
SUFFIX_KINDS = {".txt": "text", ".text": "text", ".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet"}
SAMPLE_BY = ("line", "document")
_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class Record:
    """One document: its text (a list of chat messages; a (prompt, completion) pair) and where it was read."""

    value: Any
    where: str


@dataclass
class ReadStats:
    """What reading a source skipped: documents with invalid UTF-8 and empty ones."""

    documents: int = 0
    invalid_utf8: int = 0
    first_invalid: str | None = None
    empty: int = 0

    def skip_invalid(self, where: str) -> None:
        self.invalid_utf8 += 1
        self.first_invalid = self.first_invalid or where


def resolve_kind(source) -> str:
    """The source's kind: ``indexed``, ``hub``, or ``files`` (local files, read by their suffix or kind)."""
    if source.kind not in KINDS:
        raise UserError(f"data source {source.path}: kind={source.kind!r} is not one of: {', '.join(KINDS)}")
    if source.kind == "indexed" or (source.kind == "auto" and indexed_prefix(source.path) is not None):
        return "indexed"
    if source.kind == "hub" or (source.kind == "auto" and _is_saved_dataset(Path(source.path).expanduser())):
        return "hub"
    if Path(source.path).expanduser().exists():
        return "files"
    looks_like_hub = _HUB_NAME.match(source.path) and Path(source.path).suffix not in SUFFIX_KINDS
    if source.kind == "auto" and looks_like_hub:
        return "hub"
    raise UserError(f"data source {source.path} does not exist")


def indexed_prefix(path: str | Path) -> str | None:
    """The prefix of the Megatron indexed dataset at ``path`` (the prefix, or its .bin/.idx file), else None."""
    text = str(Path(path).expanduser())
    prefix = text[:-4] if text.endswith((".bin", ".idx")) else text
    return prefix if os.path.isfile(prefix + ".bin") and os.path.isfile(prefix + ".idx") else None


def _is_saved_dataset(path: Path) -> bool:
    """A folder written by ``datasets``' ``save_to_disk``."""
    return (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file()


def list_files(source) -> list[tuple[Path, str]]:
    """The files of a local source, sorted, each with the kind that reads it."""
    path = Path(source.path).expanduser()
    if path.is_file():
        kind = source.kind if source.kind != "auto" else SUFFIX_KINDS.get(path.suffix.lower())
        if kind is None:
            raise UserError(f"data source {path}: cannot tell its format from the suffix {path.suffix!r}; "
                            "set kind to text, jsonl or parquet")
        return [(path, kind)]
    wanted = {s for s, k in SUFFIX_KINDS.items() if source.kind in ("auto", k)}
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in wanted)
    if not files:
        raise UserError(f"data source {path}: folder has no {', '.join(sorted(wanted))} files")
    return [(p, SUFFIX_KINDS[p.suffix.lower()]) for p in files]


def iter_records(source, *, sft: bool, strict: bool, stats: ReadStats) -> Iterator[Record]:
    """Every document of ``source`` in a fixed order (at most ``source.max_documents``)."""
    field = source.messages_field if sft else source.text_field
    kind = resolve_kind(source)
    if kind == "indexed":
        raise UserError(f"data source {source.path} is a Megatron indexed dataset (tokens, not text)")
    if sft and source.prompt_field:
        raise UserError(f"data source {source.path}: prompt_field={source.prompt_field!r} is for prompt / "
                        "completion records; SFT chats mark their prompts by role (set data.sft=false, or drop "
                        "prompt_field)")
    if kind == "hub":
        records = _hub_records(source, field, sft, strict, stats)
    else:
        records = (record for path, file_kind in list_files(source)
                   for record in _READERS[file_kind](path, field, sft, strict, stats, source))
    for record in islice(records, source.max_documents):
        stats.documents += 1
        yield record


def log_read_stats(name: str, stats: ReadStats) -> None:
    if stats.invalid_utf8:
        logger.warning("%s: skipped %d document(s) with invalid UTF-8 (first at %s); set strict=true to fail "
                       "instead", name, stats.invalid_utf8, stats.first_invalid)
    if stats.empty:
        logger.info("%s: skipped %d empty document(s)", name, stats.empty)


def _decode(raw: bytes, where: str, strict: bool, stats: ReadStats) -> str | None:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as error:
        if strict:
            raise UserError(f"{where}: invalid UTF-8 ({error.reason} at byte {error.start}); fix the file or "
                            "set strict=false to skip such documents with a warning") from None
        stats.skip_invalid(where)
        return None


def _text_records(path: Path, field: str, sft: bool, strict: bool, stats: ReadStats,
                  source) -> Iterator[Record]:
    if sft:
        raise UserError(f"{path}: a plain text file has no {field!r} field; SFT needs JSONL, Parquet or a "
                        "dataset with chat messages")
    if source.prompt_field:
        raise UserError(f"{path}: a plain text file has no {source.prompt_field!r} field; prompt / completion "
                        "records need JSONL, Parquet or a dataset")
    sample_by = source.sample_by
    if sample_by not in SAMPLE_BY:
        raise UserError(f"data source {source.path}: sample_by={sample_by!r} is not one of: "
                        f"{', '.join(SAMPLE_BY)}")
    if sample_by == "document":
        raw = path.read_bytes()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as error:
            line = raw.count(b"\n", 0, error.start) + 1
            text = _decode(raw, f"{path}:{line}", strict, stats)
        if text is not None and text.strip():
            yield Record(text, f"{path}")
        return
    with path.open("rb") as stream:
        for number, raw in enumerate(stream, 1):
            text = _decode(raw, f"{path}:{number}", strict, stats)
            text = text.rstrip("\r\n") if text is not None else None
            if text and text.strip():
                yield Record(text, f"{path}:{number}")


def parse_json_object(line: str, where: str) -> dict:
    """One JSONL line as a dict, or a UserError naming ``where`` (file:line)."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise UserError(f"{where}: not valid JSON ({error.msg} at column {error.colno})") from None
    if not isinstance(record, dict):
        raise UserError(f"{where}: expected a JSON object per line, got {type(record).__name__}")
    return record


def _jsonl_records(path: Path, field: str, sft: bool, strict: bool, stats: ReadStats,
                   source) -> Iterator[Record]:
    with path.open("rb") as stream:
        for number, raw in enumerate(stream, 1):
            where = f"{path}:{number}"
            line = _decode(raw, where, strict, stats)
            if line is None or not line.strip():
                continue
            record = parse_json_object(line, where)
            value = document_value(record, field, source.prompt_field, sft, where, stats)
            if value is not None:
                yield Record(value, where)


def _parquet_records(path: Path, field: str, sft: bool, strict: bool, stats: ReadStats,
                     source) -> Iterator[Record]:
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(path)
    except Exception as error:  # pyarrow raises several types for a broken file
        raise UserError(f"{path}: cannot read Parquet ({error})".splitlines()[0]) from None
    settings = {field: "messages_field" if sft else "text_field"}
    if source.prompt_field:
        settings[source.prompt_field] = "prompt_field"
    for column, setting in settings.items():
        if column not in table.schema_arrow.names:
            raise UserError(f"{path}: no {column!r} column (columns: {', '.join(table.schema_arrow.names)}); "
                            f"set {setting} of the source")
    columns = list(settings)
    number = 0
    for batch in table.iter_batches(columns=columns, batch_size=4096):
        for row in batch.to_pylist():
            where = f"{path} record {number}"
            number += 1
            value = document_value(row, field, source.prompt_field, sft, where, stats, strict)
            if value is not None:
                yield Record(value, where)


def _hub_records(source, field: str, sft: bool, strict: bool, stats: ReadStats) -> Iterator[Record]:
    name = f"dataset {source.path!r} split {source.split!r}"
    dataset = _load_dataset(source, name)
    try:
        for number, record in enumerate(dataset):
            where = f"{name} record {number}"
            value = document_value(record, field, source.prompt_field, sft, where, stats, strict)
            if value is not None:
                yield Record(value, where)
    except (ConnectionError, TimeoutError, OSError) as error:
        raise UserError(f"{name}: reading failed ({error}); check the network".splitlines()[0]) from None


def _load_dataset(source, name: str):
    import datasets

    path = Path(source.path).expanduser()
    try:
        if _is_saved_dataset(path):
            loaded = datasets.load_from_disk(str(path))  # a folder written by Dataset.save_to_disk
            return loaded[source.split] if isinstance(loaded, datasets.DatasetDict) else loaded
        return datasets.load_dataset(source.path, split=source.split, streaming=source.streaming)
    except (ConnectionError, TimeoutError) as error:
        raise UserError(f"cannot load {name}: {error}; the hub is not reachable (no network?) - download the "
                        "dataset where there is network, or use a local copy".splitlines()[0]) from None
    except Exception as error:  # datasets raises many types: not found, bad split, bad files
        raise UserError(f"cannot load {name}: {type(error).__name__}: {error}".splitlines()[0]) from None


def document_value(record: dict, field: str, prompt_field: str | None, sft: bool, where: str, stats: ReadStats,
                   strict: bool = True):
    """:func:`field_value`, or with ``prompt_field`` the pair (prompt, completion): the prompt may be empty, the
    completion (``field``) may not (an empty one skips the record, as an empty text does)."""
    value = field_value(record, field, sft, where, stats, strict)
    if value is None or not prompt_field:
        return value
    prompt = _string_field(record, prompt_field, "prompt_field", where, stats, strict)
    return None if prompt is None else (prompt, value)


def field_value(record: dict, field: str, sft: bool, where: str, stats: ReadStats, strict: bool = True):
    """The text (or messages) of ``record``; None for an empty text or one skipped for invalid UTF-8."""
    if sft:
        return check_messages(_field(record, field, "messages_field", where), field, where)
    value = _string_field(record, field, "text_field", where, stats, strict)
    if value is not None and not value.strip():
        stats.empty += 1
        return None
    return value


def _field(record: dict, field: str, setting: str, where: str):
    if field not in record:
        raise UserError(f"{where}: record has no {field!r} field (fields: {', '.join(map(str, record))}); "
                        f"set {setting} of the source")
    return record[field]


def _string_field(record: dict, field: str, setting: str, where: str, stats: ReadStats, strict: bool) -> str | None:
    """``record[field]`` as a string (None: skipped for invalid UTF-8), or a UserError naming the record."""
    value = _field(record, field, setting, where)
    if isinstance(value, bytes):
        value = _decode(value, where, strict, stats)
    if value is not None and not isinstance(value, str):
        raise UserError(f"{where}: {field!r} is {type(value).__name__}, not a string")
    return value


def check_messages(value, field: str, where: str) -> list[dict]:
    """A chat as a list of ``{role, content}`` dicts with string values, or a UserError naming the record."""
    if not isinstance(value, list) or not value or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in value):
        raise UserError(f"{where}: {field!r} must be a non-empty list of "
                        "{'role': str, 'content': str} objects")
    return [{"role": m["role"], "content": m["content"]} for m in value]


_READERS = {"text": _text_records, "jsonl": _jsonl_records, "parquet": _parquet_records}
