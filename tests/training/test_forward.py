"""The objective wiring: noisy-half logits predict x_0 unshifted, clean-half logits predict x_0[i+1]."""


import torch
import torch.nn.functional as F

from ar2dlm.data.loader import Batch
from ar2dlm.model.core_attention import AttentionLayout
from ar2dlm.model.gpt import build_model
from ar2dlm.training.forward import ObjectiveSettings, forward_loss, prepare_batch
from ar2dlm.training.loss import objective_weights
from ar2dlm.training.noise import NoiseConfig

MASK_ID = 127



def _settings(objective: str, pattern: str = "causal") -> ObjectiveSettings:
    return ObjectiveSettings(objective_weights(objective), NoiseConfig(mask_token_id=MASK_ID, block_size=4),
                             pattern, "sdpa", seed=7, pad_id=0)


def _batch() -> Batch:
    ids = torch.randint(1, 120, (2, 16), generator=torch.Generator().manual_seed(3))
    loss_mask = torch.ones_like(ids, dtype=torch.bool)
    loss_mask[0, :3] = False  # a prompt: never noised, never scored
    return Batch(ids, loss_mask, None, torch.tensor([10, 11]))


def test_joint_loss_equals_hand_computed_terms(tiny_provider):
    model = build_model(tiny_provider)[0].eval()
    batch, settings = _batch(), _settings("joint")
    prepared = prepare_batch(batch, step=5, settings=settings)
    assert not prepared.noise.masked[~batch.loss_mask].any()
    with torch.no_grad():
        parts = forward_loss(model, prepared, settings)
        logits = model(prepared.input_ids, None, prepared.layout)
    x0, length = batch.input_ids, 16
    noisy_ce = F.cross_entropy(logits[:, :length].transpose(1, 2), x0, reduction="none")
    clean_ce = F.cross_entropy(logits[:, length:-1].transpose(1, 2), x0[:, 1:], reduction="none")
    masked, weight = prepared.noise.masked, prepared.noise.weight
    expected_dlm = (noisy_ce * weight)[masked].sum()
    ar_targets = batch.loss_mask[:, 1:]
    expected_ar = clean_ce[ar_targets].sum()
    torch.testing.assert_close(parts.dlm_sum, expected_dlm, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(parts.ar_sum, expected_ar, rtol=1e-5, atol=1e-5)
    assert int(parts.dlm_tokens) == int(masked.sum()) and int(parts.ar_tokens) == int(ar_targets.sum())
    torch.testing.assert_close(parts.loss_sum, 0.3 * expected_dlm + 1.0 * expected_ar, rtol=1e-5, atol=1e-5)


def test_joint_ar_term_equals_the_ar_objective(tiny_provider):
    model = build_model(tiny_provider)[0].eval()
    batch = _batch()
    with torch.no_grad():
        joint = forward_loss(model, prepare_batch(batch, 1, _settings("joint")), _settings("joint"))
        ar = forward_loss(model, prepare_batch(batch, 1, _settings("ar")), _settings("ar"))
    torch.testing.assert_close(joint.ar_sum, ar.ar_sum, rtol=0, atol=1e-4)
    assert ar.dlm_tokens == 0 and ar.num_tokens == joint.ar_tokens


def test_layouts_per_objective(tiny_provider):
    batch = _batch()
    assert prepare_batch(batch, 1, _settings("ar")).input_ids.shape == (2, 16)
    joint = prepare_batch(batch, 1, _settings("joint", "block_causal"))
    assert joint.input_ids.shape == (2, 32) and joint.layout.layout == "doubled_block_causal"
    assert torch.equal(joint.input_ids[:, 16:], batch.input_ids)
    single = prepare_batch(batch, 1, _settings("diffusion", "none"))  # no clean stream
    assert single.layout.layout == "bidirectional" and single.ar_mask is None
    assert torch.equal(single.labels, batch.input_ids)


def test_noise_follows_the_sample_not_the_batch(tiny_provider):
    batch = _batch()
    swapped = Batch(batch.input_ids.flip(0), batch.loss_mask.flip(0), None, batch.sample_index.flip(0))
    a = prepare_batch(batch, 4, _settings("joint"))
    b = prepare_batch(swapped, 4, _settings("joint"))
    assert torch.equal(a.noise.masked, b.noise.masked.flip(0))
    assert not torch.equal(a.noise.masked, prepare_batch(batch, 5, _settings("joint")).noise.masked)
    assert isinstance(a.layout, AttentionLayout)
