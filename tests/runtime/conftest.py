"""Tiny exported checkpoints of every family, loaded with trust_remote_code, and a batch of prompts (the
known-answer export and the export factories are in tests/conftest.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ar2dlm.conversion.hf_source import SUPPORTED_ARCHITECTURES

FAMILIES = SUPPORTED_ARCHITECTURES
PROMPTS = ([17, 42, 99], [5, 60, 61, 62, 200, 13, 77], [250, 11, 12, 30, 31])


@pytest.fixture(scope="session")
def runtime_exports(tmp_path_factory, tiny_tokenizer, export_tiny) -> dict[str, Path]:
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
