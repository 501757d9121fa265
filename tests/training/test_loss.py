"""Tests for ar2dlm.training.loss (docs/design.md §2.4)."""

from __future__ import annotations

import math
import tempfile
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
