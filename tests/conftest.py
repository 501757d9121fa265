"""Shared fixtures: one single-process gloo group for the whole session, tiny model providers, tiny HF
checkpoints and exports, and the known-answer export."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch


def pytest_configure(config):
    from ar2dlm.compat import configure_torch_for_cpu

    configure_torch_for_cpu()  # what the command line does at process start


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


def _export_tiny(architecture: str, folder: Path, tokenizer, *, block_size: int = 4, **overrides) -> Path:
    """A random tiny ``architecture`` checkpoint with the ar2dlm runtime installed."""
    from ar2dlm.conversion.runtime_install import install_runtime
    from ar2dlm.model.hf_factory import make_hf_model

    path = make_hf_model(architecture, folder, vocab_size=len(tokenizer) + 4, tokenizer=tokenizer,
                         **overrides)
    mask_id = tokenizer.convert_tokens_to_ids("<|fim_pad|>")
    install_runtime(path, architecture=architecture, mask_token_id=mask_id, block_size=block_size)
    return path


@pytest.fixture
def make_export(tmp_path, tiny_tokenizer):
    """Factory: a fresh tiny export of a family in ``tmp_path`` (config overrides allowed)."""

    def make(architecture: str, name: str = "export", **overrides) -> Path:
        return _export_tiny(architecture, tmp_path / name, tiny_tokenizer, **overrides)

    return make


@pytest.fixture(scope="session")
def export_tiny():
    """Function: (architecture, folder, tokenizer, block_size=4, **config overrides) -> a tiny export."""
    return _export_tiny


# The known-answer model: weights built so that every decoding step is known in advance (see known_export).
SINK, CHAIN, FIXED, OTHER = 262, (40, 41, 42, 43), 44, 45  # 262 = "the"; CHAIN[0] follows any unlisted token
NO_ROTATION_THETA = 1e16  # RoPE frequencies of head dims 2 and 3 become ~1e-8 and ~1e-12 rad per position


def successor(token: int) -> int:
    """The known model's AR rule: CHAIN[0] -> ... -> CHAIN[-1] -> FIXED -> FIXED ...; OTHER -> CHAIN[0]."""
    if token in CHAIN[:-1]:
        return CHAIN[CHAIN.index(token) + 1]
    return FIXED if token in (CHAIN[-1], FIXED) else CHAIN[0]


def known_answer_export(folder: Path, tokenizer, *, mask_id: int, block_size: int = 4, **overrides) -> Path:
    """A one-layer Llama whose answers are known (runtime tests of drafts, acceptance, NFE, block attention).

    Residual stream: one dimension per token (the embedding is one-hot) plus a dimension ``u``; the MLP is zero.
    - A non-mask token predicts ``successor(token)`` (its attention reads nothing: it scores the SINK key -50 and
      every key it may see carries a zero value except SINK's).
    - A mask token scores SINK and mask keys 0 and every other key -50, and reads SINK's value 1 into ``u``: with
      one SINK and n visible masks (itself included), u = 1 / (1 + n). It predicts FIXED, unless u > 0.4 (it sees
      no other mask: u = 1/2), then OTHER. So a mask's answer tells how many masks it can see: in a draft or
      denoising pass of a block with k >= 2 masks, attention inside the block is bidirectional iff every mask
      predicts FIXED; a causal block makes its first mask predict OTHER.
    Confidences: FIXED 0.985 with 3 masks visible, 0.87 with 2, OTHER 0.94 with 1; AR answers 0.9999.
    """
    import transformers

    vocab, hidden, head_dim = len(tokenizer) + 4, len(tokenizer) + 5, 8
    u = hidden - 1
    config = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=4, num_hidden_layers=1, num_attention_heads=1,
        num_key_value_heads=1, head_dim=head_dim, rope_theta=NO_ROTATION_THETA, rms_norm_eps=1e-12,
        tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, torch_dtype="float32", **overrides)
    config.architectures = ["LlamaForCausalLM"]
    model = transformers.LlamaForCausalLM(config).eval()
    scale = hidden**-0.5  # RMSNorm turns a one-hot row into sqrt(hidden) times itself
    others = [t for t in range(vocab) if t not in (SINK, mask_id)]
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.zero_()
        for norm in (model.model.norm, model.model.layers[0].input_layernorm,
                     model.model.layers[0].post_attention_layernorm):
            norm.weight.fill_(1.0)
        model.model.embed_tokens.weight.copy_(torch.eye(vocab, hidden))
        attention = model.model.layers[0].self_attn
        query = -50.0 * head_dim**0.5 * scale  # with key entries `scale`: a score of -50 after 1/sqrt(head_dim)
        attention.k_proj.weight[2, SINK] = scale
        attention.k_proj.weight[3, others] = scale
        attention.q_proj.weight[3, mask_id] = query  # a mask ignores every key but SINK and masks
        attention.q_proj.weight[2, [t for t in range(vocab) if t != mask_id]] = query  # others ignore SINK
        attention.v_proj.weight[0, SINK] = scale
        attention.o_proj.weight[u, 0] = 1.0
        head = model.lm_head.weight  # the final norm scales by sqrt(hidden) / |x|: logits = w . x / |x|
        for token in others:
            head[successor(token), token] = 15.0 * scale
        head[successor(SINK), SINK] = 15.0 * scale
        head[FIXED, mask_id] = 12.0 * scale
        head[OTHER, u] = 30.0 * scale
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    from ar2dlm.conversion.runtime_install import install_runtime

    install_runtime(folder, architecture="LlamaForCausalLM", mask_token_id=mask_id, block_size=block_size)
    return folder


@dataclass(frozen=True)
class KnownAnswer:
    """The known-answer export and its token roles (see :func:`known_answer_export`)."""

    path: Path
    mask: int
    sink: int = SINK
    chain: tuple[int, ...] = CHAIN
    fixed: int = FIXED
    other: int = OTHER

    def successor(self, token: int) -> int:
        return successor(token)

    def load(self, attn: str = "sdpa"):
        """The export loaded with trust_remote_code (a fresh model each call)."""
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(self.path, trust_remote_code=True, attn_implementation=attn).eval()


@pytest.fixture(scope="session")
def known(tmp_path_factory, tiny_tokenizer) -> KnownAnswer:
    mask_id = tiny_tokenizer.convert_tokens_to_ids("<|fim_pad|>")
    path = known_answer_export(tmp_path_factory.mktemp("known") / "known", tiny_tokenizer, mask_id=mask_id,
                               max_position_embeddings=64)
    return KnownAnswer(path, mask_id)


@pytest.fixture
def make_run_setup(make_tiny_hf, tmp_path, megatron_ready):
    """Factory: ``make(architecture, tied, **hf_config)`` converts a tiny random model of that family and writes a
    corpus; returns ``(cfg, output)`` where ``cfg(*overrides, stage="train")`` composes a tiny joint-training
    config on it (``stage="plan"``: the same config for `ar2dlm plan`)."""
    from ar2dlm.config import compose_stage
    from ar2dlm.conversion.convert import convert
    from ar2dlm.data.synthetic import examples, write_jsonl

    corpus = write_jsonl(tmp_path / "corpus.jsonl", list(examples(200, seed=0)))
    made = []

    def make(architecture: str = "Qwen3ForCausalLM", tied: bool = True, **hf_config):
        suffix = f"-{len(made)}" if made else ""  # the first keeps the names other tests expect
        name = f"{architecture}-{'tied' if tied else 'untied'}{suffix}"
        converted = tmp_path / f"converted{suffix}"
        convert(make_tiny_hf(architecture, tied=tied, name=name, **hf_config), converted)
        made.append(converted)

        def cfg(*overrides, stage: str = "train"):
            return compose_stage(stage, [
                f"init={converted}", f"output={tmp_path / 'run'}", "recipe=tiny",
                f"data.sources=[{{path: {corpus}}}]", "data.seq_length=32", "diffusion.block_size=8",
                "train.global_batch_size=4", "train.micro_batch_size=2", "optim.lr=3e-3", "optim.warmup_steps=1",
                *overrides,
            ])

        return cfg, tmp_path / "run"

    return make


@pytest.fixture
def run_setup(make_run_setup):
    """``cfg(*overrides)`` composes a tiny joint-training config on a converted Qwen3; returns (cfg, output)."""
    return make_run_setup()
