"""Training checkpoints: model, optimizer, schedule, data position and RNG, written atomically.

    OUTPUT/checkpoints/step_0000100/   an ar2dlm checkpoint (ar2dlm.json, hf/, weights/) plus
                                        trainer_state.json; weights/ also holds the optimizer state
    OUTPUT/checkpoints/latest          the name of the newest complete checkpoint

Each checkpoint is written into a staging folder and renamed when complete, then ``latest`` is
replaced, so a crash mid-save leaves the previous checkpoint intact. Weights and optimizer state are
megatron-core distributed checkpoints, which load under any tensor / data parallel layout.
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

from ar2dlm.model.checkpoint import HF_DIR, WEIGHTS_DIR, CheckpointMetadata, write_metadata

CHECKPOINTS = "checkpoints"
LATEST = "latest"
TRAINER_STATE = "trainer_state.json"
_STEP_DIR = re.compile(r"^step_(\d{7})$")


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def checkpoint_root(output: Path) -> Path:
    return output / CHECKPOINTS


def latest_checkpoint(output: Path) -> Path | None:
    """The newest complete checkpoint under ``output`` (by the ``latest`` pointer), or None."""
    root = checkpoint_root(output)
    pointer = root / LATEST
    if pointer.is_file():
        candidate = root / pointer.read_text().strip()
        if (candidate / TRAINER_STATE).is_file():
            return candidate
    complete = sorted(p for p in root.glob("step_*") if _STEP_DIR.match(p.name) and (p / TRAINER_STATE).is_file())
    return complete[-1] if complete else None


def _sharded_training_state(model_chunks: list, optimizer, is_loading: bool) -> dict:
    model_state = model_chunks[0].sharded_state_dict()
    return {"model": model_state, "optimizer": optimizer.sharded_state_dict(model_state, is_loading=is_loading)}


def save_training_checkpoint(output: Path, step: int, model_chunks: list, optimizer, trainer_state: dict,
                             metadata: CheckpointMetadata, hf_source: Path, keep_last: int) -> Path:
    """Collective: every rank calls it. Returns the checkpoint folder."""
    from megatron.core import dist_checkpointing

    root = checkpoint_root(output)
    final = root / f"step_{step:07d}"
    staging = root / f".step_{step:07d}.partial"
    if _rank() == 0:
        shutil.rmtree(staging, ignore_errors=True)
        (staging / WEIGHTS_DIR).mkdir(parents=True)
    _barrier()
    dist_checkpointing.save(_sharded_training_state(model_chunks, optimizer, is_loading=False),
                            str(staging / WEIGHTS_DIR))
    _barrier()
    if _rank() == 0:
        shutil.copytree(hf_source, staging / HF_DIR)
        write_metadata(staging, replace(metadata, step=step))
        (staging / TRAINER_STATE).write_text(json.dumps(trainer_state, indent=1) + "\n")
        shutil.rmtree(final, ignore_errors=True)
        staging.rename(final)
        pointer = root / f".{LATEST}.tmp"
        pointer.write_text(final.name + "\n")
        os.replace(pointer, root / LATEST)
        _prune(root, keep_last)
    _barrier()
    return final


def _prune(root: Path, keep_last: int) -> None:
    steps = sorted(p for p in root.glob("step_*") if _STEP_DIR.match(p.name))
    for old in steps[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def load_training_checkpoint(checkpoint: Path, model_chunks: list, optimizer) -> dict:
    """Load model and optimizer state in place; returns the trainer state (schedule, data, RNG, step)."""
    from megatron.core import dist_checkpointing

    state = dist_checkpointing.load(_sharded_training_state(model_chunks, optimizer, is_loading=True),
                                    str(checkpoint / WEIGHTS_DIR))
    model_chunks[0].load_state_dict(state["model"], strict=True)
    optimizer.load_state_dict(state["optimizer"])
    return json.loads((checkpoint / TRAINER_STATE).read_text())


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state().tolist()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state().tolist()
    return state


def restore_rng_state(state: dict) -> None:
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if torch.cuda.is_available() and "cuda" in state:
        torch.cuda.set_rng_state(torch.tensor(state["cuda"], dtype=torch.uint8))
