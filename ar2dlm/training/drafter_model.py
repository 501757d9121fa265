"""The model of a drafter run: the init checkpoint frozen, LoRA adapters added (or restored), acting on drafts only.

Three starts (docs/design.md §4.7):

- a checkpoint without an adapter (converted or trained): its weights are loaded, then fresh adapters (B = 0)
  are added, so step 0 is exactly the checkpoint's model;
- a checkpoint that holds an adapter (a drafter run's): the adapters are added first and loaded with the weights;
  the run's ``drafter.rank`` / ``alpha`` / ``target_modules`` must be those it was trained with;
- a resume: the adapters are added and the training checkpoint fills everything, optimizer included.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from omegaconf import DictConfig

from ar2dlm.errors import UserError
from ar2dlm.model.checkpoint import WEIGHTS_DIR, CheckpointMetadata, load_model, load_weights, read_metadata
from ar2dlm.model.draft_pass import use_split_forward
from ar2dlm.model.lora import METADATA_KEY, LoraSettings, add_lora, checkpoint_lora, set_adapter_mode
from ar2dlm.training.drafter import DrafterLossConfig


def lora_settings(cfg: DictConfig) -> LoraSettings:
    drafter = cfg.drafter
    return LoraSettings(rank=int(drafter.rank), alpha=float(drafter.alpha),
                        target_modules=tuple(drafter.target_modules), seed=int(cfg.seed))


def loss_config(cfg: DictConfig) -> DrafterLossConfig:
    drafter = cfg.drafter
    return DrafterLossConfig(temperature=float(drafter.kl_temperature), top_k=int(drafter.top_k),
                             ce_weight=float(drafter.ce_weight), ce_target=str(drafter.ce_target),
                             length_weighting=bool(drafter.length_weighting),
                             random_block_start=bool(drafter.random_block_start))


def require_mask_token(metadata: CheckpointMetadata, directory: Path) -> None:
    """A drafter drafts ``[seed, MASK ...]`` blocks: its checkpoint needs a mask token the model knows."""
    mask = metadata.mask_token_id
    if mask is None or not 0 <= int(mask) < int(metadata.vocab_size):
        raise UserError(f"train.objective=drafter needs a checkpoint with a mask token, and {directory} has "
                        f"{'none' if mask is None else f'mask_token_id={mask} outside its vocabulary of {metadata.vocab_size}'}: "
                        "convert the model with `ar2dlm convert` (it chooses one) and train it with "
                        "train.objective=joint first")


def with_adapter(metadata: CheckpointMetadata, settings: LoraSettings) -> CheckpointMetadata:
    """``metadata`` recording that the checkpoint holds adapters of ``settings`` (export writes them as PEFT)."""
    return replace(metadata, extra={**metadata.extra, METADATA_KEY: settings.to_dict()})


def without_adapter(metadata: CheckpointMetadata) -> CheckpointMetadata:
    """``metadata`` of a run that does not train the adapter: its checkpoints hold none, whatever its init held."""
    if METADATA_KEY not in metadata.extra:
        return metadata
    return replace(metadata, extra={k: v for k, v in metadata.extra.items() if k != METADATA_KEY})


def load_drafter_model(directory: Path, settings: LoraSettings, *, resuming: bool, **load_options) -> list:
    """The model chunks of a drafter run starting from ``directory`` (see the module docstring); every base
    parameter frozen, the adapters on, the transformer blocks with the split forward of
    :mod:`ar2dlm.model.draft_pass` (the adapters act on drafts only). ``load_options`` go to :func:`load_model`."""
    metadata = read_metadata(directory)
    require_mask_token(metadata, directory)
    saved = checkpoint_lora(metadata)
    if saved is not None and saved != settings:
        raise UserError(f"{directory} holds a drafter adapter with {saved.to_dict()}, and this run asks for "
                        f"{settings.to_dict()}: set drafter.rank / alpha / target_modules to the checkpoint's")
    if resuming or saved is not None:
        chunks, _, _ = load_model(directory, weights=False, **load_options)
        add_lora(chunks, settings)
        if not resuming:
            load_weights(chunks, directory / WEIGHTS_DIR)
    else:
        chunks, _, _ = load_model(directory, **load_options)
        add_lora(chunks, settings)
    set_adapter_mode(chunks, "on")  # the split forward turns them off for its clean pass
    return use_split_forward(chunks)
