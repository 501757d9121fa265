"""`ar2dlm generate model=HF_DIR mode=ar|diffusion|self_spec prompt="..."`: decode one prompt, print stats.

The prompt is encoded as given (no chat template). After the text comes one line:
``new tokens: N | NFE: F | tokens/forward: T | tokens/s: S``.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig

from ar2dlm.errors import UserError
from ar2dlm.log import logger
from ar2dlm.runtime import RUNTIME_FILES, SERVED_CLEAN_PATTERN
from ar2dlm.runtime.loading import load_runtime_model

MODES = ("ar", "diffusion", "self_spec")
_WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin")


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


def check_export(model_dir: Path) -> dict:
    """The folder's config.json, after checking it is an ar2dlm export (UserError otherwise)."""
    if not model_dir.is_dir():
        raise UserError(f"model={model_dir} is not a directory")
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise UserError(f"{model_dir} has no config.json: not a Hugging Face checkpoint")
    if not any(any(model_dir.glob(pattern)) for pattern in _WEIGHT_PATTERNS):
        raise UserError(f"{model_dir} has no weights (*.safetensors or pytorch_model*.bin)")
    missing = [name for name in RUNTIME_FILES if not (model_dir / name).is_file()]
    if missing:
        raise UserError(f"{model_dir} lacks the ar2dlm runtime ({', '.join(missing)}): "
                        "export it with `ar2dlm export`")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as error:
        raise UserError(f"{config_path} is not valid JSON: {error}") from None
    if config.get("mask_token_id") is None:
        raise UserError(f"{config_path} has no mask_token_id: export the model with `ar2dlm export`")
    return config


def check_served(model_dir: Path, config: dict, asked: list[str]) -> None:
    """UserError when ``asked`` (diffusion decoding modes, the ELBO) needs a causal clean stream that the export's
    training did not have (config.json ``clean_pattern``; exports before ar2dlm recorded it are causal)."""
    pattern = config.get("clean_pattern") or SERVED_CLEAN_PATTERN
    if asked and pattern != SERVED_CLEAN_PATTERN:
        raise UserError(f"{model_dir} was trained with diffusion.clean_pattern={pattern}: {' and '.join(asked)} "
                        f"would read a {SERVED_CLEAN_PATTERN} prefix cache, which it was not trained for; only AR "
                        "decoding (mode ar) serves it")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"device={name!r} is not a torch device (auto, cpu, cuda, cuda:0, ...)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device={name!r} but no CUDA GPU is available")
    return device


def load_export(model_dir: Path, device: torch.device):
    """Tokenizer and tri-mode model (float32 on CPU, the checkpoint's dtype on a GPU), built with this
    ar2dlm's runtime: the folder's own runtime files are never run (a warning says if they differ)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=False)
    except Exception as error:  # transformers raises many types for a missing/broken tokenizer
        raise UserError(f"cannot load the tokenizer of {model_dir}: {error}".splitlines()[0]) from None
    dtype = torch.float32 if device.type == "cpu" else "auto"
    model = load_runtime_model(model_dir, dtype=dtype)
    return tokenizer, model.to(device).eval()


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


def count_new_tokens(new: list[int], eos_ids: set[int]) -> int:
    """Generated tokens up to and including the first EOS (the rest is padding)."""
    for index, token in enumerate(new):
        if token in eos_ids:
            return index + 1
    return len(new)


def _eos_ids(model) -> set[int]:
    eos = model.generation_config.eos_token_id
    eos = model.config.eos_token_id if eos is None else eos
    return set() if eos is None else ({eos} if isinstance(eos, int) else set(eos))


def decode(model, tokenizer, ids: list[int], mode: str, max_new_tokens: int, block_length: int,
           threshold: float, temperature: float) -> GenerationResult:
    """Run one mode on one prompt and time it."""
    input_ids = torch.tensor([ids], device=model.device)
    calls = {
        "ar": lambda: model.ar_generate(input_ids, max_new_tokens, temperature=temperature),
        "diffusion": lambda: model.generate(input_ids, max_new_tokens, block_length=block_length,
                                            threshold=threshold, temperature=temperature),
        "self_spec": lambda: model.linear_spec_generate(input_ids, max_new_tokens, block_length=block_length,
                                                        temperature=temperature),
    }
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    sequences, nfe = calls[mode]()
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    new = sequences[0, len(ids):].tolist()
    count = count_new_tokens(new, _eos_ids(model))
    text = tokenizer.decode(new[:count], skip_special_tokens=True)
    return GenerationResult(text=text, new_tokens=count, nfe=int(nfe), seconds=seconds)


def run_generate(cfg: DictConfig) -> int:
    """Entry point of `ar2dlm generate`."""
    from ar2dlm.prompt_input import read_prompt

    check_arguments(cfg.mode, cfg.max_new_tokens, cfg.block_length, cfg.threshold, cfg.temperature)
    prompt = read_prompt(cfg)
    model_dir = Path(cfg.model).expanduser()
    config = check_export(model_dir)
    check_served(model_dir, config, [cfg.mode] if cfg.mode != "ar" else [])
    device = resolve_device(cfg.device)
    logger.info("loading %s (%s) on %s", model_dir, (config.get("architectures") or ["?"])[0], device)
    tokenizer, model = load_export(model_dir, device)
    ids = encode_prompt(tokenizer, prompt, config.get("max_position_embeddings"), cfg.max_new_tokens)
    result = decode(model, tokenizer, ids, cfg.mode, cfg.max_new_tokens, cfg.block_length, cfg.threshold,
                    cfg.temperature)
    print(result.text)
    print(result.stats_line())
    return 0
