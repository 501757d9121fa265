"""The architecture a plan sizes.

Two sources, in this order:

1. ``init=`` an ar2dlm checkpoint: its ``hf/config.json`` goes through megatron-bridge's provider, the
   same path ``train`` builds the model by, so the numbers are the trained model's (vocabulary grown by
   ``convert`` included).
2. the ``model.*`` keys of the train config: the published recipes describe the HF model they are laid
   out for in ``recipes/recipe_common/model/<model>.yaml``, so ``ar2dlm plan recipe=...`` needs no
   download. Family traits (q/k norms, QKV bias, tied embeddings) are part of that data.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

from omegaconf import DictConfig

from ar2dlm.errors import UserError

DESCRIBING_KEYS = ("hidden_size", "num_layers", "num_attention_heads", "num_key_value_heads", "ffn_hidden_size",
                   "vocab_size")


@dataclass(frozen=True)
class ModelShape:
    """A decoder of ``num_layers`` pre-norm layers: GQA self-attention with rotary embeddings, a SwiGLU MLP,
    RMSNorm, no biases but an optional QKV bias (megatron-core's GPT model as megatron-bridge builds the
    Llama, Qwen2, Qwen3 and Mistral families)."""

    hidden_size: int
    num_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    ffn_hidden_size: int
    vocab_size: int
    tied_embeddings: bool = False
    qkv_bias: bool = False
    qk_norm: bool = False
    vocab_padding_multiple: int = 1  # megatron pads the vocabulary to a multiple of this x TP (1: no padding)
    name: str = ""
    source: str = ""  # where the numbers come from, as shown to the user

    @property
    def query_width(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def key_value_width(self) -> int:
        return self.num_key_value_heads * self.head_dim

    def padded_vocab_size(self, tensor: int) -> int:
        multiple = self.vocab_padding_multiple * tensor if self.vocab_padding_multiple > 1 else 1
        return -(-self.vocab_size // multiple) * multiple

    def differences(self, other: ModelShape) -> list[str]:
        """``"key a vs b"`` for each architecture number where the two shapes differ."""
        ignored = ("name", "source", "vocab_padding_multiple")
        return [f"{f.name} {getattr(self, f.name)} vs {getattr(other, f.name)}" for f in fields(self)
                if f.name not in ignored and getattr(self, f.name) != getattr(other, f.name)]


def shape_from_description(model: DictConfig) -> ModelShape | None:
    """The shape the config's ``model.*`` keys describe; None when they describe nothing."""
    given = {key: model[key] for key in DESCRIBING_KEYS if model[key] is not None}
    if not given:
        return None
    missing = [f"model.{key}" for key in DESCRIBING_KEYS if key not in given]
    if missing:
        raise UserError(f"the model description is incomplete: {', '.join(missing)} missing")
    heads = model.num_attention_heads
    if model.head_dim is None and model.hidden_size % heads:
        raise UserError(f"model.hidden_size={model.hidden_size} is not a multiple of model.num_attention_heads="
                        f"{heads}: give model.head_dim")
    return ModelShape(
        hidden_size=model.hidden_size, num_layers=model.num_layers, num_attention_heads=heads,
        num_key_value_heads=model.num_key_value_heads, head_dim=model.head_dim or model.hidden_size // heads,
        ffn_hidden_size=model.ffn_hidden_size, vocab_size=model.vocab_size, tied_embeddings=model.tied_embeddings,
        qkv_bias=model.qkv_bias, qk_norm=model.qk_norm, name=model.name or "",
        source="the model.* keys of the recipe or the overrides",
    )


def shape_from_provider(provider, *, name: str = "", source: str = "") -> ModelShape:
    """The shape of the model a megatron-bridge GPT provider builds."""
    unsupported = [text for text, present in (
        ("biases on every linear layer", provider.add_bias_linear),
        ("a non-gated MLP", not provider.gated_linear_unit),
        (f"{provider.normalization} normalisation", provider.normalization != "RMSNorm"),
    ) if present]
    if unsupported:
        raise UserError(f"{name or 'this model'} has {', '.join(unsupported)}: plan sizes Llama / Qwen2 / Qwen3 / "
                        "Mistral-style decoders only")
    heads = provider.num_attention_heads
    return ModelShape(
        hidden_size=provider.hidden_size, num_layers=provider.num_layers, num_attention_heads=heads,
        num_key_value_heads=provider.num_query_groups or heads,
        head_dim=provider.kv_channels or provider.hidden_size // heads, ffn_hidden_size=provider.ffn_hidden_size,
        vocab_size=provider.vocab_size, tied_embeddings=bool(provider.share_embeddings_and_output_weights),
        qkv_bias=bool(provider.add_qkv_bias), qk_norm=bool(provider.qk_layernorm),
        vocab_padding_multiple=provider.make_vocab_size_divisible_by if provider.should_pad_vocab else 1,
        name=name, source=source,
    )


def shape_from_checkpoint(directory: str | Path) -> ModelShape:
    """The shape of an ar2dlm checkpoint's model, read as ``train`` reads it (no weights are loaded)."""
    from transformers import AutoConfig

    from ar2dlm.conversion.bridge import bridge_from_config
    from ar2dlm.model.checkpoint import HF_DIR, read_metadata

    path = Path(directory).expanduser()
    metadata = read_metadata(path)  # one clear error when init is not an ar2dlm checkpoint
    hf_config = AutoConfig.from_pretrained(path / HF_DIR, trust_remote_code=False)
    provider = bridge_from_config(hf_config).to_megatron_provider(load_weights=False)
    return shape_from_provider(provider, name=metadata.source or metadata.architecture,
                               source=f"the init checkpoint {path}")


def planned_shape(cfg: DictConfig) -> tuple[ModelShape, list[str]]:
    """The shape to plan for, and notes for the user (the checkpoint and the description disagree)."""
    described = shape_from_description(cfg.model)
    if cfg.init is None:
        if described is None:
            raise UserError("no model to plan for: give init=CHECKPOINT (an ar2dlm checkpoint), a recipe that "
                            "describes its model, or the model.* keys (model.hidden_size=... , see --help)")
        return described, []
    shape = shape_from_checkpoint(cfg.init)
    differences = described.differences(shape) if described is not None else []
    notes = [f"the init checkpoint differs from the model description ({', '.join(differences)}); planned for the "
             "checkpoint"] if differences else []
    return shape, notes
