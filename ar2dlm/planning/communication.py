"""Bytes each GPU sends per training step, by kind of parallelism.

Collectives are counted as ring algorithms move data: an all-reduce of N bytes over p ranks sends
2 (p - 1) / p x N from every rank, an all-gather or reduce-scatter whose full result is N bytes sends
(p - 1) / p x N (Thakur et al. 2005, "Optimization of Collective Communication Operations in MPICH").

- TP, Shoeybi et al. 2019 (Megatron-LM, arXiv:1909.08053) §3: two all-reduces of the [tokens, hidden]
  activations per layer in the forward pass and two in the backward; sequence parallelism replaces each
  all-reduce by an all-gather and a reduce-scatter of the same total volume (Korthikanti et al. 2022 §4.2.2).
  A full recompute repeats the forward's two. The vocab-parallel embedding all-reduces its output, the
  output layer its input gradient.
- PP, Narayanan et al. 2021 §2.2: one [tokens, hidden] activation forward and one gradient backward per
  micro-batch and stage boundary (split by TP with sequence parallelism).
- CP, ar2dlm/model/context_parallel.py: keys and values are all-gathered over the context-parallel group in
  every layer's forward (again in a full recompute) and their gradients reduce-scattered in the backward.
- DP, ar2dlm/training/data_parallel.py: gradients are reduced over data x context ranks, in fp32 on GPU; the
  distributed optimizer reduce-scatters them and all-gathers the updated bf16 weights (ZeRO stage 1,
  Rajbhandari et al. 2020), otherwise they are all-reduced.
"""

from __future__ import annotations

from dataclasses import dataclass

from ar2dlm.planning.memory import FP32_BYTES
from ar2dlm.planning.parameters import Parameters, stage_layers
from ar2dlm.planning.run import PlannedRun


@dataclass(frozen=True)
class Communication:
    tensor: int
    pipeline: int
    context: int
    data: int

    @property
    def total(self) -> int:
        return self.tensor + self.pipeline + self.context + self.data


def _all_reduce(size: int, ranks: int) -> int:
    return 2 * (ranks - 1) * size // ranks


def _gather(size: int, ranks: int) -> int:
    return (ranks - 1) * size // ranks


def step_communication(run: PlannedRun, held: Parameters) -> Communication:
    """Bytes one GPU (holding ``held`` parameters) sends per step."""
    shape, e, micro_batches = run.shape, run.activation_bytes, run.micro_batches
    layers = stage_layers(shape, run.pipeline)
    hidden = run.local_tokens * shape.hidden_size * e  # [tokens of a micro-batch on this GPU, hidden]
    tensor = 0
    if run.tensor > 1:
        per_layer = 4 + (2 if run.recompute == "full" else 0)
        tensor = micro_batches * (layers * per_layer + 2) * _all_reduce(hidden, run.tensor)
    pipeline = 2 * micro_batches * hidden // (run.tensor if run.sequence_parallel else 1) if run.pipeline > 1 else 0
    context = 0
    if run.context > 1:
        keys_values = run.micro_batch_size * run.positions * 2 * shape.key_value_width // run.tensor * e
        gathers = 2 + (1 if run.recompute == "full" else 0)  # forward, backward, recomputed forward
        context = micro_batches * layers * gathers * _gather(keys_values, run.context)
    ranks = run.data * run.context
    gradient = held.numel * (FP32_BYTES if run.device == "gpu" else e)  # CPU: param.grad in the weights' dtype
    if run.distributed_optimizer:
        data = _gather(gradient, ranks) + _gather(held.numel * e, ranks)
    else:
        data = _all_reduce(gradient, ranks)
    return Communication(tensor, pipeline, context, data)
