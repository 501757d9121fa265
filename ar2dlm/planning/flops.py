"""FLOPs of a training step, and the time and throughput they take at an assumed MFU.

Two conventions:

- model FLOPs (what MFU is measured against), Narayanan et al. 2021, "Efficient Large-Scale Language Model
  Training on GPU Clusters Using Megatron-LM" (arXiv:2104.04473), appendix: a GEMM of an m x n by n x k
  product is 2mnk FLOPs and the backward pass costs twice the forward, so a step is 3 x forward; attention
  counts the query-key pairs the mask allows (megatron-bridge's ``flop_utils.py`` halves the square for a
  causal mask likewise), activation recompute is not counted.
- kernel FLOPs (what the GPUs execute): the pairs the kernel computes (FlexAttention's non-empty tiles, SDPA's
  whole square), a FlashAttention-style backward that recomputes the scores (five matmuls of the pairs, Dao et
  al. 2022; torch.utils.flop_counter counts the same), and the forward passes activation recompute repeats.

Elementwise work (norms, rotary, softmax, the loss) is left out of both, as in the sources.
"""

from __future__ import annotations

from dataclasses import dataclass

from ar2dlm.planning.attention_work import attended_pairs, kernel_pairs
from ar2dlm.planning.parameters import gemm_weights_per_token, layer_parameters
from ar2dlm.planning.run import PlannedRun

SECONDS_PER_DAY = 86_400


@dataclass(frozen=True)
class StepFlops:
    model: int  # per step, all GPUs
    kernel: int
    data_tokens: int  # tokens of x_0 per step (the doubled sequence processes twice as many positions)


def _attention_per_pair(run: PlannedRun) -> int:
    """Multiply-accumulate FLOPs of one query-key pair, forward: QK^T and PV over every query head."""
    return 2 * 2 * run.shape.query_width


def step_flops(run: PlannedRun) -> StepFlops:
    shape, sequences = run.shape, run.global_batch_size
    positions = run.positions
    gemm = 2 * gemm_weights_per_token(shape, run.tensor) * positions  # forward, one sequence
    attention = _attention_per_pair(run) * shape.num_layers
    model = 3 * (gemm + attention * attended_pairs(run.layout, run.seq_length, run.block_size))
    computed = kernel_pairs(run.kernel, run.layout, run.seq_length, run.block_size, run.documents)
    kernel = 3 * gemm + (1 + 2.5) * attention * computed  # the backward recomputes QK^T: 5 matmuls vs 2
    if run.recompute == "full":
        kernel += 2 * layer_parameters(shape).gemm_weights * shape.num_layers * positions + attention * computed
    elif run.recompute == "selective":
        kernel += attention * computed
    return StepFlops(model * sequences, int(kernel) * sequences, run.seq_length * sequences)


@dataclass(frozen=True)
class Throughput:
    seconds_per_step: float
    data_tokens_per_day: float


def throughput(flops: StepFlops, gpus: int, peak_tflops: float, mfu: float) -> Throughput:
    """Time per step when the GPUs deliver ``mfu`` of their peak in model FLOPs."""
    seconds = flops.model / (gpus * peak_tflops * 1e12 * mfu)
    return Throughput(seconds, flops.data_tokens * SECONDS_PER_DAY / seconds)
