"""The CPU data-parallel wrapper and the end-of-step gradient hook (multi-rank sums: tests/training/test_multiprocess.py)."""

import torch

from ar2dlm.training.data_parallel import CpuDataParallel, finalize_gradients


def _fill_grads(module, value: float) -> None:
    for p in module.parameters():
        p.grad = torch.full_like(p, value)


def test_cpu_wrapper_sets_the_step_hook(wrapped_model):
    assert isinstance(wrapped_model[0], CpuDataParallel)
    assert wrapped_model[0].module.config.finalize_model_grads_func is finalize_gradients


def test_scale_and_zero_gradients(wrapped_model):
    chunk = wrapped_model[0]
    _fill_grads(chunk.module, 3.0)
    chunk.scale_gradients(0.5)
    assert all(torch.equal(p.grad, torch.full_like(p, 1.5)) for p in chunk.module.parameters())
    chunk.zero_grad_buffer()
    assert all(p.grad is None for p in chunk.module.parameters())


def test_finalize_keeps_gradients_already_divided_by_the_global_token_count(wrapped_model):
    # megatron-core's finalize_model_grads would divide by num_tokens again
    chunk = wrapped_model[0]
    _fill_grads(chunk.module, 2.0)
    finalize_gradients(wrapped_model, torch.tensor(8))
    assert all(torch.equal(p.grad, torch.full_like(p, 2.0)) for p in chunk.module.parameters())
