"""Bytes per GPU of a training run: model states, the activations of the micro-batches in flight, the mask.

Sources:

- [K] Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models"
  (arXiv:2205.05198): activation memory is the set of tensors each layer keeps for its backward (§4.1);
  tensor parallelism splits the attention and MLP ones by t, sequence parallelism also the layer-norm ones
  (§4.2); selective recompute drops the core attention's, full recompute keeps one input per layer (§5);
  1F1B keeps ``pipeline`` micro-batches in flight on the first stage (§4.2.3).
- [M] megatron-bridge ``training/utils/theoretical_memory_utils.py`` (Megatron-LM's
  ``theoretical_memory_usage.py``): 18 bytes per parameter, 6 + 12 / DP with the distributed optimizer;
  4 bytes per logit for the output layer and the cross entropy.
- [Z] Rajbhandari et al. 2020, "ZeRO" (arXiv:1910.02054): optimizer state sharded over data-parallel ranks
  (stage 1, megatron-core's distributed optimizer, which shards over data x context ranks).

[K] counts GPT-3 layers (4h GELU MLP, dropout, attention scores in memory). ar2dlm's layers are SwiGLU,
GQA, RMSNorm, no dropout, with a kernel that keeps no score matrix, so the tensors are listed here one by
one, as the two layer implementations keep them: Transformer Engine's fused layers (GPU) and megatron-core's
local layers built from torch operations (CPU; each entry checked against the autograd graph of a real step,
tests/planning/test_memory.py). The peak is the larger of the end of the forward pass and the first MLP
backward, where the loss tensors are gone and the gradient workspace appears.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ar2dlm.planning.attention_work import FLEX_TILE, split_chunk_keys
from ar2dlm.planning.parameters import Parameters, stage_layers, stage_parameters
from ar2dlm.planning.run import PlannedRun
from ar2dlm.planning.shape import ModelShape

FP8_BYTES = 1
FP32_BYTES = 4


@dataclass(frozen=True)
class Saved:
    """A tensor a transformer layer keeps for its backward: its width in elements per token, how tensor
    parallelism splits it ("tensor": always; "sequence": with sequence parallelism only) and its kind:
    "activation" (the compute dtype), "gemm_input" (the compute dtype, one byte under FP8), "fp32", "fp8_only"
    (exists only under FP8), "upcast_only" (an fp32 copy that exists only when the compute dtype is narrower).
    ``core_attention``: inside the module that selective recompute recomputes."""

    what: str
    width: Callable[[ModelShape], int]
    split: str
    kind: str = "activation"
    core_attention: bool = False


def _q_norm(s: ModelShape, width: int) -> int:
    return width if s.qk_norm else 0


TRANSFORMER_ENGINE_LAYER = (
    Saved("input norm: input (the layer's input)", lambda s: s.hidden_size, "sequence"),
    Saved("input norm: output = QKV GEMM input", lambda s: s.hidden_size, "sequence", "gemm_input"),
    Saved("norm statistics (rsigma of both norms)", lambda s: 2, "sequence", "fp32"),
    Saved("QKV output (K and V stay views of it)", lambda s: s.query_width + 2 * s.key_value_width, "tensor"),
    Saved("Q before its norm (a reshaped copy)", lambda s: _q_norm(s, s.query_width), "tensor"),
    Saved("q/k norm statistics", lambda s: _q_norm(s, s.num_attention_heads + s.num_key_value_heads), "tensor", "fp32"),
    Saved("rotated Q and K", lambda s: s.query_width + s.key_value_width, "tensor", core_attention=True),
    Saved("attention log-sum-exp", lambda s: s.num_attention_heads, "tensor", "fp32", core_attention=True),
    Saved("attention output = projection GEMM input", lambda s: s.query_width, "tensor"),
    Saved("projection GEMM input in FP8", lambda s: s.query_width, "tensor", "fp8_only"),
    Saved("pre-MLP norm: input", lambda s: s.hidden_size, "sequence"),
    Saved("pre-MLP norm: output = FC1 GEMM input", lambda s: s.hidden_size, "sequence", "gemm_input"),
    Saved("FC1 output = SwiGLU input", lambda s: 2 * s.ffn_hidden_size, "tensor"),
    Saved("SwiGLU output = FC2 GEMM input", lambda s: s.ffn_hidden_size, "tensor", "gemm_input"),
)

LOCAL_LAYER = (  # torch's RMSNorm computes in fp32 and keeps x and x * rstd; the unfused SwiGLU keeps both halves
    Saved("input norm: input (the layer's input), in fp32", lambda s: s.hidden_size, "sequence", "fp32"),
    Saved("input norm: x * rstd, in fp32", lambda s: s.hidden_size, "sequence", "fp32"),
    Saved("input norm: output = QKV GEMM input", lambda s: s.hidden_size, "sequence"),
    Saved("norm rstd", lambda s: 2, "sequence", "fp32"),
    Saved("QKV output (K and V stay views of it)", lambda s: s.query_width + 2 * s.key_value_width, "tensor"),
    Saved("Q before its norm, in fp32 (a reshaped copy)", lambda s: _q_norm(s, s.query_width), "tensor", "fp32"),
    Saved("K before its norm, upcast to fp32", lambda s: _q_norm(s, s.key_value_width), "tensor", "upcast_only"),
    Saved("q/k norm: x * rstd, in fp32", lambda s: _q_norm(s, s.query_width + s.key_value_width), "tensor", "fp32"),
    Saved("q/k norm rstd", lambda s: _q_norm(s, s.num_attention_heads + s.num_key_value_heads), "tensor", "fp32"),
    Saved("rotated Q and K", lambda s: s.query_width + s.key_value_width, "tensor", core_attention=True),
    Saved("attention log-sum-exp", lambda s: s.num_attention_heads, "tensor", "fp32", core_attention=True),
    Saved("attention output = projection GEMM input", lambda s: s.query_width, "tensor"),
    Saved("pre-MLP norm: input, in fp32", lambda s: s.hidden_size, "sequence", "fp32"),
    Saved("pre-MLP norm: x * rstd, in fp32", lambda s: s.hidden_size, "sequence", "fp32"),
    Saved("pre-MLP norm: output = FC1 GEMM input", lambda s: s.hidden_size, "sequence"),
    Saved("FC1 output (SiLU's input is its gate half)", lambda s: 2 * s.ffn_hidden_size, "tensor"),
    Saved("SiLU(gate) and the up half", lambda s: 2 * s.ffn_hidden_size, "tensor"),
    Saved("SwiGLU output = FC2 GEMM input", lambda s: s.ffn_hidden_size, "tensor"),
)

# the last stage's head before the loss: final norm and the output layer's input
TRANSFORMER_ENGINE_HEAD = (
    Saved("final norm: input", lambda s: s.hidden_size, "sequence"),
    Saved("final norm: rsigma", lambda s: 1, "sequence", "fp32"),
    Saved("final norm: output = output layer input", lambda s: s.hidden_size, "sequence"),
)
LOCAL_HEAD = (
    Saved("final norm: input, in fp32", lambda s: s.hidden_size, "sequence", "fp32"),
    Saved("final norm: x * rstd, in fp32", lambda s: s.hidden_size, "sequence", "fp32"),
    Saved("final norm: rstd", lambda s: 1, "sequence", "fp32"),
    Saved("final norm: output = output layer input", lambda s: s.hidden_size, "sequence"),
)
LAYER_TABLES = {"gpu": TRANSFORMER_ENGINE_LAYER, "cpu": LOCAL_LAYER}
HEAD_TABLES = {"gpu": TRANSFORMER_ENGINE_HEAD, "cpu": LOCAL_HEAD}


# ---------------------------------------------------------------------------------------------- model states

@dataclass(frozen=True)
class StateMemory:
    parameters: int
    gradients: int
    optimizer: int  # as configured
    optimizer_distributed: int  # sharded over data x context ranks [Z]
    optimizer_replicated: int
    fp8_weight_copies: int  # Transformer Engine's FP8 copy and transpose of each GEMM weight

    @property
    def total(self) -> int:
        return self.parameters + self.gradients + self.optimizer + self.fp8_weight_copies


def state_memory(run: PlannedRun, held: Parameters) -> StateMemory:
    """States of the parameters ``held`` by one GPU.

    GPU (ar2dlm/training/data_parallel.py, optim.py): megatron-core DDP reduces gradients into an fp32 buffer,
    megatron-core's Adam keeps an fp32 main copy of bf16 weights and two fp32 moments: 2 + 4 + 12 bytes per
    bf16 parameter [M]; fp32 weights are their own main copy (4 + 4 + 8). CPU: torch AdamW over ``param.grad``,
    everything in the parameters' dtype (norm weights stay fp32: megatron-core's local spec builds them with
    torch's defaults), plus one fp32 step counter per parameter tensor.
    """
    weight = run.activation_bytes  # parameters are in the compute precision (train.precision)
    if run.device == "cpu":
        weights = weight * (held.numel - held.norm_weights) + FP32_BYTES * held.norm_weights
        optimizer = 2 * weights + FP32_BYTES * held.tensors
        return StateMemory(weights, weights, optimizer, optimizer, optimizer, 0)
    per_parameter = 12 if weight == 2 else 8
    replicated = per_parameter * held.numel
    distributed = -(-replicated // (run.data * run.context))
    fp8_copies = 2 * FP8_BYTES * held.gemm_weights if run.fp8 else 0
    return StateMemory(weight * held.numel, FP32_BYTES * held.numel,
                       distributed if run.distributed_optimizer else replicated, distributed, replicated, fp8_copies)


# ---------------------------------------------------------------------------------------------- activations

def _bytes(run: PlannedRun, kind: str) -> int:
    return {"activation": run.activation_bytes, "fp32": FP32_BYTES,
            "gemm_input": FP8_BYTES if run.fp8 else run.activation_bytes,
            "fp8_only": FP8_BYTES if run.fp8 else 0,
            "upcast_only": FP32_BYTES if run.activation_bytes < FP32_BYTES else 0}[kind]


def _split(run: PlannedRun, split: str) -> int:
    return run.tensor if split == "tensor" or run.sequence_parallel else 1


def _tensor_bytes(run: PlannedRun, width: int, split: str, kind: str = "activation") -> int:
    """Bytes of a [tokens of one micro-batch on this GPU, width] tensor."""
    return run.local_tokens * width // _split(run, split) * _bytes(run, kind)


def _table_bytes(run: PlannedRun, entries) -> int:
    return sum(_tensor_bytes(run, entry.width(run.shape), entry.split, entry.kind) for entry in entries)


def attention_kernel_bytes(run: PlannedRun) -> int:
    """What the attention kernel keeps per layer beyond Q, K, V and its output (recomputed by selective):
    SDPA the mask converted to the compute dtype (an additive bias), ``split`` its chunks' masks, gathered keys
    and values and outputs, context parallelism the all-gathered keys and values."""
    s, e, rows = run.shape, run.activation_bytes, run.mask_rows
    key_value = 2 * s.key_value_width // run.tensor
    positions, length = run.positions, run.seq_length
    gathered = run.micro_batch_size * positions * key_value * e if run.context > 1 else 0
    if run.kernel == "sdpa":
        return gathered + rows * (positions // run.context) * positions * e
    if run.kernel == "split":
        keys, mask_entries = split_chunk_keys(length, run.block_size, run.documents)
        clean_mask = rows * length * length * e if run.documents or run.layout != "doubled_causal" else 0
        chunk_outputs = run.micro_batch_size * positions * s.query_width // run.tensor * e
        return (clean_mask + rows * mask_entries * e + run.micro_batch_size * keys * key_value * e
                + chunk_outputs)
    return gathered


def selective_checkpoint_inputs(s: ModelShape) -> int:
    """Width of the core attention's inputs that selective recompute's checkpoint keeps: normed Q and K (new
    tensors with q/k norms), or the reshaped Q copy alone (K and V are views of the QKV output)."""
    return s.query_width + (s.key_value_width if s.qk_norm else 0)


def layer_bytes(run: PlannedRun, recompute: str | None = None) -> int:
    """Bytes one layer keeps for its backward, for one micro-batch."""
    recompute = run.recompute if recompute is None else recompute
    table = LAYER_TABLES[run.device]
    if recompute == "full":
        return _tensor_bytes(run, run.shape.hidden_size, "sequence")  # the layer's input [K §5]
    if recompute == "selective":
        kept = [entry for entry in table if not entry.core_attention]
        return _table_bytes(run, kept) + _tensor_bytes(run, selective_checkpoint_inputs(run.shape), "tensor")
    return _table_bytes(run, table) + attention_kernel_bytes(run)


def loss_bytes(run: PlannedRun) -> tuple[int, int]:
    """(kept, transient) of the last stage's head: final norm, output layer input and cross entropy. The
    vocab-parallel cross entropy keeps fp32 softmax of [tokens, vocab / t] [M]; in bf16 the logits exist in
    both dtypes while they are converted."""
    vocab = run.shape.padded_vocab_size(run.tensor) // run.tensor
    logits = run.local_tokens * vocab
    kept = (_table_bytes(run, HEAD_TABLES[run.device]) + logits * FP32_BYTES
            + run.local_tokens * (8 + 8 + 1))  # input ids, target indices, target mask
    transient = logits * run.activation_bytes if run.activation_bytes < FP32_BYTES else 0
    return kept, transient


def mlp_backward_workspace(run: PlannedRun) -> int:
    """Gradients alive in an MLP's backward: of the layer output, the SwiGLU output and the FC1 output."""
    return _tensor_bytes(run, run.shape.hidden_size, "sequence") + _tensor_bytes(run, 3 * run.shape.ffn_hidden_size,
                                                                                  "tensor")


def in_flight(run: PlannedRun, stage: int) -> int:
    """Micro-batches whose activations stage ``stage`` holds at once under 1F1B [K §4.2.3]."""
    return min(run.pipeline - stage, run.micro_batches)


@dataclass(frozen=True)
class ActivationMemory:
    peak: int  # the stage's activation peak: in-flight micro-batches, loss, gradient workspace
    layers: int  # kept by its layers for one micro-batch
    loss: int  # kept and transient bytes of the loss head (last stage)
    in_flight: int


def activation_memory(run: PlannedRun, stage: int) -> ActivationMemory:
    layers = stage_layers(run.shape, run.pipeline)
    kept = layers * layer_bytes(run)
    loss_kept, loss_transient = loss_bytes(run) if stage == run.pipeline - 1 else (0, 0)
    forward_end = kept + loss_kept + loss_transient
    recomputed_layer = layer_bytes(run, "none") - layer_bytes(run, "full") if run.recompute == "full" else 0
    fc2_input = _tensor_bytes(run, run.shape.ffn_hidden_size, "tensor", "gemm_input")
    first_backward = kept + recomputed_layer - fc2_input + mlp_backward_workspace(run)
    flights = in_flight(run, stage)
    peak = (flights - 1) * kept + max(forward_end, first_backward)
    return ActivationMemory(peak, kept, loss_kept + loss_transient, flights)


# ---------------------------------------------------------------------------------------------- attention mask

@dataclass(frozen=True)
class MaskMemory:
    flex: int  # the BlockMask: four int32 [rows, q tiles, kv tiles] index tensors (and their counts)
    dense: int  # the boolean [rows, S, S] mask that SDPA reads
    dense_per_layer: int  # SDPA's copy of it in the compute dtype, kept by each layer
    held: int  # what the configured kernel holds: one mask per micro-batch in flight with packed documents


def mask_memory(run: PlannedRun, flights: int = 1) -> MaskMemory:
    rows, positions = run.mask_rows, run.positions
    queries = positions // run.context
    q_tiles, kv_tiles = -(-queries // FLEX_TILE), -(-positions // FLEX_TILE)
    flex = rows * 4 * (q_tiles * kv_tiles + q_tiles) * 4
    dense = rows * queries * positions
    per_layer = dense * run.activation_bytes
    planned = {"flex": flex, "sdpa": dense}.get(run.kernel, 0)
    if run.kernel == "split":
        _, mask_entries = split_chunk_keys(run.seq_length, run.block_size, run.documents)
        whole = dense if run.documents else 0  # with documents the whole mask is built and kept for the step
        planned = whole + rows * (run.seq_length ** 2 + mask_entries)
    return MaskMemory(flex, dense, per_layer, planned * (flights if run.documents else 1))


@dataclass(frozen=True)
class GpuMemory:
    """The most loaded GPU (the pipeline stage with the largest total)."""

    stage: int
    parameters: Parameters
    states: StateMemory
    activations: ActivationMemory
    mask: MaskMemory

    @property
    def total(self) -> int:
        return self.states.total + self.activations.peak + self.mask.held


def gpu_memory(run: PlannedRun) -> GpuMemory:
    stages = []
    for stage in range(run.pipeline):
        held = stage_parameters(run.shape, run.tensor, run.pipeline, stage)
        activations = activation_memory(run, stage)
        stages.append(GpuMemory(stage, held, state_memory(run, held), activations,
                                mask_memory(run, activations.in_flight)))
    return max(stages, key=lambda memory: memory.total)
