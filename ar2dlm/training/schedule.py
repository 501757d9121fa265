"""One step's forward and backward passes through megatron-core's pipeline schedules.

megatron-core picks the schedule from the layout: all micro-batches in one stage without pipeline
parallelism, 1F1B across stages otherwise (activations exchanged point-to-point; gloo on CPU).
The same call validates with ``forward_only=True``. At the end of a training step the schedule
runs the config's ``finalize_model_grads_func`` (see :mod:`ar2dlm.training.data_parallel`).
"""

from __future__ import annotations

from dataclasses import replace
from functools import partial

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from ar2dlm.compat import cuda_allocations_on_cpu
from ar2dlm.training.forward import ObjectiveSettings, PreparedBatch, loss_parts, model_inputs
from ar2dlm.training.loss import LossParts


def forward_backward(model_chunks: list, batches: list[PreparedBatch], settings: ObjectiveSettings,
                     global_tokens: torch.Tensor | None = None, *, forward_only: bool = False) -> LossParts:
    """Run ``batches`` (this rank's micro-batches) and return the loss parts summed over all ranks.

    Each micro-batch's backward uses ``loss_sum / global_tokens`` (the token count of the whole step
    across data-parallel ranks), so the accumulated gradient is that of the global token average. With
    per-term normalization ``global_tokens`` is the pair of global counts [masked positions, AR targets]
    (see :meth:`LossParts.scaled`).
    Every rank gets the reduced parts: the last pipeline stage computes them and shares them.
    """
    if not forward_only and global_tokens is None:
        raise ValueError("a training step needs the global token count")
    device = next(model_chunks[0].parameters()).device
    collected: list[LossParts] = []

    def loss_func(batch: PreparedBatch, output: torch.Tensor):
        parts = loss_parts(output, batch, settings, device)
        collected.append(_detached(parts))
        scaled = parts.scaled(global_tokens) if global_tokens is not None else parts.loss_sum / 1.0
        return scaled, torch.zeros((), dtype=torch.int), {}

    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        input_ids, labels, layout = model_inputs(batch, device)
        return model(input_ids, None, layout, labels=labels), partial(loss_func, batch)

    with cuda_allocations_on_cpu():
        get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter(batches), model=model_chunks,
            num_microbatches=len(batches), seq_length=batches[0].layout.total_length,
            micro_batch_size=batches[0].input_ids.shape[0], forward_only=forward_only,
        )
    return _share_from_last_stage(collected, settings, device)


def _detached(parts: LossParts) -> LossParts:
    return replace(parts, dlm_sum=parts.dlm_sum.detach(), ar_sum=parts.ar_sum.detach())


def _share_from_last_stage(collected: list[LossParts], settings: ObjectiveSettings, device) -> LossParts:
    """Sum over micro-batches, pipeline stages (only the last has losses) and data x context ranks."""
    zero = torch.zeros((), device=device)
    total = sum(collected, LossParts(zero, zero.long(), zero, zero.long(), settings.weights.dlm, settings.weights.ar,
                                     settings.normalization))
    if not dist.is_initialized():
        return total
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        total = total.all_reduce(parallel_state.get_pipeline_model_parallel_group())
    return total.all_reduce(parallel_state.get_data_parallel_group(with_context_parallel=True))
