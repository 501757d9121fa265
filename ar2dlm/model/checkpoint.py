"""The on-disk model checkpoint that `convert` writes and `train` / `export` read.

    DIR/ar2dlm.json   metadata: architecture, mask token, block size and clean-stream pattern of the
                      diffusion training, vocabulary, HF tensor names
    DIR/hf/           the source's HF config (vocab_size updated), generation config and tokenizer
    DIR/weights/      megatron-core distributed checkpoint of the model (loads under any TP/PP layout)

The model is rebuilt from ``hf/`` through megatron-bridge, so no source checkpoint is needed later.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from ar2dlm import __version__
from ar2dlm.errors import UserError
from ar2dlm.model.manifest import verify_manifest
from ar2dlm.model.safe_pickle import check_distributed_checkpoint

METADATA_FILE = "ar2dlm.json"
HF_DIR = "hf"
WEIGHTS_DIR = "weights"
FORMAT = "ar2dlm-checkpoint"
FORMAT_VERSION = 1


@dataclass
class CheckpointMetadata:
    architecture: str
    mask_token_id: int
    block_size: int  # convert's block_size, replaced by the decoding block size once a run trains diffusion
    vocab_size: int
    source_vocab_size: int
    params_dtype: str
    hf_tensor_names: list[str]
    mask_token: str | None = None
    mask_token_reason: str = ""
    source: str = ""
    step: int = 0
    clean_pattern: str | None = None  # diffusion.clean_pattern trained with; None: written before ar2dlm kept it
    extra: dict = field(default_factory=dict)
    format: str = FORMAT
    format_version: int = FORMAT_VERSION
    ar2dlm_version: str = __version__

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.params_dtype)

    def trained_with(self, block_size: int, clean_pattern: str, train_block_size: int | None = None
                     ) -> CheckpointMetadata:
        """This metadata for weights trained with these diffusion settings (export writes them into config.json).

        ``block_size`` is the block the model decodes with; a different training block (diffusion.block_size
        with diffusion.decode_block_size set) is kept in ``extra["train_block_size"]``."""
        extra = {k: v for k, v in self.extra.items() if k != "train_block_size"}
        if train_block_size is not None and int(train_block_size) != int(block_size):
            extra["train_block_size"] = int(train_block_size)
        return replace(self, block_size=int(block_size), clean_pattern=str(clean_pattern), extra=extra)


def write_metadata(directory: Path, metadata: CheckpointMetadata) -> None:
    (directory / METADATA_FILE).write_text(json.dumps(asdict(metadata), indent=2) + "\n")


def read_metadata(directory: str | Path) -> CheckpointMetadata:
    path = Path(directory).expanduser()
    meta_path = path / METADATA_FILE
    if not meta_path.is_file():
        raise UserError(f"{path} is not an ar2dlm checkpoint (no {METADATA_FILE}); create one with `ar2dlm convert`")
    try:
        raw = json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise UserError(f"{meta_path} cannot be parsed: {error}") from None
    if raw.get("format") != FORMAT or raw.get("format_version", 0) > FORMAT_VERSION:
        raise UserError(f"{meta_path} has format {raw.get('format')!r} v{raw.get('format_version')}, "
                        f"which ar2dlm {__version__} cannot read")
    for sub in (HF_DIR, WEIGHTS_DIR):
        if not (path / sub).is_dir():
            raise UserError(f"checkpoint {path} is incomplete: {sub}/ is missing")
    known = CheckpointMetadata.__dataclass_fields__
    return CheckpointMetadata(**{k: v for k, v in raw.items() if k in known})


def save_strategy():
    """``torch_dist``, written in the saving process one tensor at a time (no staged copy of the model)."""
    from ar2dlm.model.streaming_checkpoint_writer import StreamingSaveStrategy

    return StreamingSaveStrategy()


def save_weights(model_chunks: list, directory: Path) -> None:
    """Write the model as a megatron-core distributed checkpoint (``torch_dist`` format)."""
    from megatron.core import dist_checkpointing

    directory.mkdir(parents=True, exist_ok=True)
    dist_checkpointing.save(_sharded_state_dict(model_chunks), str(directory), sharded_strategy=save_strategy())


def load_weights(model_chunks: list, directory: Path) -> None:
    """Load a distributed checkpoint written by :func:`save_weights` into ``model_chunks``."""
    from megatron.core import dist_checkpointing

    check_distributed_checkpoint(directory)
    state = dist_checkpointing.load(_sharded_state_dict(model_chunks), str(directory))
    if len(model_chunks) == 1:
        model_chunks[0].load_state_dict(state["model"], strict=True)
    else:
        for index, chunk in enumerate(model_chunks):
            chunk.load_state_dict(state[f"model{index}"], strict=True)


def _sharded_state_dict(model_chunks: list) -> dict:
    if len(model_chunks) == 1:
        return {"model": model_chunks[0].sharded_state_dict()}
    return {f"model{i}": chunk.sharded_state_dict() for i, chunk in enumerate(model_chunks)}


def load_model(directory: str | Path, *, params_dtype: torch.dtype | None = None, seq_length: int | None = None,
               configure=None, checksums: bool = True, weights: bool = True):
    """Rebuild the Megatron model of a checkpoint and load its weights; returns (chunks, metadata, bridge).

    ``configure(provider)`` may set training options (parallel sizes, FP8, ...) before the model is built. The
    checkpoint's files are checked against its manifest first (sizes; and SHA-256 unless ``checksums=False``).
    ``weights=False`` builds the model without loading its weights (a resume loads them with the optimizer).
    """
    from transformers import AutoConfig

    from ar2dlm.conversion.bridge import bridge_from_config, megatron_provider
    from ar2dlm.model.gpt import build_model

    path = Path(directory).expanduser()
    metadata = read_metadata(path)
    verify_manifest(path, checksums=checksums)
    hf_config = AutoConfig.from_pretrained(path / HF_DIR, trust_remote_code=False)
    bridge = bridge_from_config(hf_config)
    provider = megatron_provider(bridge, hf_config, params_dtype=params_dtype or metadata.torch_dtype,
                                 seq_length=seq_length)
    if configure is not None:
        configure(provider)
    chunks = build_model(provider)
    if weights:
        load_weights(chunks, path / WEIGHTS_DIR)
    return chunks, metadata, bridge
