"""Parameters of megatron-core's GPT model, as held by one GPU of a tensor x pipeline layout.

Megatron-core splits along the tensor-parallel dimension the vocabulary of the embedding and output layer,
the heads of QKV and of the output projection, and the MLP's width; norms and q/k-norm weights are
replicated on every tensor-parallel rank. Pipeline stages get ``num_layers / pipeline`` layers each; the
first holds the embedding, the last the final norm and the output layer (with tied embeddings and more
than one stage the last stage keeps its own copy of the embedding, synchronised by megatron-core).
Same accounting as megatron-bridge's ``compute_weight_and_optimizer_memory``
(megatron/bridge/training/utils/theoretical_memory_utils.py), per tensor instead of per byte ratio.
"""

from __future__ import annotations

from dataclasses import dataclass

from ar2dlm.planning.shape import ModelShape


@dataclass(frozen=True)
class Parameters:
    """Parameters of one GPU: their count, how many are GEMM weights or norm weights, and the number of tensors."""

    numel: int
    gemm_weights: int  # weights of the transformer layers' linear layers (FP8 GEMMs read them)
    norm_weights: int
    tensors: int

    def __add__(self, other: Parameters) -> Parameters:
        return Parameters(self.numel + other.numel, self.gemm_weights + other.gemm_weights,
                          self.norm_weights + other.norm_weights, self.tensors + other.tensors)

    def times(self, count: int) -> Parameters:
        return Parameters(self.numel * count, self.gemm_weights * count, self.norm_weights * count,
                          self.tensors * count)


def layer_parameters(shape: ModelShape, tensor: int = 1) -> Parameters:
    """One transformer layer on one tensor-parallel rank."""
    h, t = shape.hidden_size, tensor
    qkv = (shape.query_width + 2 * shape.key_value_width) // t
    gemm = qkv * h + h * shape.query_width // t + 2 * shape.ffn_hidden_size // t * h + h * shape.ffn_hidden_size // t
    norms = 2 * h + (2 * shape.head_dim if shape.qk_norm else 0)
    bias = qkv if shape.qkv_bias else 0
    tensors = 4 + 2 + (2 if shape.qk_norm else 0) + (1 if shape.qkv_bias else 0)  # 4 GEMMs, 2 norms
    return Parameters(gemm + norms + bias, gemm, norms, tensors)


def vocabulary_parameters(shape: ModelShape, tensor: int = 1) -> Parameters:
    """The embedding, or the output layer, on one tensor-parallel rank."""
    return Parameters(shape.padded_vocab_size(tensor) // tensor * shape.hidden_size, 0, 0, 1)


def stage_layers(shape: ModelShape, pipeline: int) -> int:
    return shape.num_layers // pipeline


def stage_parameters(shape: ModelShape, tensor: int, pipeline: int, stage: int) -> Parameters:
    """What one GPU of pipeline stage ``stage`` (0-based) holds."""
    first, last = stage == 0, stage == pipeline - 1
    held = layer_parameters(shape, tensor).times(stage_layers(shape, pipeline))
    if first:
        held += vocabulary_parameters(shape, tensor)
    if last:
        held += Parameters(shape.hidden_size, 0, shape.hidden_size, 1)  # final norm
        if not (shape.tied_embeddings and first):
            held += vocabulary_parameters(shape, tensor)
    return held


def model_parameters(shape: ModelShape) -> int:
    """Parameters of the whole model, each counted once (tied embeddings once)."""
    vocabulary = vocabulary_parameters(shape).numel * (1 if shape.tied_embeddings else 2)
    return layer_parameters(shape).numel * shape.num_layers + vocabulary + shape.hidden_size


def gemm_weights_per_token(shape: ModelShape, tensor: int = 1) -> int:
    """Multiply-accumulates per token of one forward pass through the linear layers and the output layer."""
    return layer_parameters(shape).gemm_weights * shape.num_layers + shape.padded_vocab_size(tensor) * shape.hidden_size
