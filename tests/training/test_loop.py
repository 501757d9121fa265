"""The training loop on CPU: the loss falls, resume is exact, divergence stops cleanly."""

import json

import pytest
import torch

from ar2dlm.errors import UserError
from ar2dlm.training import schedule
from ar2dlm.training.loop import Trainer, TrainingDivergedError


def _losses(history):
    return [round(h["loss"], 12) for h in history]


def test_joint_training_loss_falls(run_setup):
    cfg, _ = run_setup
    history = Trainer(cfg("train.steps=24", "checkpoint.save_interval=0", "diffusion.noise_schedule=position")).fit()
    first, last = history[:4], history[-4:]
    assert sum(h["ar_loss"] for h in last) < sum(h["ar_loss"] for h in first)
    assert sum(h["dlm_loss"] for h in last) < sum(h["dlm_loss"] for h in first)
    assert all(0 < h["mask_fraction"] < 1 and h["grad_norm"] > 0 and h["tokens_per_s"] > 0 for h in history)


def test_kill_and_resume_reproduces_the_uninterrupted_losses(run_setup, tmp_path, monkeypatch):
    cfg, output = run_setup
    schedule = ("optim.schedule=cosine", "optim.min_lr=1e-4")  # the learning rate changes every step
    uninterrupted = Trainer(cfg("train.steps=6", "checkpoint.save_interval=3", *schedule,
                                f"output={tmp_path / 'reference'}")).fit()

    real_step = Trainer._train_step

    def killed_at_five(self, step):
        if step == 5:
            raise KeyboardInterrupt
        return real_step(self, step)

    monkeypatch.setattr(Trainer, "_train_step", killed_at_five)
    with pytest.raises(KeyboardInterrupt):
        Trainer(cfg("train.steps=6", "checkpoint.save_interval=3", *schedule)).fit()
    monkeypatch.setattr(Trainer, "_train_step", real_step)
    resumed_trainer = Trainer(cfg("train.steps=6", "checkpoint.save_interval=3", "resume=true", *schedule))
    assert resumed_trainer.step == 3
    resumed = resumed_trainer.fit()
    assert [h["step"] for h in resumed] == [4, 5, 6]
    assert _losses(resumed) == _losses(uninterrupted[3:])
    recorded = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recorded] == [1, 2, 3, 4, 5, 6]  # the killed run's step-4 row is dropped


def test_existing_checkpoints_need_resume(run_setup):
    cfg, _ = run_setup
    Trainer(cfg("train.steps=2", "checkpoint.save_interval=2")).fit()
    with pytest.raises(UserError, match="already has checkpoints .* pass resume=true"):
        Trainer(cfg("train.steps=4"))


def test_nan_loss_stops_without_a_poisoned_checkpoint(run_setup, monkeypatch):
    cfg, output = run_setup
    real_loss_parts = schedule.loss_parts
    calls = {"n": 0}

    def poisoned(*args):
        parts = real_loss_parts(*args)
        calls["n"] += 1
        if calls["n"] > 4:  # steps 1-2 are fine (2 micro-batches each), step 3 is NaN
            parts.ar_sum = parts.ar_sum * torch.tensor(float("nan"))
        return parts

    monkeypatch.setattr(schedule, "loss_parts", poisoned)
    with pytest.raises(TrainingDivergedError, match="loss is nan at step 3"):
        Trainer(cfg("train.steps=6", "checkpoint.save_interval=1")).fit()
    saved = sorted(p.name for p in (output / "checkpoints").glob("step_*"))
    assert saved == ["step_0000001", "step_0000002"]


def test_validation_loss_every_eval_interval(run_setup):
    cfg, output = run_setup
    trainer = Trainer(cfg("train.steps=4", "train.eval_interval=2", "data.validation_fraction=0.1",
                          "checkpoint.save_interval=0"))
    trainer.fit()
    records = [json.loads(line) for line in (output / "validation.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4]
    assert all(0 < r["loss"] < 100 and r["ar_loss"] > 0 and r["dlm_loss"] > 0 for r in records)
    assert trainer.validate() == trainer.validate()  # fixed noise: the same model gives the same loss


@pytest.mark.parametrize("recompute", ["full", "selective"])
def test_activation_recompute_gives_the_same_steps(run_setup, tmp_path, monkeypatch, recompute):
    """Recompute trades memory for time; the losses and gradients must not change (CPU: exactly)."""
    from megatron.core import tensor_parallel

    cfg, _ = run_setup
    reference = Trainer(cfg("train.steps=2", "checkpoint.save_interval=0")).fit()
    calls = {"n": 0}
    real_checkpoint = tensor_parallel.checkpoint

    def counting_checkpoint(*args, **kwargs):
        calls["n"] += 1
        return real_checkpoint(*args, **kwargs)

    monkeypatch.setattr(tensor_parallel, "checkpoint", counting_checkpoint)
    recomputed = Trainer(cfg("train.steps=2", "checkpoint.save_interval=0", f"train.recompute={recompute}",
                             f"output={tmp_path / recompute}")).fit()
    assert calls["n"] > 0, "no layer was recomputed"
    for ref, rec in zip(reference, recomputed, strict=True):
        assert rec["loss"] == pytest.approx(ref["loss"], rel=1e-6)
        assert rec["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-5)
