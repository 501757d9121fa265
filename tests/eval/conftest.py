"""A tiny exported tri-mode Llama (tokenizer trained on the demo corpus), its loaded model, held-out
demo examples, and a model whose logits are uniform."""

from __future__ import annotations

from pathlib import Path

import pytest

BLOCK = 4


def export_tiny_llama(folder: Path, tokenizer, *, block_size: int = BLOCK, seed: int = 0) -> Path:
    from ar2dlm.model.hf_factory import make_hf_model
    from ar2dlm.runtime import install_runtime

    path = make_hf_model("LlamaForCausalLM", folder, vocab_size=len(tokenizer) + 4, tokenizer=tokenizer,
                         hidden_size=32, num_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=64, seed=seed)
    install_runtime(path, architecture="LlamaForCausalLM", block_size=block_size,
                    mask_token_id=tokenizer.convert_tokens_to_ids("<|fim_pad|>"))
    return path


@pytest.fixture(scope="session")
def demo_tokenizer():
    from ar2dlm.data.synthetic import examples
    from ar2dlm.model.hf_factory import train_tokenizer

    texts = [example.text for example in examples(200, seed=99)]
    return train_tokenizer(texts, vocab_size=300, extra_special_tokens=["<|fim_pad|>"])


@pytest.fixture(scope="session")
def tiny_export(tmp_path_factory, demo_tokenizer) -> Path:
    return export_tiny_llama(tmp_path_factory.mktemp("eval_export") / "tiny", demo_tokenizer)


def load(path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).eval()
    return model, AutoTokenizer.from_pretrained(path)


@pytest.fixture(scope="session")
def tiny(tiny_export):
    """(model, tokenizer) of the tiny export."""
    return load(tiny_export)


@pytest.fixture(scope="session")
def uniform(tiny_export):
    """(model, tokenizer) of the tiny export with its lm_head zeroed: every logit is 0, so every
    next-token distribution is uniform over the vocabulary."""
    import torch

    model, tokenizer = load(tiny_export)
    with torch.no_grad():
        model.get_output_embeddings().weight.zero_()
    return model, tokenizer


@pytest.fixture(scope="session")
def held_out():
    from ar2dlm.data.synthetic import split_corpus

    return split_corpus(100, 5, seed=0)[1]
