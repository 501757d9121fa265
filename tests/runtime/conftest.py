"""Tiny exported checkpoints (random HF model + tokenizer + runtime) of every family, and prompt batches."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

FAMILIES = ("LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "MistralForCausalLM")
PROMPTS = ([17, 42, 99], [5, 60, 61, 62, 200, 13, 77], [250, 11, 12, 30, 31])


def export_tiny(architecture: str, folder: Path, tokenizer, *, block_size: int = 4, **overrides) -> Path:
    """A random tiny ``architecture`` checkpoint with the ar2dlm runtime installed."""
    from ar2dlm.model.hf_factory import make_hf_model
    from ar2dlm.runtime import install_runtime

    path = make_hf_model(architecture, folder, vocab_size=len(tokenizer) + 4, tokenizer=tokenizer,
                         **overrides)
    mask_id = tokenizer.convert_tokens_to_ids("<|fim_pad|>")
    install_runtime(path, architecture=architecture, mask_token_id=mask_id, block_size=block_size)
    return path


@pytest.fixture
def make_export(tmp_path, tiny_tokenizer):
    """Factory: a fresh tiny export of a family in ``tmp_path`` (config overrides allowed)."""

    def make(architecture: str, name: str = "export", **overrides) -> Path:
        return export_tiny(architecture, tmp_path / name, tiny_tokenizer, **overrides)

    return make


@pytest.fixture(scope="session")
def runtime_exports(tmp_path_factory, tiny_tokenizer) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("runtime_exports")
    return {arch: export_tiny(arch, root / f"rt-{arch}", tiny_tokenizer) for arch in FAMILIES}


@pytest.fixture(scope="session")
def load_runtime(runtime_exports):
    """Factory: (architecture, attn_implementation) -> the exported model loaded with trust_remote_code."""
    from transformers import AutoModelForCausalLM

    loaded = {}

    def load(architecture: str, attn: str = "sdpa", fresh: bool = False):
        key = (architecture, attn)
        if fresh or key not in loaded:
            model = AutoModelForCausalLM.from_pretrained(
                runtime_exports[architecture], trust_remote_code=True, attn_implementation=attn)
            if fresh:
                return model.eval()
            loaded[key] = model.eval()
        return loaded[key]

    return load


@pytest.fixture(scope="session")
def prompt_batch(tiny_tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """The PROMPTS left-padded: (input_ids, attention_mask)."""
    width = max(len(p) for p in PROMPTS)
    pad = tiny_tokenizer.pad_token_id
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in PROMPTS])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in PROMPTS])
    return ids, mask
