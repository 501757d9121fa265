"""Tests for ar2dlm.training.loss (docs/design.md §2.4)."""

from __future__ import annotations

import math
import tempfile
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ar2dlm.training.loss import (
    LossParts,
    ar_target_mask,
    compute_loss_parts,
    doubled_labels,
    objective_weights,
    split_doubled,
)


def test_doubled_labels_and_split() -> None:
    ids = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])
    labels = doubled_labels(ids, pad_id=0)
    assert labels.tolist() == [[1, 2, 3, 4, 2, 3, 4, 0], [5, 6, 7, 8, 6, 7, 8, 0]]
    noisy, clean = split_doubled(labels)
    assert torch.equal(noisy, ids)
    assert clean.tolist() == [[2, 3, 4, 0], [6, 7, 8, 0]]
    with pytest.raises(ValueError):
        split_doubled(torch.zeros(1, 3))


def test_ar_target_mask() -> None:
    loss_mask = torch.tensor(
        [[True, True, True, True], [False, True, True, True], [True, True, False, False]]
    )
    assert ar_target_mask(loss_mask).tolist() == [
        [True, True, True, False],
        [True, True, True, False],
        [True, False, False, False],
    ]
    # Row 1 with documents [0, 0, 1, 1]: j=1 -> 2 crosses a document boundary.
    doc = torch.tensor([[0, 0, 0, 0], [0, 0, 1, 1], [0, 0, 0, 0]])
    assert ar_target_mask(loss_mask, doc)[1].tolist() == [True, False, True, False]


def _tiny() -> dict[str, torch.Tensor]:
    return {
        "dlm_ce": torch.tensor([[1.0, 2.0, 3.0, 4.0], [0.5, 1.5, 2.5, 3.5]]),
        "ar_ce": torch.tensor([[0.1, 0.2, 0.3, 9.0], [0.4, 0.5, 0.6, 9.0]]),
        "masked": torch.tensor([[True, False, True, False], [False, False, True, True]]),
        # Row 0 was noised with p = 0.5, row 1 with p = 0.25; weight 1/p where masked.
        "weight": torch.tensor([[2.0, 0.0, 2.0, 0.0], [0.0, 0.0, 4.0, 4.0]]),
        "ar_mask": ar_target_mask(torch.ones(2, 4, dtype=torch.bool)),
    }


def test_loss_hand_computed() -> None:
    # dlm_sum    = 1*2 + 3*2 + 2.5*4 + 3.5*4 = 2 + 6 + 10 + 14 = 32, over 4 masked tokens
    # ar_sum     = (0.1 + 0.2 + 0.3) + (0.4 + 0.5 + 0.6) = 2.1 (last position has no target), 6 tokens
    # loss_sum   = 0.3 * 32 + 1.0 * 2.1 = 11.7;  num_tokens = 4 + 6 = 10;  loss = 1.17
    parts = compute_loss_parts(**_tiny(), dlm_weight=0.3, ar_weight=1.0)
    assert parts.dlm_sum.item() == pytest.approx(32.0)
    assert parts.dlm_tokens.item() == 4
    assert parts.ar_sum.item() == pytest.approx(2.1)
    assert parts.ar_tokens.item() == 6
    assert parts.loss_sum.item() == pytest.approx(11.7)
    assert parts.num_tokens.item() == 10
    assert parts.loss().item() == pytest.approx(1.17)
    assert parts.dlm_loss.item() == pytest.approx(8.0)
    assert parts.ar_loss.item() == pytest.approx(0.35)
    m = parts.metrics()
    assert m["loss"] == pytest.approx(1.17) and m["dlm_tokens"] == 4.0 and m["ar_tokens"] == 6.0


def test_objectives_change_weights_and_token_counts() -> None:
    t = _tiny()
    # diffusion: w_ar = 0, so AR tokens are not counted: 0.3 * 32 / 4 = 2.4
    w = objective_weights("diffusion")
    parts = compute_loss_parts(**t, dlm_weight=w.dlm, ar_weight=w.ar)
    assert parts.num_tokens.item() == 4
    assert parts.loss().item() == pytest.approx(2.4)
    assert parts.ar_loss.item() == pytest.approx(0.35)  # still reported
    # ar: no diffusion CE at all: 2.1 / 6 = 0.35
    w = objective_weights("ar")
    parts = compute_loss_parts(None, t["ar_ce"], ar_mask=t["ar_mask"], dlm_weight=w.dlm, ar_weight=w.ar)
    assert parts.num_tokens.item() == 6
    assert parts.loss().item() == pytest.approx(0.35)


def test_objective_weights_mapping_and_validation() -> None:
    assert objective_weights("joint") == objective_weights("joint", 0.3, 1.0)
    j = objective_weights("joint", dlm_weight=0.5, ar_weight=2.0)
    assert (j.dlm, j.ar, j.has_diffusion_term) == (0.5, 2.0, True)
    a = objective_weights("ar", dlm_weight=0.5)
    assert (a.dlm, a.ar, a.has_diffusion_term) == (0.0, 1.0, False)
    d = objective_weights("diffusion")
    assert (d.dlm, d.ar, d.has_diffusion_term) == (0.3, 0.0, True)
    for bad in (
        {"objective": "mdm"},
        {"objective": "joint", "dlm_weight": -0.1},
        {"objective": "joint", "ar_weight": math.nan},
        {"objective": "joint", "dlm_weight": 0.0},
        {"objective": "diffusion", "dlm_weight": 0.0},
        {"objective": "ar", "ar_weight": 0.0},
    ):
        with pytest.raises(ValueError):
            objective_weights(**bad)


def test_compute_loss_parts_argument_errors() -> None:
    t = _tiny()
    with pytest.raises(ValueError):
        compute_loss_parts(None, None)
    with pytest.raises(ValueError):
        compute_loss_parts(t["dlm_ce"], None, ar_weight=1.0, masked=t["masked"], weight=t["weight"])
    with pytest.raises(ValueError):
        compute_loss_parts(None, t["ar_ce"], ar_mask=t["ar_mask"], dlm_weight=0.3)
    with pytest.raises(ValueError):
        compute_loss_parts(t["dlm_ce"], None, ar_weight=0.0)  # no masked / weight


def _random_batch(rows: int, length: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    masked = torch.rand(rows, length, generator=g) < 0.4
    p = torch.rand(rows, 1, generator=g) * 0.9 + 0.1
    return {
        "dlm_ce": torch.rand(rows, length, generator=g) * 5,
        "ar_ce": torch.rand(rows, length, generator=g) * 5,
        "masked": masked,
        "weight": torch.where(masked, 1 / p, 0.0),
        "ar_mask": ar_target_mask(torch.rand(rows, length, generator=g) < 0.8),
    }


def test_micro_batch_accumulation_equals_single_batch() -> None:
    full = _random_batch(6, 32, seed=0)
    whole = compute_loss_parts(**full)
    micro = [compute_loss_parts(**{k: v[i : i + 2] for k, v in full.items()}) for i in (0, 2, 4)]
    acc = sum(micro)
    assert isinstance(acc, LossParts)
    assert acc.dlm_tokens.item() == whole.dlm_tokens.item()
    assert acc.ar_tokens.item() == whole.ar_tokens.item()
    torch.testing.assert_close(acc.loss(), whole.loss())
    # The mean of per-micro-batch losses is NOT the same thing (token counts differ).
    assert not math.isclose(sum(p.loss().item() for p in micro) / 3, whole.loss().item(), rel_tol=1e-6)
    with pytest.raises(ValueError):
        _ = micro[0] + compute_loss_parts(**full, dlm_weight=0.1)


def test_loss_sum_is_differentiable_and_all_reduce_detaches() -> None:
    t = _tiny()
    dlm_ce = t.pop("dlm_ce").requires_grad_()
    parts = compute_loss_parts(dlm_ce, **t)
    reduced = parts.all_reduce()  # not distributed: a detached copy
    assert not reduced.loss_sum.requires_grad
    assert reduced.dlm_tokens.dtype == torch.long
    torch.testing.assert_close(reduced.loss_sum, parts.loss_sum.detach())
    parts.loss(reduced.num_tokens).backward()
    # d loss / d ce_i = 0.3 * weight_i / 10 on masked positions, 0 elsewhere.
    torch.testing.assert_close(dlm_ce.grad, 0.3 * t["weight"] / 10)


def _all_reduce_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        parts = compute_loss_parts(**_random_batch(3, 16, seed=rank))
        reduced = parts.all_reduce()
        torch.save(
            {k: getattr(reduced, k) for k in ("dlm_sum", "dlm_tokens", "ar_sum", "ar_tokens")},
            Path(out_dir) / f"rank{rank}.pt",
        )
    finally:
        dist.destroy_process_group()


def test_all_reduce_sums_over_ranks() -> None:
    world = 2
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_all_reduce_worker, args=(world, str(Path(tmp) / "init"), tmp), nprocs=world)
        results = [torch.load(Path(tmp) / f"rank{r}.pt") for r in range(world)]
    expected = sum(compute_loss_parts(**_random_batch(3, 16, seed=r)) for r in range(world))
    for res in results:
        torch.testing.assert_close(res["dlm_sum"], expected.dlm_sum)
        torch.testing.assert_close(res["ar_sum"], expected.ar_sum)
        assert res["dlm_tokens"].item() == expected.dlm_tokens.item()
        assert res["ar_tokens"].item() == expected.ar_tokens.item()


def _per_term(parts: LossParts) -> LossParts:
    return replace(parts, normalization="per_term")


def test_per_term_normalization_hand_computed() -> None:
    # dlm mean = 32 / 4 = 8;  AR mean = 2.1 / 6 = 0.35;  loss = 0.3 * 8 + 1.0 * 0.35 = 2.75 (shared: 1.17)
    parts = _per_term(compute_loss_parts(**_tiny(), dlm_weight=0.3, ar_weight=1.0))
    assert parts.loss().item() == pytest.approx(2.75)
    assert parts.step_loss(parts.term_tokens.double()) == pytest.approx(2.75)
    assert parts.scaled(parts.term_tokens.double()).item() == pytest.approx(2.75)
    assert parts.metrics()["loss"] == pytest.approx(2.75)
    assert replace(parts, normalization="shared").loss().item() == pytest.approx(1.17)
    with pytest.raises(ValueError, match="normalization"):
        replace(parts, normalization="mean")
    with pytest.raises(ValueError, match="normalizations"):
        _ = parts + compute_loss_parts(**_tiny())  # shared + per_term


def _two_micro_batches(requires_grad: bool = False) -> list[dict[str, torch.Tensor]]:
    """Micro-batch A: 1 masked token (CE 2, weight 2), 3 AR targets (CE 0.1, 0.2, 0.3);
    micro-batch B: 3 masked tokens (CE 1, weight 4), 1 AR target (CE 0.5)."""
    a = {"dlm_ce": torch.tensor([[2.0, 7.0, 7.0, 7.0]]), "ar_ce": torch.tensor([[0.1, 0.2, 0.3, 9.0]]),
         "masked": torch.tensor([[True, False, False, False]]), "weight": torch.tensor([[2.0, 0.0, 0.0, 0.0]]),
         "ar_mask": torch.tensor([[True, True, True, False]])}
    b = {"dlm_ce": torch.tensor([[1.0, 1.0, 1.0, 5.0]]), "ar_ce": torch.tensor([[0.5, 9.0, 9.0, 9.0]]),
         "masked": torch.tensor([[True, True, True, False]]), "weight": torch.tensor([[4.0, 4.0, 4.0, 0.0]]),
         "ar_mask": torch.tensor([[True, False, False, False]])}
    for batch in (a, b):
        batch["dlm_ce"].requires_grad_(requires_grad)
    return [a, b]


def test_per_term_normalization_over_two_micro_batches() -> None:
    # dlm: (2*2 + 3*1*4) / (1 + 3) = 16 / 4 = 4;  AR: (0.6 + 0.5) / (3 + 1) = 0.275;  loss = 0.3 * 4 + 0.275 = 1.475
    # (shared: (0.3 * 16 + 1.1) / 8 = 0.7375; the mean of the micro-batches' own per-term losses: 1.55)
    batches = _two_micro_batches(requires_grad=True)
    micro = [_per_term(compute_loss_parts(**batch)) for batch in batches]
    total = sum(micro)
    denominator = torch.stack([p.term_tokens for p in micro]).sum(dim=0).double()  # counts summed, then divided
    assert denominator.tolist() == [4.0, 4.0]
    assert total.loss().item() == pytest.approx(1.475)
    assert total.step_loss(denominator) == pytest.approx(1.475)
    assert replace(total, normalization="shared").loss().item() == pytest.approx(0.7375)
    assert sum(p.loss().item() for p in micro) / 2 == pytest.approx(1.55)
    scaled = [p.scaled(denominator) for p in micro]  # what each micro-batch's backward uses
    assert sum(s.item() for s in scaled) == pytest.approx(1.475)
    sum(scaled).backward()
    # d loss / d ce_i = w_dlm * weight_i / (global masked count) = 0.3 * weight_i / 4 on masked positions
    for batch in batches:
        torch.testing.assert_close(batch["dlm_ce"].grad, 0.3 * batch["weight"] / 4)


def test_per_term_step_gradient_through_the_schedule(wrapped_model) -> None:
    """megatron-core's schedule with per-term normalization: the gradient of w_dlm * dlm mean + w_ar * AR mean
    over the whole step (three micro-batches), and the reduced loss of that formula."""
    from ar2dlm.data.loader import Batch
    from ar2dlm.training.forward import ObjectiveSettings, forward_loss, prepare_batch
    from ar2dlm.training.noise import NoiseConfig
    from ar2dlm.training.schedule import forward_backward

    settings = ObjectiveSettings(objective_weights("joint"), NoiseConfig(mask_token_id=127, block_size=4), "causal",
                                 "sdpa", seed=3, pad_id=0, normalization="per_term")
    generator = torch.Generator().manual_seed(0)
    prepared = []
    for index in range(3):
        ids = torch.randint(1, 120, (2, 16), generator=generator)
        loss_mask = torch.rand(2, 16, generator=generator) < 0.7
        prepared.append(prepare_batch(Batch(ids, loss_mask, None, torch.tensor([2 * index, 2 * index + 1])), 1,
                                      settings))
    denominator = torch.stack([p.term_tokens for p in prepared]).sum(dim=0)
    wrapped_model[0].zero_grad_buffer()
    reduced = forward_backward(wrapped_model, prepared, settings, denominator)
    scheduled = {n: p.grad.clone() for n, p in wrapped_model[0].module.named_parameters() if p.grad is not None}

    model = wrapped_model[0].module
    model.zero_grad(set_to_none=True)
    parts = [forward_loss(model, p, settings) for p in prepared]
    dlm_sum, ar_sum = sum(p.dlm_sum for p in parts), sum(p.ar_sum for p in parts)
    expected = 0.3 * dlm_sum / denominator[0].float() + 1.0 * ar_sum / denominator[1].float()
    expected.backward()
    direct = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert scheduled.keys() == direct.keys() and len(direct) > 0
    for name in direct:
        torch.testing.assert_close(scheduled[name], direct[name], rtol=1e-5, atol=1e-7, msg=name)
    assert reduced.normalization == "per_term"
    assert reduced.step_loss(denominator) == pytest.approx(expected.item(), rel=1e-5)
    assert reduced.loss().item() == pytest.approx(expected.item(), rel=1e-5)
