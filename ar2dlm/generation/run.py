"""`ar2dlm generate model=HF_DIR mode=ar|diffusion|self_spec|quad_spec prompt="..."`: decode one prompt, print stats.

The prompt is encoded as given (no chat template). After the text comes one line:
``new tokens: N | NFE: F | tokens/forward: T | tokens/s: S``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig

from ar2dlm.errors import UserError
from ar2dlm.generation.loading import check_export, check_served, load_export, resolve_device
from ar2dlm.generation.modes import MODES, decode, diffusion_levers
from ar2dlm.generation.prompt import read_prompt
from ar2dlm.log import logger


@dataclass(frozen=True)
class GenerationResult:
    """What one decoding call produced."""

    text: str
    new_tokens: int
    nfe: int
    seconds: float

    def stats_line(self) -> str:
        per_forward = self.new_tokens / max(self.nfe, 1)
        per_second = self.new_tokens / max(self.seconds, 1e-9)
        return (f"new tokens: {self.new_tokens} | NFE: {self.nfe} | tokens/forward: {per_forward:.2f} | "
                f"tokens/s: {per_second:.1f}")


def check_arguments(mode: str, max_new_tokens: int, block_length: int, threshold: float,
                    temperature: float) -> None:
    """UserError for values no mode can run with."""
    if mode not in MODES:
        raise UserError(f"mode={mode!r} is not one of: {', '.join(MODES)}")
    if max_new_tokens <= 0:
        raise UserError(f"max_new_tokens={max_new_tokens} must be >= 1")
    if block_length < 1:
        raise UserError(f"block_length={block_length} must be >= 1")
    if not 0.0 <= threshold <= 1.0:
        raise UserError(f"threshold={threshold} must be in [0, 1]")
    if temperature < 0:
        raise UserError(f"temperature={temperature} must be >= 0")


def encode_prompt(tokenizer, prompt: str, context: int | None, max_new_tokens: int) -> list[int]:
    ids = tokenizer(prompt)["input_ids"]
    if not ids:
        if tokenizer.bos_token_id is None:
            raise UserError("prompt is empty")
        ids = [tokenizer.bos_token_id]
    if context is not None and len(ids) > context - max_new_tokens:
        room = max(context - max_new_tokens, 0)
        raise UserError(f"prompt has {len(ids)} tokens; with max_new_tokens={max_new_tokens} the context "
                        f"window ({context}) leaves room for {room}")
    return ids


def decode_prompt(model, tokenizer, ids: list[int], mode: str, max_new_tokens: int, block_length: int,
                  threshold: float, temperature: float, **levers) -> GenerationResult:
    """Run one mode on one prompt and time it (``levers``: diffusion's, see :func:`diffusion_levers`, and
    quad_spec's ``draft_length``)."""
    input_ids = torch.tensor([ids], device=model.device)
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    sequences, stats = decode(model, mode, input_ids, max_new_tokens, block_length=block_length, threshold=threshold,
                              temperature=temperature, **levers)
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    count = stats.new_tokens[0]
    text = tokenizer.decode(sequences[0, len(ids):len(ids) + count].tolist(), skip_special_tokens=True)
    return GenerationResult(text=text, new_tokens=count, nfe=int(stats.nfe), seconds=seconds)


def run_generate(cfg: DictConfig) -> int:
    """Entry point of `ar2dlm generate`."""
    check_arguments(cfg.mode, cfg.max_new_tokens, cfg.block_length, cfg.threshold, cfg.temperature)
    prompt = read_prompt(cfg)
    model_dir = Path(cfg.model).expanduser()
    config = check_export(model_dir)
    check_served(model_dir, config, [cfg.mode] if cfg.mode != "ar" else [])
    device = resolve_device(cfg.device)
    logger.info("loading %s (%s) on %s", model_dir, (config.get("architectures") or ["?"])[0], device)
    tokenizer, model = load_export(model_dir, device)
    ids = encode_prompt(tokenizer, prompt, config.get("max_position_embeddings"), cfg.max_new_tokens)
    result = decode_prompt(model, tokenizer, ids, cfg.mode, cfg.max_new_tokens, cfg.block_length, cfg.threshold,
                           cfg.temperature, draft_length=cfg.get("draft_length"), use_drafter=cfg.get("use_drafter"),
                           **diffusion_levers(cfg))
    print(result.text)
    print(result.stats_line())
    return 0
