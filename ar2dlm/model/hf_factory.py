"""Small HF causal-LM checkpoints made locally: a byte-level BPE tokenizer and a random model of any
supported family. The demo uses them as the stand-in for a user's pretrained model; tests use them
to prove conversion and decoding exact for every family."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch

SPECIAL_TOKENS = ("<|bos|>", "<|eos|>", "<|pad|>")

# family -> extra config fields that make the tiny model exercise the family's peculiarities
FAMILY_DEFAULTS: dict[str, dict] = {
    "LlamaForCausalLM": {"attention_bias": False, "mlp_bias": False},
    "MistralForCausalLM": {"sliding_window": None},
    "Qwen2ForCausalLM": {"use_sliding_window": False},
    "Qwen3ForCausalLM": {"use_sliding_window": False, "attention_bias": False},
}


def train_tokenizer(texts: Iterable[str], vocab_size: int, extra_special_tokens: Iterable[str] = ()):
    """A byte-level BPE tokenizer trained on ``texts``, as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = list(SPECIAL_TOKENS) + list(extra_special_tokens)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<|bos|>", eos_token="<|eos|>", pad_token="<|pad|>",
        additional_special_tokens=list(extra_special_tokens) or None,
    )


def make_hf_model(architecture: str, output: str | Path, *, vocab_size: int, hidden_size: int = 64,
                  num_layers: int = 2, num_attention_heads: int = 4, num_key_value_heads: int = 2,
                  intermediate_size: int = 128, tie_word_embeddings: bool = False, tokenizer=None,
                  seed: int = 0, max_position_embeddings: int = 4096, **config_overrides) -> Path:
    """Save a randomly initialised ``architecture`` model (float32, safetensors) and its tokenizer."""
    import transformers

    if architecture not in FAMILY_DEFAULTS:
        raise ValueError(f"unknown architecture {architecture!r}; known: {', '.join(FAMILY_DEFAULTS)}")
    model_class = getattr(transformers, architecture)
    fields = dict(
        vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_layers,
        num_attention_heads=num_attention_heads, num_key_value_heads=num_key_value_heads,
        intermediate_size=intermediate_size, tie_word_embeddings=tie_word_embeddings,
        max_position_embeddings=max_position_embeddings, torch_dtype="float32",
        **FAMILY_DEFAULTS[architecture],
    )
    if tokenizer is not None:
        fields.update(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                      pad_token_id=tokenizer.pad_token_id)
    fields.update(config_overrides)
    config = model_class.config_class(**fields)
    config.architectures = [architecture]
    torch.manual_seed(seed)
    model = model_class(config).float().eval()
    with torch.no_grad():  # move norms and biases off their defaults so that loading mistakes show
        for name, parameter in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith(".bias"):
                parameter.add_(0.1 * torch.randn_like(parameter))
    path = Path(output)
    model.save_pretrained(path, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return path
