"""Build megatron-core GPT models whose core attention is the block-diffusion attention.

The model configuration is a megatron-bridge ``GPTModelProvider`` (a ``TransformerConfig`` plus
vocabulary, rotary and embedding fields), normally produced by ``AutoBridge`` from an HF config.
:func:`prepare_provider` adapts it to this project: our layer spec (local on CPU, Transformer Engine
on GPU), rotary embeddings applied inside the core attention, and the fusions that need CUDA turned
off on CPU. :func:`build_model` then returns the model, on CPU or the current GPU.
"""

from __future__ import annotations

import torch
from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_layer_local_spec,
    get_gpt_layer_with_transformer_engine_spec,
)
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.spec_utils import ModuleSpec

from ar2dlm.compat import (
    cuda_allocations_on_cpu,
    cuda_available,
    transformer_engine_available,
)
from ar2dlm.errors import UserError
from ar2dlm.model.core_attention import BlockDiffusionCoreAttention

_CPU_UNAVAILABLE_FUSIONS = (
    "gradient_accumulation_fusion",
    "masked_softmax_fusion",
    "bias_activation_fusion",
    "bias_dropout_fusion",
    "apply_rope_fusion",
    "persist_layer_norm",
    "cross_entropy_loss_fusion",
)


def use_transformer_engine() -> bool:
    return cuda_available() and transformer_engine_available()


def block_diffusion_layer_spec(config) -> ModuleSpec:
    """The transformer layer spec of ``config`` with the block-diffusion core attention."""
    qk_layernorm = bool(getattr(config, "qk_layernorm", False))
    if use_transformer_engine():
        spec = get_gpt_layer_with_transformer_engine_spec(qk_layernorm=qk_layernorm)
    else:
        spec = get_gpt_layer_local_spec(qk_layernorm=qk_layernorm, normalization=config.normalization)
    attention = spec.submodules.self_attention
    attention.submodules.core_attention = BlockDiffusionCoreAttention
    attention.params = {**attention.params, "attn_mask_type": AttnMaskType.arbitrary}
    return spec


def rotary_inv_freq_from_hf(hf_config) -> tuple[float, ...] | None:
    """Inverse rotary frequencies exactly as transformers computes them, for scaled RoPE variants.

    megatron-core's llama3 scaling fixes low/high frequency factors and the original context (1, 4,
    8192) and reads only the factor; taking HF's own table keeps every checkpoint exact.
    """
    scaling = getattr(hf_config, "rope_scaling", None) or {}
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type == "default":
        return None
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    if rope_type not in ROPE_INIT_FUNCTIONS:
        raise UserError(f"rope_scaling type {rope_type!r} is not supported")
    inv_freq, attention_scaling = ROPE_INIT_FUNCTIONS[rope_type](hf_config, "cpu")
    if attention_scaling != 1.0:
        raise UserError(f"rope_scaling type {rope_type!r} scales attention ({attention_scaling}); not supported yet")
    return tuple(inv_freq.float().tolist())


def prepare_provider(provider, *, params_dtype: torch.dtype | None = None, hf_config=None,
                     seq_length: int | None = None):
    """Adapt a megatron-bridge GPT provider in place for block-diffusion training; returns it.

    ``hf_config`` (the source's transformers config) supplies exact rotary tables for scaled RoPE.
    """
    if provider.position_embedding_type not in ("rope", "none"):
        raise UserError(
            f"position embedding {provider.position_embedding_type!r} is not supported; ar2dlm needs rotary embeddings"
        )
    provider.position_embedding_type = "none"  # rotary is applied inside BlockDiffusionCoreAttention
    provider.transformer_layer_spec = block_diffusion_layer_spec
    if hf_config is not None:
        provider.rotary_inv_freq = rotary_inv_freq_from_hf(hf_config)
    if params_dtype is not None:
        provider.params_dtype = params_dtype
        provider.bf16 = params_dtype == torch.bfloat16
        provider.fp16 = params_dtype == torch.float16
    provider.pipeline_dtype = provider.params_dtype
    provider.autocast_dtype = provider.params_dtype
    if seq_length is not None:
        provider.seq_length = max(provider.seq_length, 2 * seq_length)
    if not cuda_available():
        provider.use_cpu_initialization = True
        for name in _CPU_UNAVAILABLE_FUSIONS:
            if hasattr(provider, name):
                setattr(provider, name, False)
    return provider


def build_model(provider, wrap_with_ddp: bool = False, ddp_config=None) -> list[torch.nn.Module]:
    """Instantiate the model chunks (one per virtual pipeline stage) of a prepared provider.

    Pre-wrap hooks registered on the provider (e.g. megatron-bridge's HF weight loading) run here.
    """
    if getattr(provider, "transformer_layer_spec", None) is not block_diffusion_layer_spec:
        raise ValueError("call prepare_provider() on the provider before build_model()")
    if hasattr(provider, "finalize"):
        provider.finalize()
    with cuda_allocations_on_cpu():
        return provider.provide_distributed_model(
            wrap_with_ddp=wrap_with_ddp,
            ddp_config=ddp_config,
            use_cpu_initialization=not cuda_available(),
            mixed_precision_wrapper=None,
        )


def unwrap_model(chunk: torch.nn.Module) -> torch.nn.Module:
    """The GPT model inside data-parallel / mixed-precision wrappers (they keep it as ``.module``)."""
    from megatron.core.distributed.data_parallel_base import _BaseDataParallel
    from megatron.core.transformer.module import Float16Module

    while isinstance(chunk, (_BaseDataParallel, Float16Module)):
        chunk = chunk.module
    return chunk
