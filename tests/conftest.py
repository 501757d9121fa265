"""Shared fixtures: one single-process gloo group for the whole session, and tiny model providers."""

from __future__ import annotations

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def megatron_ready():
    """megatron-core's model-parallel state (world size 1, gloo on CPU) and megatron-bridge imported."""
    from ar2dlm.compat import import_megatron_bridge
    from ar2dlm.distributed import ParallelLayout, init_distributed

    import_megatron_bridge()
    init_distributed(ParallelLayout(), seed=1234)
    yield


@pytest.fixture
def tiny_provider(megatron_ready):
    """A 2-layer GQA GPT provider with q/k norms, prepared for block-diffusion attention."""
    from megatron.bridge.models.gpt_provider import GPTModelProvider

    from ar2dlm.model.gpt import prepare_provider

    provider = GPTModelProvider(
        num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=128,
        vocab_size=128, seq_length=64, normalization="RMSNorm", gated_linear_unit=True,
        activation_func=torch.nn.functional.silu, add_bias_linear=False, qk_layernorm=True,
        position_embedding_type="rope", share_embeddings_and_output_weights=False,
        make_vocab_size_divisible_by=1, hidden_dropout=0.0, attention_dropout=0.0,
    )
    return prepare_provider(provider)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """A byte-level BPE tokenizer with an unused ``<|fim_pad|>`` special token (Qwen-style)."""
    from ar2dlm.model.hf_factory import train_tokenizer

    texts = ["the quick brown fox jumps over the lazy dog", "0 1 2 3 4 5 6 7 8 9 + - = reverse sort copy"] * 10
    return train_tokenizer(texts, vocab_size=300, extra_special_tokens=["<|fim_pad|>"])


@pytest.fixture
def make_tiny_hf(tmp_path, tiny_tokenizer):
    """Factory: a tiny random HF checkpoint of a family, saved with the tiny tokenizer."""
    from ar2dlm.model.hf_factory import make_hf_model

    def make(architecture: str, tied: bool = False, tokenizer=None, name: str | None = None, **overrides):
        tokenizer = tokenizer or tiny_tokenizer
        vocab = overrides.pop("vocab_size", len(tokenizer) + 4)
        return make_hf_model(architecture, tmp_path / (name or f"{architecture}-{'tied' if tied else 'untied'}"),
                             vocab_size=vocab, tie_word_embeddings=tied, tokenizer=tokenizer, **overrides)

    return make
