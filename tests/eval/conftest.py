"""A tiny exported tri-mode Llama (tokenizer trained on the demo corpus), its loaded model, held-out
demo examples, and a model whose logits are uniform."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import pytest

BLOCK = 4


def export_tiny_llama(folder: Path, tokenizer, *, block_size: int = BLOCK, seed: int = 0) -> Path:
    from ar2dlm.conversion.runtime_install import install_runtime
    from ar2dlm.model.hf_factory import make_hf_model

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


@pytest.fixture
def fresh(tiny_export):
    """Factory: a new (model, tokenizer) of the tiny export, free to modify."""
    return lambda: load(tiny_export)


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


@pytest.fixture(scope="session")
def trained(tiny_export):
    """(model, tokenizer): the tiny export after 60 joint AR + diffusion steps on the demo corpus (in
    memory), so that rows stop at EOS at different places and some drafts are accepted."""
    from ar2dlm.data.synthetic import split_corpus
    from ar2dlm.eval.toy import train_toy

    model, tokenizer = load(tiny_export)
    with one_torch_thread():
        train_toy(model, tokenizer, [example.text for example in split_corpus(400, 1, seed=0)[0]], steps=60)
    return model, tokenizer


@contextmanager
def one_torch_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy 2-core machine the threads' barriers
    cost far more than the work (10x measured): run on one thread, then restore the setting."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    with one_torch_thread():
        yield
