"""One step through megatron-core's schedule: the gradient of the global token average, the reduced loss parts."""

import pytest
import torch

from ar2dlm.data.loader import Batch
from ar2dlm.training.forward import ObjectiveSettings, forward_loss, prepare_batch
from ar2dlm.training.loss import objective_weights
from ar2dlm.training.noise import NoiseConfig
from ar2dlm.training.schedule import forward_backward

SETTINGS = ObjectiveSettings(objective_weights("joint"), NoiseConfig(mask_token_id=127, block_size=4), "causal",
                             "sdpa", seed=3, pad_id=0)


def _micro_batches(count: int) -> list:
    generator = torch.Generator().manual_seed(0)
    batches = []
    for index in range(count):
        ids = torch.randint(1, 120, (2, 16), generator=generator)
        batches.append(Batch(ids, torch.ones_like(ids, dtype=torch.bool), None, torch.tensor([2 * index, 2 * index + 1])))
    return [prepare_batch(batch, 1, SETTINGS) for batch in batches]


def _grads(module) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in module.named_parameters() if p.grad is not None}


def test_step_gradient_is_that_of_the_global_token_average(wrapped_model):
    prepared = _micro_batches(3)
    global_tokens = torch.stack([p.loss_tokens for p in prepared]).sum()
    wrapped_model[0].zero_grad_buffer()
    reduced = forward_backward(wrapped_model, prepared, SETTINGS, global_tokens)
    scheduled = _grads(wrapped_model[0].module)

    model = wrapped_model[0].module
    model.zero_grad(set_to_none=True)
    parts = [forward_loss(model, p, SETTINGS) for p in prepared]
    for part in parts:
        (part.loss_sum / global_tokens.float()).backward()
    direct = _grads(model)

    assert scheduled.keys() == direct.keys() and len(direct) > 0
    for name in direct:
        torch.testing.assert_close(scheduled[name], direct[name], rtol=1e-5, atol=1e-7, msg=name)
    torch.testing.assert_close(reduced.loss_sum, sum(p.loss_sum for p in parts).detach(), rtol=1e-5, atol=1e-5)
    assert int(reduced.num_tokens) == int(global_tokens)


def test_validation_pass_gives_the_parts_and_no_gradients(wrapped_model):
    prepared = _micro_batches(2)
    wrapped_model[0].zero_grad_buffer()
    reduced = forward_backward(wrapped_model, prepared, SETTINGS, forward_only=True)
    assert all(p.grad is None for p in wrapped_model[0].module.parameters())
    with torch.no_grad():
        expected = sum(forward_loss(wrapped_model[0].module, p, SETTINGS).dlm_sum for p in prepared)
    torch.testing.assert_close(reduced.dlm_sum, expected, rtol=1e-5, atol=1e-5)


def test_a_training_step_needs_the_global_token_count(wrapped_model):
    with pytest.raises(ValueError, match="global token count"):
        forward_backward(wrapped_model, _micro_batches(1), SETTINGS)
