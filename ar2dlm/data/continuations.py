"""`ar2dlm data continue`: an export's own greedy AR continuations of prompts, written as JSONL training data.

The self-speculation drafter sees the model's own greedy AR output at inference, so that is what it is best
trained on (docs/design.md §4.7). Each prompt of a text source is decoded greedily in AR mode (batched, left-
padded, EOS and special tokens dropped, as the eval decodes) and written as one line
``{"text": prompt + continuation, "prompt": ..., "continuation": ...}``: ``data.sources=[{path: OUTPUT}]``
trains on it as it is. The file appears whole at the end or not at all.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

from omegaconf import DictConfig

from ar2dlm.data.sources import ReadStats, iter_records, log_read_stats
from ar2dlm.errors import UserError
from ar2dlm.eval.generation import (
    DecodeConfig,
    batches,
    continuation_texts,
    decode_batch,
    encode_prompts,
    pad_token_id,
)
from ar2dlm.fs import fsync_directory, refuse_overlap
from ar2dlm.log import logger, progress
from ar2dlm.runtime.modeling_ar2dlm import eos_token_ids


@dataclass
class ContinueResult:
    output: Path
    prompts: int
    new_tokens: int
    seconds: float


def check_output_file(output: str | Path, overwrite: bool, source_path: str) -> Path:
    """The output as a Path; UserError if it is the source, a folder, or an existing file without ``overwrite``."""
    path = Path(output).expanduser()
    refuse_overlap(path, source_path)
    if path.is_dir():
        raise UserError(f"output {path} is a directory; name a .jsonl file")
    if path.exists() and not overwrite:
        raise UserError(f"output {path} exists (pass overwrite=true to replace it)")
    return path


def read_prompts(source, limit: int | None, strict: bool) -> list[str]:
    """The first ``limit`` (None: all) documents of ``source``'s text field (with a ``prompt_field``, the prompts
    of its prompt / completion records); UserError when there are none."""
    stats = ReadStats()
    records = islice(iter_records(source, sft=False, strict=strict, stats=stats), limit)
    prompts = [record.value[0] if source.prompt_field else record.value for record in records]
    log_read_stats(str(source.path), stats)
    if not prompts:
        raise UserError(f"data source {source.path} has no prompts (text field {source.text_field!r})")
    return prompts


def continue_batch(model, tokenizer, rows: Sequence[Sequence[int]], config: DecodeConfig, pad_id: int,
                   eos: set[int]) -> tuple[list[str], int]:
    """Greedy continuations of tokenised prompts (EOS and special tokens dropped) and the new tokens decoded."""
    new_ids = decode_batch(model, rows, config, pad_id).new_ids
    return continuation_texts(tokenizer, new_ids, eos), sum(len(ids) for ids in new_ids)


def write_continuations(model, tokenizer, prompts: Sequence[str], output: Path, *, max_new_tokens: int,
                        batch_size: int, context: int | None) -> ContinueResult:
    """Decode every prompt and write the JSONL lines to a temporary file beside ``output``, then rename it."""
    config = DecodeConfig("ar", max_new_tokens=max_new_tokens)
    encoded = encode_prompts(tokenizer, prompts, context, max_new_tokens)
    pad_id, eos = pad_token_id(model, tokenizer), set(eos_token_ids(model))
    output.parent.mkdir(parents=True, exist_ok=True)
    partial = output.parent / f".{output.name}.partial-{os.getpid()}"
    start, new_tokens, done = time.perf_counter(), 0, 0
    try:
        with partial.open("w", encoding="utf-8") as file:
            chunks = progress(batches(encoded, batch_size), desc=f"continuing {len(prompts)} prompts",
                              unit="batch", log_every=1)
            for chunk in chunks:
                texts, count = continue_batch(model, tokenizer, chunk, config, pad_id, eos)
                for prompt, text in zip(prompts[done:done + len(chunk)], texts, strict=True):
                    file.write(json.dumps({"text": prompt + text, "prompt": prompt, "continuation": text},
                                          ensure_ascii=False) + "\n")
                done, new_tokens = done + len(chunk), new_tokens + count
                chunks.set_postfix({"tokens/s": f"{new_tokens / max(time.perf_counter() - start, 1e-9):.1f}"})
            file.flush()
            os.fsync(file.fileno())
        os.replace(partial, output)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    fsync_directory(output.parent)
    return ContinueResult(output, len(prompts), new_tokens, time.perf_counter() - start)


def run_continue(cfg: DictConfig) -> int:
    """CLI entry point of `ar2dlm data continue`."""
    from ar2dlm.generation.loading import check_export, load_export, resolve_device

    output = check_output_file(cfg.output, cfg.overwrite, cfg.source.path)
    prompts = read_prompts(cfg.source, cfg.limit, cfg.strict)
    model_dir = Path(cfg.model).expanduser()
    config = check_export(model_dir)
    device = resolve_device(cfg.device)
    logger.info("continuing %d prompts of %s with %s on %s (greedy AR, max_new_tokens=%d)",
                len(prompts), cfg.source.path, model_dir, device, cfg.max_new_tokens)
    tokenizer, model = load_export(model_dir, device)
    result = write_continuations(model, tokenizer, prompts, output, max_new_tokens=cfg.max_new_tokens,
                                 batch_size=cfg.batch_size, context=config.get("max_position_embeddings"))
    rate = result.new_tokens / max(result.seconds, 1e-9)
    print(f"continued {result.prompts} prompts, {result.new_tokens} new tokens in {result.seconds:.1f}s "
          f"({rate:,.1f} tokens/s) -> {result.output}")
    return 0
