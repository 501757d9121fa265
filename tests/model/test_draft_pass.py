"""The drafter's split forward (ar2dlm/model/draft_pass.py) against the doubled forward it replaces."""

import pytest
import torch

from ar2dlm.data.loader import Batch
from ar2dlm.model.draft_pass import DrafterTransformerBlock, use_split_forward
from ar2dlm.model.gpt import build_model
from ar2dlm.model.lora import (
    LoraSettings,
    adapter_tensors,
    adapters,
    add_lora,
    set_adapter_mode,
    trainable_parameters,
)
from ar2dlm.training.drafter import DrafterLossConfig
from ar2dlm.training.forward import ObjectiveSettings, forward_loss, model_inputs, prepare_batch
from ar2dlm.training.loss import objective_weights
from ar2dlm.training.noise import NoiseConfig, block_layout

LENGTH = 32
DOCUMENTS = torch.tensor([[0] * 13 + [1] * 19, [0] * 32])


def _settings() -> ObjectiveSettings:
    """Aligned blocks: the doubled forward's masks (the reference) know no phase."""
    return ObjectiveSettings(objective_weights("drafter"), NoiseConfig(mask_token_id=127, block_size=4), "causal",
                             "sdpa", seed=7, pad_id=0,
                             drafter=DrafterLossConfig(top_k=20, ce_target="verifier", length_weighting=True,
                                                       random_block_start=False))


def _batch() -> Batch:
    ids = torch.randint(1, 120, (2, LENGTH), generator=torch.Generator().manual_seed(3))
    loss_mask = torch.ones_like(ids, dtype=torch.bool)
    loss_mask[0, :10] = False  # prompts: their blocks hold no scored position
    loss_mask[0, 13:22] = False
    loss_mask[1, :19] = False
    return Batch(ids, loss_mask, DOCUMENTS, torch.tensor([10, 11]))


def _drafter(tiny_provider, recompute: str = "none"):
    torch.manual_seed(0)
    if recompute == "full":
        tiny_provider.recompute_granularity, tiny_provider.recompute_method = "full", "uniform"
        tiny_provider.recompute_num_layers = 1
    elif recompute == "selective":  # the core attention alone: the split forward's pass objects are re-read
        tiny_provider.recompute_granularity, tiny_provider.recompute_modules = "selective", ["core_attn"]
    chunks = add_lora(build_model(tiny_provider), LoraSettings(rank=4, alpha=8,
                                                              target_modules=("linear_proj", "linear_fc2")))
    generator = torch.Generator().manual_seed(1)
    for _, b in adapter_tensors(chunks).values():
        with torch.no_grad():
            b.copy_(torch.randn(b.shape, generator=generator) * 0.5)  # a trained adapter: the streams differ
    return chunks


def _loss_and_gradients(chunks, prepared, settings):
    model = chunks[0].train()
    model.zero_grad()
    parts = forward_loss(model, prepared, settings)
    parts.dlm_sum.backward()
    return parts.dlm_sum.detach(), {name: p.grad.clone() for name, p in trainable_parameters(chunks)}


@pytest.mark.parametrize("recompute", ["none", "full", "selective"])
def test_split_forward_gives_the_doubled_forwards_loss_and_adapter_gradients(tiny_provider, recompute):
    """The reference: one doubled forward with the adapters on the draft stream only (noisy_stream)."""
    settings = _settings()
    prepared = prepare_batch(_batch(), step=1, settings=settings)
    reference, split = _drafter(tiny_provider, recompute), use_split_forward(_drafter(tiny_provider, recompute))
    set_adapter_mode(reference, "noisy_stream")
    assert isinstance(split[0].decoder, DrafterTransformerBlock)
    assert prepared.layout.draft_plan.index.shape[1] < LENGTH  # blocks are left out, so the test covers that
    loss, grads = _loss_and_gradients(split, prepared, settings)
    expected_loss, expected_grads = _loss_and_gradients(reference, prepared, settings)
    torch.testing.assert_close(loss, expected_loss, rtol=1e-5, atol=1e-6)
    assert grads.keys() == expected_grads.keys() and all(g.abs().sum() > 0 for g in grads.values())
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_split_forward_logits_at_every_position_the_loss_reads(tiny_provider):
    """The clean stream's logits everywhere, and the draft stream's on every scored block; the adapters stay on
    after the forward (activation recompute re-runs the draft pass with them)."""
    settings = _settings()
    prepared = prepare_batch(_batch(), step=1, settings=settings)
    reference, split = _drafter(tiny_provider), use_split_forward(_drafter(tiny_provider))
    set_adapter_mode(reference, "noisy_stream")
    set_adapter_mode(split, "on")
    ids, _, layout = model_inputs(prepared, torch.device("cpu"))
    with torch.no_grad():
        expected = reference[0].eval()(ids, None, layout)
        logits = split[0].eval()(ids, None, layout)
    torch.testing.assert_close(logits[:, LENGTH:], expected[:, LENGTH:], rtol=1e-5, atol=1e-5)
    blocks, _ = block_layout((2, LENGTH), 4, DOCUMENTS)
    scored = prepared.noise.masked
    live = torch.zeros_like(blocks).scatter_add_(1, blocks, scored.long()).gather(1, blocks) > 0
    torch.testing.assert_close(logits[:, :LENGTH][live], expected[:, :LENGTH][live], rtol=1e-5, atol=1e-5)
    assert all(wrapper.mode == "on" for chunk in split for _, _, wrapper in adapters(chunk))


def test_without_a_plan_the_block_is_megatrons(tiny_provider):
    settings = _settings()
    prepared = prepare_batch(_batch(), step=1, settings=settings)
    chunks = _drafter(tiny_provider)
    set_adapter_mode(chunks, "noisy_stream")
    ids, _, layout = model_inputs(prepared, torch.device("cpu"))
    plain_layout = type(layout.attention_layout)(**{**layout.attention_layout.__dict__, "draft_plan": None})
    with torch.no_grad():
        expected = chunks[0].eval()(ids, None, plain_layout)
        use_split_forward(chunks)
        assert torch.equal(chunks[0].eval()(ids, None, plain_layout), expected)
