"""`ar2dlm convert`: a local HF checkpoint -> an ar2dlm checkpoint (Megatron weights + metadata).

Step 0 is exact: the converted model in AR mode gives the source's logits (tests/conversion).
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import torch
from omegaconf import DictConfig

from ar2dlm.conversion.hf_source import HFSource, inspect_source, resolve_source
from ar2dlm.conversion.mask_token import MaskTokenChoice, choose_mask_token
from ar2dlm.errors import UserError
from ar2dlm.fs import atomic_directory, check_output_dir
from ar2dlm.log import logger
from ar2dlm.model.checkpoint import HF_DIR, WEIGHTS_DIR, CheckpointMetadata, save_weights, write_metadata
from ar2dlm.model.manifest import write_manifest

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_EXTRA_HF_FILES = ("generation_config.json",)


def _load_tokenizer(source: HFSource):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(source.path), trust_remote_code=False)
    except Exception as error:  # transformers raises many types for a missing/broken tokenizer
        raise UserError(f"cannot load the tokenizer of {source.path}: {error}".splitlines()[0]) from None


def _params_dtype(requested: str, source: HFSource) -> torch.dtype:
    if requested == "auto":
        name = str(source.config.get("torch_dtype") or source.config.get("dtype") or "float32")
        return _DTYPES.get(name.replace("torch.", ""), torch.float32)
    if requested not in _DTYPES:
        raise UserError(f"dtype={requested!r} is not one of: auto, {', '.join(_DTYPES)}")
    return _DTYPES[requested]


def _rows_to_initialise(choice: MaskTokenChoice) -> list[int]:
    return [choice.token_id] if choice.added_to_tokenizer else []


def convert(source_path: str | Path, output: str | Path, *, mask_token_id: int | None = None,
            block_size: int = 32, dtype: str = "auto", overwrite: bool = False) -> CheckpointMetadata:
    """Convert ``source_path`` into an ar2dlm checkpoint at ``output``; returns its metadata."""
    from transformers import AutoConfig

    check_output_dir(output, overwrite, inputs=[source_path])
    source = inspect_source(resolve_source(source_path))
    check_output_dir(output, overwrite, inputs=[source.path])
    logger.info("source: %s (%s, %d shard(s), %.1f MB)", source.path, source.architecture,
                len(source.weight_files), source.total_bytes / 1e6)
    tokenizer = _load_tokenizer(source)
    tokenizer_rows = len(tokenizer)
    hf_config = AutoConfig.from_pretrained(str(source.path), trust_remote_code=False)
    choice = choose_mask_token(tokenizer, hf_config.vocab_size, mask_token_id)
    logger.info("%s", choice.describe(hf_config.vocab_size))
    params_dtype = _params_dtype(dtype, source)

    from ar2dlm.conversion.bridge import build_converted_model

    weight_files = {name: info.file for name, info in source.tensors.items()}
    _, _, chunks = build_converted_model(source.path, hf_config, params_dtype, choice.vocab_size, weight_files,
                                         tokenizer_rows, _rows_to_initialise(choice))
    hf_config.vocab_size = choice.vocab_size
    if hasattr(hf_config, "auto_map"):  # the checkpoint is read as its native architecture from now on
        del hf_config.auto_map
    metadata = CheckpointMetadata(
        architecture=source.architecture, mask_token_id=choice.token_id, mask_token=choice.token,
        mask_token_reason=choice.reason, block_size=block_size, vocab_size=choice.vocab_size,
        source_vocab_size=source.config["vocab_size"], params_dtype=str(params_dtype).removeprefix("torch."),
        hf_tensor_names=sorted(source.tensors), source=str(source.path),
        clean_pattern="causal",  # the source is an AR model: its only stream is causal
    )
    with atomic_directory(output, overwrite) as staging:
        hf_dir = staging / HF_DIR
        hf_config.save_pretrained(hf_dir)
        tokenizer.save_pretrained(hf_dir)
        for name in _EXTRA_HF_FILES:
            if (source.path / name).is_file():
                shutil.copy2(source.path / name, hf_dir / name)
        logger.info("writing Megatron weights")
        save_weights(chunks, staging / WEIGHTS_DIR)
        write_metadata(staging, metadata)
        write_manifest(staging)
    return metadata


def run_convert(cfg: DictConfig) -> int:
    """CLI entry point of `ar2dlm convert`."""
    from ar2dlm.distributed import ParallelLayout, init_distributed

    start = time.perf_counter()
    check_output_dir(cfg.output, cfg.overwrite, inputs=[cfg.source])
    source = inspect_source(resolve_source(cfg.source))  # fail on bad input before starting process groups
    check_output_dir(cfg.output, cfg.overwrite, inputs=[source.path])  # a hub id's local copy
    init_distributed(ParallelLayout())
    metadata = convert(cfg.source, cfg.output, mask_token_id=cfg.mask_token_id, block_size=cfg.block_size,
                       dtype=cfg.dtype, overwrite=cfg.overwrite)
    print(f"converted {metadata.architecture} -> {Path(cfg.output)} in {time.perf_counter() - start:.1f}s; "
          f"mask token id {metadata.mask_token_id} ({metadata.mask_token_reason}), "
          f"vocabulary {metadata.vocab_size}")
    return 0
