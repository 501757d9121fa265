"""Data-parallel wrappers of the model chunks and the end-of-step gradient reduction.

GPU: megatron-core's ``DistributedDataParallel`` (gradient buffers, bucketed reduction, sharding
for the distributed optimizer). CPU: :class:`CpuDataParallel`, the same wrapper interface over
plain ``param.grad``, so that megatron-core's ``finalize_model_grads`` runs unchanged on both: it
reduces gradients over data x context parallel ranks, sums q/k-norm and sequence-parallel norm
gradients over tensor-parallel ranks, and ties the word-embedding gradients of the first and last
pipeline stages.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallelConfig
from megatron.core.distributed.data_parallel_base import _BaseDataParallel
from omegaconf import DictConfig

from ar2dlm.compat import cuda_available


class CpuDataParallel(_BaseDataParallel):
    """Sums ``param.grad`` over the data x context parallel group when the step's gradients are final."""

    def __init__(self, config, module: torch.nn.Module):
        super().__init__(config=config, module=module)
        self.ddp_config = DistributedDataParallelConfig()
        self.group = parallel_state.get_data_parallel_group(with_context_parallel=True)

    def _grads(self) -> list[torch.Tensor]:
        return [p.grad for p in self.module.parameters() if p.grad is not None]

    def finish_grad_sync(self, force_all_reduce: bool = False) -> None:
        grads = self._grads()
        if not grads or not dist.is_initialized() or dist.get_world_size(self.group) == 1:
            return
        flat = torch._utils._flatten_dense_tensors(grads)
        dist.all_reduce(flat, group=self.group)
        for grad, synced in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads), strict=True):
            grad.copy_(synced)

    def scale_gradients(self, scaling_factor: float) -> None:
        torch._foreach_mul_(self._grads(), scaling_factor)

    def zero_grad_buffer(self) -> None:
        self.module.zero_grad(set_to_none=True)


def wrap_data_parallel(model_chunks: list, cfg: DictConfig) -> list:
    """megatron-core DDP on GPU, :class:`CpuDataParallel` on CPU; the step's gradient hook is set on the config."""
    if cuda_available():
        from megatron.core.distributed import DistributedDataParallel

        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, overlap_grad_reduce=False, average_in_collective=False,
            use_distributed_optimizer=cfg.parallel.distributed_optimizer,
        )
        wrapped = [DistributedDataParallel(config=chunk.config, ddp_config=ddp_config, module=chunk)
                   for chunk in model_chunks]
    else:
        wrapped = [CpuDataParallel(chunk.config, chunk) for chunk in model_chunks]
    for chunk in model_chunks:
        chunk.config.finalize_model_grads_func = finalize_gradients
    return wrapped


def finalize_gradients(model_chunks: list, num_tokens=None, **kwargs) -> None:
    """megatron-core's ``finalize_model_grads`` without its per-token rescaling.

    Each micro-batch loss is already divided by the global token count of the step (known before
    the forward, since noise does not depend on the model), so the gradients need no further scaling.
    """
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads

    finalize_model_grads(model_chunks, None, **kwargs)

