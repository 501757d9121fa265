"""Training checkpoints: model, optimizer, schedule, data position and RNG, written atomically and verified.

    OUTPUT/checkpoints/step_0000100/   an ar2dlm checkpoint (ar2dlm.json, hf/, weights/, manifest.json) plus
                                        trainer_state.json; weights/ also holds the optimizer state
    OUTPUT/checkpoints/latest          the name of the newest complete checkpoint (for people and scripts)

A checkpoint is written into a staging folder, flushed to disk with its manifest of sizes and checksums,
and renamed when complete; then ``latest`` is replaced. A crash mid-save leaves the previous checkpoint
intact, and the next start removes the staging folder. Every ``step_*`` folder is therefore complete unless
it was damaged later: resume takes the newest one and refuses (never skips, never deletes) one that does not
verify. Weights and optimizer state are megatron-core distributed checkpoints, which load under any tensor /
data parallel layout.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException

from ar2dlm.errors import UserError
from ar2dlm.fs import fsync_directory, fsync_tree, is_no_space_error, tree_size
from ar2dlm.log import logger
from ar2dlm.model.checkpoint import (
    HF_DIR,
    WEIGHTS_DIR,
    CheckpointMetadata,
    read_metadata,
    save_strategy,
    write_metadata,
)
from ar2dlm.model.manifest import DamagedCheckpointError, verify_manifest, write_manifest
from ar2dlm.model.safe_pickle import check_distributed_checkpoint

CHECKPOINTS = "checkpoints"
LATEST = "latest"
TRAINER_STATE = "trainer_state.json"
_STEP_DIR = re.compile(r"^step_(\d{7})$")
_STAGING = ".step_*.partial"


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def checkpoint_root(output: Path) -> Path:
    return Path(output) / CHECKPOINTS


def step_checkpoints(output: Path) -> list[Path]:
    """Every ``step_*`` folder under ``output``, oldest first."""
    return sorted(p for p in checkpoint_root(output).glob("step_*") if _STEP_DIR.match(p.name) and p.is_dir())


def newest_checkpoint(output: Path) -> Path | None:
    checkpoints = step_checkpoints(output)
    return checkpoints[-1] if checkpoints else None


def read_trainer_state(checkpoint: Path) -> dict:
    path = checkpoint / TRAINER_STATE
    if not path.is_file():
        raise DamagedCheckpointError(f"checkpoint {checkpoint} is incomplete: {TRAINER_STATE} is missing")
    try:
        state = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DamagedCheckpointError(f"checkpoint {checkpoint} is damaged: {path} cannot be parsed ({error})") from None
    missing = [key for key in ("step", "scheduler", "data", "rng") if key not in state]
    if missing:
        raise DamagedCheckpointError(f"checkpoint {checkpoint} is damaged: {path} lacks {', '.join(missing)}")
    return state


def resume_checkpoint(output: Path, checksums: bool = True) -> Path | None:
    """The checkpoint a resumed run continues from: the newest one, verified; None if there is none.

    A newest checkpoint that is incomplete or damaged is an error that names it and the previous one: it is
    never skipped silently nor deleted.
    """
    checkpoints = step_checkpoints(output)
    if not checkpoints:
        return None
    newest = checkpoints[-1]
    try:
        read_metadata(newest)
        read_trainer_state(newest)
        verify_manifest(newest, checksums=checksums)
    except UserError as error:
        previous = (f"move it out of {checkpoint_root(output)} to resume from {checkpoints[-2].name}"
                    if len(checkpoints) > 1 else "there is no earlier checkpoint")
        raise DamagedCheckpointError(f"{error}; it was left as it is: {previous}") from None
    return newest


def remove_interrupted_saves(output: Path) -> None:
    """Delete the staging folders and pointer of a save that a crash or kill interrupted (rank 0)."""
    if _rank() != 0:
        return
    root = checkpoint_root(output)
    for staging in root.glob(_STAGING):
        logger.warning("removing %s, left by a save that was interrupted", staging)
        shutil.rmtree(staging, ignore_errors=True)
    (root / f".{LATEST}.tmp").unlink(missing_ok=True)


def _sharded_training_state(model_chunks: list, optimizer, is_loading: bool) -> dict:
    model_state = model_chunks[0].sharded_state_dict()
    return {"model": model_state, "optimizer": optimizer.sharded_state_dict(model_state, is_loading=is_loading)}


def all_ranks(condition: bool) -> bool:
    """Whether ``condition`` holds on every rank (collective)."""
    flag = torch.tensor([1 if condition else 0], dtype=torch.int32,
                        device="cuda" if torch.cuda.is_available() else "cpu")
    if dist.is_initialized():
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def parameters_are_finite(model_chunks: list) -> bool:
    """Whether every parameter on every rank is finite (collective)."""
    checks = [torch.isfinite(p).all() for chunk in model_chunks for p in chunk.parameters()]
    return all_ranks(bool(torch.stack(checks).all()) if checks else True)  # one device sync, not one per tensor


def _estimated_size(output: Path, model_chunks: list, optimizer) -> int:
    """Bytes the next checkpoint needs: the last one's size, else this rank's state times the model-parallel size."""
    previous = newest_checkpoint(output)
    if previous is not None:
        return tree_size(previous)
    local = sum(p.numel() * p.element_size() for chunk in model_chunks for p in chunk.parameters())
    for state in getattr(optimizer, "state", {}).values():
        local += sum(t.numel() * t.element_size() for t in state.values() if torch.is_tensor(t))
    world = dist.get_world_size() if dist.is_initialized() else 1
    from megatron.core import parallel_state

    replicas = parallel_state.get_data_parallel_world_size() if parallel_state.model_parallel_is_initialized() else 1
    return local * world // max(replicas, 1)


def _no_space(path: Path, needed: int) -> UserError:
    existing = next(p for p in (path, *path.parents) if p.exists())
    free = shutil.disk_usage(existing).free
    return UserError(f"no space left on device: the checkpoint {path} needs about {needed / 2**20:.1f} MiB "
                     f"and {free / 2**20:.1f} MiB are free there; nothing was written (the previous checkpoint "
                     "is intact); free space or lower checkpoint.keep_last, then resume=true")


def save_training_checkpoint(output: Path, step: int, model_chunks: list, optimizer, trainer_state: dict,
                             metadata: CheckpointMetadata, hf_source: Path, keep_last: int,
                             checksums: bool = True) -> Path:
    """Collective: every rank calls it. Returns the checkpoint folder."""
    from megatron.core import dist_checkpointing

    root = checkpoint_root(output)
    final = root / f"step_{step:07d}"
    staging = root / f".step_{step:07d}.partial"
    if final.exists():
        raise UserError(f"{final} exists already: another run may be writing to {output}")
    needed = _estimated_size(output, model_chunks, optimizer)
    if _rank() == 0:
        shutil.rmtree(staging, ignore_errors=True)
        (staging / WEIGHTS_DIR).mkdir(parents=True)
    if not all_ranks(_rank() != 0 or shutil.disk_usage(root).free >= needed):
        if _rank() == 0:
            shutil.rmtree(staging, ignore_errors=True)
        raise _no_space(final, needed)
    try:
        dist_checkpointing.save(_sharded_training_state(model_chunks, optimizer, is_loading=False),
                                str(staging / WEIGHTS_DIR), sharded_strategy=save_strategy())
        _barrier()
        if _rank() == 0:
            shutil.copytree(hf_source, staging / HF_DIR)
            write_metadata(staging, replace(metadata, step=step))
            (staging / TRAINER_STATE).write_text(json.dumps(trainer_state, indent=1) + "\n")
            write_manifest(staging, checksums=checksums)
            fsync_tree(staging)
    except BaseException as error:  # torch's CheckpointException is a BaseException
        if _rank() == 0:
            shutil.rmtree(staging, ignore_errors=True)
        if is_no_space_error(error):
            raise _no_space(final, needed) from None
        raise
    if _rank() == 0:
        staging.rename(final)
        fsync_directory(root)
        pointer = root / f".{LATEST}.tmp"
        with pointer.open("w") as handle:
            handle.write(final.name + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(pointer, root / LATEST)
        fsync_directory(root)
        _prune(output, keep_last)
    _barrier()
    return final


def _prune(output: Path, keep_last: int) -> None:
    for old in step_checkpoints(output)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def load_training_checkpoint(checkpoint: Path, model_chunks: list, optimizer) -> dict:
    """Load model and optimizer state in place; returns the trainer state (schedule, data, RNG, step)."""
    from megatron.core import dist_checkpointing

    state = read_trainer_state(checkpoint)
    check_distributed_checkpoint(checkpoint / WEIGHTS_DIR)
    try:
        loaded = dist_checkpointing.load(_sharded_training_state(model_chunks, optimizer, is_loading=True),
                                         str(checkpoint / WEIGHTS_DIR))
    except (Exception, CheckpointException) as error:
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise DamagedCheckpointError(f"cannot read the weights of checkpoint {checkpoint}: {first_line}") from None
    model_chunks[0].load_state_dict(loaded["model"], strict=True)
    optimizer.load_state_dict(loaded["optimizer"])
    return state


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state().tolist()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state().tolist()
    return state


def restore_rng_state(state: dict) -> None:
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if torch.cuda.is_available() and "cuda" in state:
        torch.cuda.set_rng_state(torch.tensor(state["cuda"], dtype=torch.uint8))
