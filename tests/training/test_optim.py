import logging
import math

import pytest
import torch
from omegaconf import OmegaConf

from ar2dlm.config.schema import OptimConfig
from ar2dlm.training.optim import TorchAdamW, build_scheduler


def _optim(**overrides):
    return OmegaConf.merge(OmegaConf.structured(OptimConfig), overrides)


class _Chunk(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(4, 3)
        self.norm = torch.nn.LayerNorm(3)


def test_wsd_schedule_warms_up_holds_then_decays_linearly():
    optimizer = TorchAdamW([_Chunk()], _optim(lr=1.0, min_lr=0.1, warmup_steps=2, decay_fraction=0.4))
    scheduler = build_scheduler(optimizer, _optim(lr=1.0, min_lr=0.1, warmup_steps=2, decay_fraction=0.4), 10)
    lrs = [optimizer.param_groups[0]["lr"]]
    for _ in range(10):
        scheduler.step(1)
        lrs.append(optimizer.param_groups[0]["lr"])
    expected = [0.0, 0.5, 1.0, 1.0, 1.0, 1.0, 1.0, 0.775, 0.55, 0.325, 0.1]
    assert lrs == pytest.approx(expected)


def test_cosine_and_constant_schedules():
    cosine = TorchAdamW([_Chunk()], _optim(lr=1.0, min_lr=0.0, schedule="cosine"))
    scheduler = build_scheduler(cosine, _optim(lr=1.0, min_lr=0.0, schedule="cosine"), 4)
    scheduler.step(2)
    assert cosine.param_groups[0]["lr"] == pytest.approx(0.5)
    constant = TorchAdamW([_Chunk()], _optim(lr=0.3, schedule="constant"))
    scheduler = build_scheduler(constant, _optim(lr=0.3, schedule="constant"), 4)
    scheduler.step(4)
    assert constant.param_groups[0]["lr"] == pytest.approx(0.3)


def test_no_weight_decay_on_norms_and_biases(megatron_ready):
    chunk = _Chunk()
    optimizer = TorchAdamW([chunk], _optim(weight_decay=0.1))
    build_scheduler(optimizer, _optim(weight_decay=0.1), 5)
    decayed, plain = optimizer.param_groups
    assert [p.shape for p in decayed["params"]] == [chunk.linear.weight.shape]
    assert decayed["weight_decay"] == pytest.approx(0.1) and plain["weight_decay"] == 0.0


def test_clipping_reports_the_norm_before_clipping(megatron_ready):
    chunk = _Chunk()
    optimizer = TorchAdamW([chunk], _optim(grad_clip=1.0))
    for parameter in chunk.parameters():
        parameter.grad = torch.full_like(parameter, 2.0)
    count = sum(p.numel() for p in chunk.parameters())
    assert optimizer.grad_norm() == pytest.approx(2.0 * count**0.5)
    norm = optimizer.step()
    assert norm == pytest.approx(2.0 * count**0.5)
    clipped = torch.cat([p.grad.flatten() for p in chunk.parameters()]).norm()
    assert clipped == pytest.approx(1.0, rel=1e-4)


def test_non_finite_gradients_do_not_update_parameters(megatron_ready):
    chunk = _Chunk()
    before = [p.detach().clone() for p in chunk.parameters()]
    optimizer = TorchAdamW([chunk], _optim())
    for parameter in chunk.parameters():
        parameter.grad = torch.full_like(parameter, float("nan"))
    assert math.isnan(optimizer.step())
    assert all(torch.equal(a, b) for a, b in zip(before, chunk.parameters(), strict=True))


@pytest.mark.parametrize("warmup", [1, 3])
def test_warmup_trains_the_first_step_at_a_positive_lr(run_setup, warmup):
    """Step s of a warmup over W steps trains at lr * s / W: never 0, the full lr from step W on."""
    from ar2dlm.training.loop import Trainer

    cfg, _ = run_setup
    history = Trainer(cfg("train.steps=4", f"optim.warmup_steps={warmup}", "optim.schedule=constant",
                          "checkpoint.save_interval=0")).fit()
    assert [h["lr"] for h in history] == pytest.approx([3e-3 * min(s, warmup) / warmup for s in (1, 2, 3, 4)])


def _cosine_lr(step, lr, min_lr, warmup, total):
    return min_lr + 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup))) * (lr - min_lr)


def test_resume_with_new_steps_and_lr_rebuilds_the_schedule_and_says_so(run_setup, caplog):
    from ar2dlm.log import logger
    from ar2dlm.training.loop import Trainer

    cfg, _ = run_setup
    common = ("optim.schedule=cosine", "optim.min_lr=1e-4", "checkpoint.save_interval=4")
    first = Trainer(cfg("train.steps=4", *common)).fit()
    assert [h["lr"] for h in first] == pytest.approx([_cosine_lr(s, 3e-3, 1e-4, 1, 4) for s in (1, 2, 3, 4)])
    caplog.set_level(logging.INFO, logger=logger.name)
    direct = not logger.propagate  # setup_logging (run by any CLI test) stops propagation to the root logger
    if direct:
        logger.addHandler(caplog.handler)
    try:
        Trainer(cfg("train.steps=4", *common, "resume=true"))
        assert "learning-rate schedule" not in caplog.text  # nothing changed, nothing said
        extended = Trainer(cfg("train.steps=6", "optim.lr=5e-3", "optim.beta2=0.9", *common, "resume=true"))
        history = extended.fit()
    finally:
        if direct:
            logger.removeHandler(caplog.handler)
    assert [h["step"] for h in history] == [5, 6]
    assert [h["lr"] for h in history] == pytest.approx([_cosine_lr(s, 5e-3, 1e-4, 1, 6) for s in (5, 6)])
    assert extended.optimizer.param_groups[0]["betas"] == (0.9, 0.9)
    lines = [r.getMessage() for r in caplog.records if "learning-rate schedule" in r.getMessage()]
    assert len(lines) == 1
    assert "train.steps 4 -> 6" in lines[0] and "optim.lr 0.003 -> 0.005" in lines[0]
    assert "optim.beta2 0.95 -> 0.9" in lines[0]
