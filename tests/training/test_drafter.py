"""The drafter objective's input and loss (ar2dlm/training/drafter.py) against hand-computed cases."""

import math

import pytest
import torch

from ar2dlm.data.loader import Batch
from ar2dlm.model.gpt import build_model
from ar2dlm.model.lora import LoraSettings, add_lora, set_adapter_mode
from ar2dlm.training.drafter import (
    CE_TARGETS,
    DrafterLossConfig,
    acceptance,
    acceptance_prefix,
    block_phases,
    draft_stream,
    drafter_loss_parts,
    length_weights,
    position_losses,
)
from ar2dlm.training.forward import ObjectiveSettings, forward_loss, prepare_batch
from ar2dlm.training.loss import objective_weights
from ar2dlm.training.noise import NoiseConfig, block_layout, in_block_positions

MASK = 99


def test_draft_stream_keeps_each_blocks_seed_and_the_context_and_scores_the_rest():
    x0 = torch.arange(10, 20).unsqueeze(0)
    loss_mask = torch.ones_like(x0, dtype=torch.bool)
    loss_mask[0, 1] = False  # a prompt token: context, as at inference; kept in the draft, not scored
    documents = torch.tensor([[0, 0, 0, 0, 0, 1, 1, 1, 1, 1]])  # blocks restart at the second document
    _, in_block = block_layout((1, 10), 4, documents)
    ids, scored = draft_stream(x0, loss_mask, in_block, MASK)
    assert ids.tolist() == [[10, 11, MASK, MASK, 14, 15, MASK, MASK, MASK, 19]]
    assert scored.tolist() == [[False, False, True, True, False, False, True, True, True, False]]


def test_acceptance_prefix_is_the_product_over_earlier_drafts_of_the_block():
    accept = torch.tensor([[1.0, 0.5, 0.4, 0.9, 1.0, 0.8, 0.3, 0.7]])
    scored = torch.tensor([[False, True, True, True, False, True, True, True]])
    _, in_block = block_layout((1, 8), 4)
    alpha = acceptance_prefix(accept, scored, in_block)
    torch.testing.assert_close(alpha, torch.tensor([[1.0, 1.0, 0.5, 0.2, 1.0, 1.0, 0.8, 0.24]]))


def _softmax(values, t=1.0):
    exps = [math.exp(v / t) for v in values]
    return [e / sum(exps) for e in exps]


def test_position_loss_value_by_hand_with_top_k_truncation():
    """V = 3, top-1 of p is token 0 and of q token 2: the KL / TV terms run over {0, 2}, renormalised."""
    p_logits, q_logits, t, alpha = [2.0, 1.0, 0.0], [0.0, 1.0, 2.0], 2.0, 0.6
    config = DrafterLossConfig(temperature=t, top_k=1, ce_weight=0.5)
    losses, ce = position_losses(torch.tensor([q_logits]), torch.tensor([p_logits]), torch.tensor([1]),
                                 torch.tensor([alpha]), config)
    p = _softmax([p_logits[0], p_logits[2]], t)
    q = _softmax([q_logits[0], q_logits[2]], t)
    kl = sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True))
    tv = 0.5 * sum(abs(pi - qi) for pi, qi in zip(p, q, strict=True))
    cross_entropy = -math.log(_softmax(q_logits)[1])
    lam = math.exp(-0.5 * alpha)
    assert math.isclose(ce.item(), cross_entropy, rel_tol=1e-6)
    assert math.isclose(losses.item(), lam * kl + (1 - lam) * tv + 0.5 * cross_entropy, rel_tol=1e-6)


def test_position_loss_gradient_by_hand():
    """Full support (top_k >= V): dKL/dz = (q_T - p_T) / T, dTV/dz_k = -(s_k q_k - q_k sum_i s_i q_i) / (2T) with
    s = sign(p_T - q_T), dCE/dz = softmax(z) - onehot; nothing flows to the verifier's logits."""
    t, alpha, target = 3.0, 0.3, 2
    z = torch.tensor([[0.3, -1.0, 2.0, 0.5]], dtype=torch.float64, requires_grad=True)
    y = torch.tensor([[1.0, 0.2, -0.4, 0.0]], dtype=torch.float64, requires_grad=True)
    losses, _ = position_losses(z, y, torch.tensor([target]), torch.tensor([alpha]),
                                DrafterLossConfig(temperature=t, top_k=10, ce_weight=1.0))
    losses.sum().backward()
    q_t = torch.softmax(z.detach() / t, dim=-1)
    p_t = torch.softmax(y.detach() / t, dim=-1)
    sign = torch.sign(p_t - q_t)
    lam = math.exp(-0.5 * alpha)
    d_kl = (q_t - p_t) / t
    d_tv = -(sign * q_t - q_t * (sign * q_t).sum()) / (2 * t)
    d_ce = torch.softmax(z.detach(), dim=-1) - torch.nn.functional.one_hot(torch.tensor([target]), 4)
    expected = lam * d_kl + (1 - lam) * d_tv + d_ce
    torch.testing.assert_close(z.grad.float(), expected.float(), rtol=1e-5, atol=1e-6)
    assert y.grad is None or not y.grad.any()


def test_acceptance_is_the_overlap_of_the_distributions():
    p = torch.tensor([[0.0, 0.0]])
    q = torch.tensor([[math.log(3.0), 0.0]])  # q = (0.75, 0.25), p = (0.5, 0.5)
    torch.testing.assert_close(acceptance(q, p), torch.tensor([0.75]))


def _settings(random_block_start: bool = False) -> ObjectiveSettings:
    """Aligned blocks unless said: the doubled forward's masks (the reference here) know no phase."""
    return ObjectiveSettings(objective_weights("drafter"), NoiseConfig(mask_token_id=127, block_size=4), "causal",
                             "sdpa", seed=7, pad_id=0,
                             drafter=DrafterLossConfig(top_k=20, random_block_start=random_block_start))


def _batch() -> Batch:
    ids = torch.randint(1, 120, (2, 16), generator=torch.Generator().manual_seed(3))
    loss_mask = torch.ones_like(ids, dtype=torch.bool)
    loss_mask[0, :3] = False
    return Batch(ids, loss_mask, None, torch.tensor([10, 11]))


def test_block_phases_are_a_pure_function_of_seed_sample_and_step():
    """One phase per document in [0, block size), the same wherever the row sits in a batch (any parallel layout,
    a resume), another at another step; over many rows every phase occurs."""
    documents = torch.tensor([[0] * 5 + [1] * 11, [0] * 16])
    phases = block_phases([10, 11], 3, 7, documents, (2, 16), 4)
    assert phases.min() >= 0 and phases.max() <= 3
    assert all(len(set(phases[0, span].tolist())) == 1 for span in (slice(0, 5), slice(5, 16)))
    assert len(set(phases[1].tolist())) == 1
    assert torch.equal(block_phases([11], 3, 7, documents[1:], (1, 16), 4), phases[1:])
    two_documents = block_phases(list(range(200)), 3, 7, documents[:1].expand(200, -1), (200, 16), 4)
    assert (two_documents[:, 0] != two_documents[:, 5]).sum() > 100  # each document its own phase
    many = block_phases(list(range(200)), 3, 7, None, (200, 16), 4)[:, 0]
    assert set(many.tolist()) == {0, 1, 2, 3}
    assert (block_phases(list(range(200)), 4, 7, None, (200, 16), 4)[:, 0] != many).sum() > 100
    assert (block_phases(list(range(200)), 3, 8, None, (200, 16), 4)[:, 0] != many).sum() > 100


def test_a_drafter_batch_starts_each_documents_blocks_at_its_phase():
    """With random_block_start the draft plan's blocks are block_layout's at the rows' phases, each block's first
    position is a seed (kept, not scored) and the loss reads the same in-block positions."""
    batch = _batch()
    documents = torch.tensor([[0] * 6 + [1] * 10, [0] * 16])
    batch = Batch(batch.input_ids, batch.loss_mask, documents, batch.sample_index)
    prepared = prepare_batch(batch, step=5, settings=_settings(random_block_start=True))
    phases = block_phases(batch.sample_index, 5, 7, documents, (2, 16), 4)
    blocks, in_block = block_layout((2, 16), 4, documents, phases)
    assert phases.any()  # the case is not the aligned one
    assert torch.equal(prepared.layout.draft_plan.blocks, blocks)
    assert torch.equal(in_block_positions(prepared.layout.draft_plan.blocks), in_block)
    seeds = in_block == 0
    draft_ids = prepared.input_ids[:, :16]
    assert torch.equal(draft_ids[seeds], batch.input_ids[seeds])
    assert (draft_ids[~seeds & batch.loss_mask] == 127).all()
    assert torch.equal(prepared.noise.masked, ~seeds & batch.loss_mask)
    aligned = prepare_batch(batch, step=5, settings=_settings())
    assert not torch.equal(aligned.noise.masked, prepared.noise.masked)


def test_zero_init_drafter_logits_equal_the_base_models(tiny_provider):
    """The drafter's doubled forward at step 0 is the base model's, so its loss is the base model's too."""
    torch.manual_seed(0)
    chunks = build_model(tiny_provider)
    model = chunks[0].eval()
    settings, batch = _settings(), _batch()
    prepared = prepare_batch(batch, step=1, settings=settings)
    assert prepared.labels is None and prepared.layout.layout == "doubled_causal"
    with torch.no_grad():
        base = model(prepared.input_ids, None, prepared.layout)
        base_parts = forward_loss(model, prepared, settings)
    add_lora(chunks, LoraSettings(rank=4, alpha=8))
    set_adapter_mode(chunks, "noisy_stream")
    with torch.no_grad():
        drafted = model(prepared.input_ids, None, prepared.layout)
        parts = forward_loss(model, prepared, settings)
    assert torch.equal(drafted, base)
    assert torch.equal(parts.dlm_sum, base_parts.dlm_sum)
    # the parts are the loss of the scored positions: draft logit j against the clean logit at j-1
    _, in_block = block_layout((2, 16), 4)
    manual = drafter_loss_parts(base, batch.input_ids, prepared.noise.masked, in_block, settings.drafter)
    torch.testing.assert_close(parts.dlm_sum, manual.dlm_sum)
    scored = prepared.noise.masked
    assert int(parts.dlm_tokens) == int(scored.sum()) == 2 * 12 - 2  # 3 drafts per block, the prompt's 2 skipped
    draft, clean = base[:, :16], base[:, 16:]
    ce = torch.nn.functional.cross_entropy(draft[:, 1:][scored[:, 1:]], batch.input_ids[:, 1:][scored[:, 1:]],
                                           reduction="sum")
    torch.testing.assert_close(parts.ar_sum, ce)
    assert parts.loss().item() > 0 and torch.isfinite(clean).all()


def test_verifier_ce_target_is_the_verifiers_argmax():
    """ce_target=verifier: the CE term's target is argmax p_j, not the data's token (a drafter that learns the
    corpus where it disagrees with the verifier drafts tokens the verifier rejects)."""
    torch.manual_seed(0)
    vocab, length = 6, 4
    logits = torch.randn(1, 2 * length, vocab)
    x0 = torch.tensor([[1, 2, 3, 4]])
    scored = torch.tensor([[False, True, True, True]])
    in_block = torch.tensor([[0, 1, 2, 3]])
    draft, clean = logits[:, :length], logits[:, length:]
    parts = {}
    for target in CE_TARGETS:
        config = DrafterLossConfig(top_k=vocab, ce_weight=1.0, ce_target=target)
        parts[target] = drafter_loss_parts(logits, x0, scored, in_block, config)
    log_q = torch.log_softmax(draft[0, 1:], dim=-1)
    greedy = clean[0, :-1].argmax(dim=-1)
    assert not torch.equal(greedy, x0[0, 1:])  # the two targets differ somewhere, so the test can fail
    torch.testing.assert_close(parts["verifier"].ar_sum, -log_q.gather(1, greedy[:, None]).sum())
    torch.testing.assert_close(parts["data"].ar_sum, -log_q.gather(1, x0[0, 1:, None]).sum())
    with pytest.raises(ValueError, match="ce_target"):
        DrafterLossConfig(ce_target="corpus")


def test_length_weights_are_the_expected_accepted_drafts_from_each_position_by_hand():
    """Blocks of 4 (a seed, then drafts a_1 .. a_3): t_j = sum over m >= j of a_1 ... a_m, scaled so that the
    row's weights sum to its number of drafts; an unscored position (a prompt token) weighs 0 and counts as
    accepted for the drafts after it."""
    accept = torch.tensor([[1.0, 0.5, 0.4, 0.9, 1.0, 1.0, 0.8, 0.5]])
    scored = torch.tensor([[False, True, True, True, False, False, True, True]])
    _, in_block = block_layout((1, 8), 4)
    first = [0.5 + 0.5 * 0.4 + 0.5 * 0.4 * 0.9, 0.5 * 0.4 + 0.5 * 0.4 * 0.9, 0.5 * 0.4 * 0.9]
    second = [0.8 + 0.8 * 0.5, 0.8 * 0.5]
    scale = 5 / (sum(first) + sum(second))
    expected = [0.0, *first, 0.0, 0.0, *second]
    torch.testing.assert_close(length_weights(accept, scored, in_block),
                               torch.tensor([[w * scale for w in expected]]))


def test_length_weighting_scales_each_positions_loss():
    """length_weighting: the loss is sum_j w_j L_j over the same count; the CE it reports is unweighted."""
    torch.manual_seed(1)
    vocab, length = 6, 8
    logits = torch.randn(2, 2 * length, vocab)
    x0 = torch.randint(0, vocab, (2, length))
    scored = torch.tensor([[False, True, True, True, False, True, True, True]] * 2)
    _, in_block = block_layout((2, length), 4)
    config = DrafterLossConfig(top_k=vocab, ce_target="verifier")
    plain = drafter_loss_parts(logits, x0, scored, in_block, config)
    weighted = drafter_loss_parts(logits, x0, scored, in_block,
                                  DrafterLossConfig(top_k=vocab, ce_target="verifier", length_weighting=True))
    draft, clean = logits[:, :length], logits[:, length:]
    accept = torch.ones(2, length)
    accept[:, 1:][scored[:, 1:]] = acceptance(draft[:, 1:][scored[:, 1:]], clean[:, :-1][scored[:, 1:]])
    alpha = acceptance_prefix(accept, scored, in_block)
    losses, _ = position_losses(draft[:, 1:][scored[:, 1:]], clean[:, :-1][scored[:, 1:]],
                                clean[:, :-1][scored[:, 1:]].argmax(-1), alpha[:, 1:][scored[:, 1:]], config)
    per_row = length_weights(accept, scored, in_block)
    # each row's weights sum to its drafts, whatever the other rows hold (a layout-independent loss)
    torch.testing.assert_close(per_row.sum(dim=1), scored.sum(dim=1).float())
    weights = per_row[:, 1:][scored[:, 1:]]
    assert not torch.allclose(weights, torch.ones_like(weights))  # the weighting changes the loss
    torch.testing.assert_close(weighted.dlm_sum, (weights * losses).sum())
    torch.testing.assert_close(plain.dlm_sum, losses.sum())
    torch.testing.assert_close(weighted.ar_sum, plain.ar_sum)
    assert weighted.dlm_tokens == plain.dlm_tokens == scored.sum()
