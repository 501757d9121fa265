"""The training loop on CPU: the loss falls, resume is exact, divergence stops cleanly."""

import io
import json
import logging
import math

import pytest
import torch

from ar2dlm.data.loader import eval_batches
from ar2dlm.errors import UserError
from ar2dlm.training import loop, schedule
from ar2dlm.training.forward import prepare_batch
from ar2dlm.training.loop import Trainer, TrainingDivergedError, run_train
from ar2dlm.training.schedule import forward_backward


def _losses(history):
    return [round(h["loss"], 12) for h in history]


def test_joint_training_loss_falls(run_setup):
    cfg, _ = run_setup
    history = Trainer(cfg("train.steps=24", "checkpoint.save_interval=0", "diffusion.noise_schedule=position")).fit()
    first, last = history[:4], history[-4:]
    assert sum(h["ar_loss"] for h in last) < sum(h["ar_loss"] for h in first)
    assert sum(h["dlm_loss"] for h in last) < sum(h["dlm_loss"] for h in first)
    assert all(0 < h["mask_fraction"] < 1 and h["grad_norm"] > 0 and h["tokens_per_s"] > 0 for h in history)


def test_kill_and_resume_reproduces_the_uninterrupted_losses(run_setup, tmp_path, kill_at):
    cfg, output = run_setup
    schedule = ("optim.schedule=cosine", "optim.min_lr=1e-4")  # the learning rate changes every step
    uninterrupted = Trainer(cfg("train.steps=6", "checkpoint.save_interval=3", *schedule,
                                f"output={tmp_path / 'reference'}")).fit()

    kill_at(5)
    with pytest.raises(KeyboardInterrupt):
        Trainer(cfg("train.steps=6", "checkpoint.save_interval=3", *schedule)).fit()
    kill_at(-1)
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
    with pytest.raises(TrainingDivergedError, match="loss is nan at step 3") as raised:
        Trainer(cfg("train.steps=6", "checkpoint.save_interval=1")).fit()
    assert raised.value.exit_code == 3
    assert "step_0000002; it was saved right after the update" in str(raised.value)  # the suspect one is named
    assert "step_0000001 is the one before it" in str(raised.value)
    saved = sorted(p.name for p in (output / "checkpoints").glob("step_*"))
    assert saved == ["step_0000001", "step_0000002"]


def test_validation_loss_every_eval_interval(run_setup):
    cfg, output = run_setup
    trainer = Trainer(cfg("train.steps=4", "train.eval_interval=2", "data.validation_fraction=0.1",
                          "checkpoint.save_interval=0"))
    trainer.fit()
    records = [json.loads(line) for line in (output / "validation.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4]
    assert records[-1] == {"step": 4, **trainer.validate()}  # the records are the trained model's validation
    for record in records:  # the loss is the token-weighted mean of 0.3 x diffusion CE and AR CE
        low, high = sorted((0.3 * record["dlm_loss"], record["ar_loss"]))
        assert 0 < low <= record["loss"] <= high
    assert records[1]["loss"] < records[0]["loss"]
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


def test_an_infinite_gradient_stops_with_exit_code_3_before_the_update(run_setup, monkeypatch):
    """The loss is finite, a gradient is not: the gradient-norm branch stops the run, the weights of step 2 stay."""
    cfg, output = run_setup
    real_forward_backward = loop.forward_backward
    steps, before_update = [], {}

    def infinite_gradient_at_step_3(model, batches, settings, *args, **kwargs):
        reduced = real_forward_backward(model, batches, settings, *args, **kwargs)
        steps.append(len(steps) + 1)
        if steps[-1] == 3:
            parameters = [p for chunk in model for p in chunk.parameters()]
            before_update.update(weights=[p.detach().clone() for p in parameters])
            next(p for p in parameters if p.grad is not None).grad.view(-1)[0] = float("inf")
        return reduced

    monkeypatch.setattr(loop, "forward_backward", infinite_gradient_at_step_3)
    trainer = Trainer(cfg("train.steps=6", "checkpoint.save_interval=1"))
    with pytest.raises(TrainingDivergedError, match="gradient norm is inf at step 3; parameters were not updated "
                                                    r"and no checkpoint .* is .*step_0000002") as raised:
        trainer.fit()
    assert raised.value.exit_code == 3
    after = [p.detach() for chunk in trainer.model for p in chunk.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(before_update["weights"], after, strict=True))
    assert sorted(p.name for p in (output / "checkpoints").glob("step_*")) == ["step_0000001", "step_0000002"]
    assert [json.loads(line)["step"] for line in (output / "metrics.jsonl").read_text().splitlines()] == [1, 2]


def _validation_loss_with_noise_of(trainer, step: int) -> float:
    """The validation loss of the trainer's current model, recomputed with the noise of ``step``."""
    batches = [prepare_batch(batch, step, trainer.settings)
               for batch in eval_batches(trainer.validation_set, micro_batch_size=trainer.cfg.train.micro_batch_size)]
    with torch.no_grad():
        return float(forward_backward(trainer.model, batches, trainer.settings, forward_only=True).loss())


def test_validation_uses_the_noise_of_step_0_at_every_step(run_setup, monkeypatch):
    cfg, _ = run_setup
    real_validate = Trainer.validate
    checked = []

    def checking_validate(self):
        result = real_validate(self)
        checked.append((self.step, result["loss"], _validation_loss_with_noise_of(self, 0),
                        _validation_loss_with_noise_of(self, self.step)))
        return result

    monkeypatch.setattr(Trainer, "validate", checking_validate)
    Trainer(cfg("train.steps=4", "train.eval_interval=2", "data.validation_fraction=0.1",
                "checkpoint.save_interval=0")).fit()
    assert [step for step, *_ in checked] == [2, 4]
    for _, reported, step_zero_noise, current_step_noise in checked:
        assert reported == pytest.approx(step_zero_noise, rel=1e-9)
        assert reported != pytest.approx(current_step_noise, rel=1e-4)  # the noise matters to the loss
    assert checked[0][1] != pytest.approx(checked[1][1], rel=1e-4)  # the model changed between the two


def test_mask_fraction_is_masked_over_maskable_tokens_of_the_whole_step(run_setup, tmp_path, monkeypatch):
    """SFT rows have unscored prompt tokens and padding, so maskable != all tokens; the step has 2 micro-batches."""
    cfg, _ = run_setup
    chats = [{"messages": [{"role": "user", "content": f"the quick {word}"},
                           {"role": "assistant", "content": f"{word} jumps over the lazy dog"}]}
             for word in ("fox", "dog", "brown", "lazy", "over", "quick")] * 4
    path = tmp_path / "chats.jsonl"
    path.write_text("".join(json.dumps(chat) + "\n" for chat in chats))
    prepared_by_step = {}
    real_prepare = Trainer._prepare

    def recording_prepare(self, batch, step):
        prepared = real_prepare(self, batch, step)
        prepared_by_step.setdefault(step, []).append(prepared)
        return prepared

    monkeypatch.setattr(Trainer, "_prepare", recording_prepare)
    history = Trainer(cfg("train.steps=3", "data.sft=true", "data.pack=false", "data.seq_length=64",
                          f"data.sources=[{{path: {path}}}]", "checkpoint.save_interval=0")).fit()
    for record in history:
        prepared = prepared_by_step[record["step"]]
        assert len(prepared) == 2
        masked = sum(int(p.noise.masked.sum()) for p in prepared)
        maskable = sum(int(p.loss_mask.sum()) for p in prepared)
        assert 0 < maskable < sum(p.loss_mask.numel() for p in prepared)
        assert record["mask_fraction"] == pytest.approx(masked / maskable, rel=1e-12)


@pytest.mark.parametrize("source, message", [
    ("{path: MISSING.jsonl}", r"data source .*MISSING.jsonl does not exist"),
    ("{path: BROKEN.jsonl}", r"BROKEN.jsonl:1: not valid JSON"),
    ("{path: FIELDLESS.jsonl}", r"FIELDLESS.jsonl:1: record has no 'text' field"),
    ("{path: TABLE.csv}", r"cannot tell its format from the suffix '.csv'"),
])
def test_a_bad_data_source_is_refused_before_the_model_loads(run_setup, tmp_path, monkeypatch, source, message):
    cfg, output = run_setup
    (tmp_path / "BROKEN.jsonl").write_text('{"text": "a\n')
    (tmp_path / "FIELDLESS.jsonl").write_text('{"body": "a"}\n')
    (tmp_path / "TABLE.csv").write_text("text\na\n")

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the data sources were checked")

    monkeypatch.setattr(loop, "load_model", no_model)
    with pytest.raises(UserError, match=message):
        run_train(cfg(f"data.sources=[{source.replace('{path: ', '{path: ' + str(tmp_path) + '/')}]"))
    assert not output.exists()  # nothing written


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_console_shows_the_step_metrics_on_the_bar_or_every_log_interval(run_setup, tmp_path, monkeypatch):
    cfg, _ = run_setup
    terminal = _Terminal()
    monkeypatch.setattr("sys.stderr", terminal)
    Trainer(cfg("train.steps=2", "checkpoint.save_interval=0", f"output={tmp_path / 'tty'}")).fit()
    bar = terminal.getvalue().split("\r")[-1]  # the bar as last drawn
    assert "2/2" in bar and all(f"{name}=" in bar for name in ("loss", "AR", "diffusion", "lr", "grad norm",
                                                               "tokens/s")), bar
    monkeypatch.setattr("sys.stderr", io.StringIO())  # a log file: no bar, a line every train.log_interval
    records = _Records()
    monkeypatch.setattr(loop.logger, "handlers", [records])
    level = loop.logger.level
    loop.logger.setLevel(logging.INFO)
    try:
        Trainer(cfg("train.steps=3", "train.log_interval=2", "checkpoint.save_interval=0",
                    f"output={tmp_path / 'file'}")).fit()
    finally:
        loop.logger.setLevel(level)
    lines = [message for message in records.messages if message.startswith("train (joint): ")]
    assert [line.split(" | ")[0] for line in lines] == ["train (joint): 2/3 steps", "train (joint): 3/3 steps"]
    assert all(f" | {name} " in lines[0] for name in ("loss", "AR", "diffusion", "lr", "grad norm", "tokens/s"))


@pytest.mark.parametrize("lever", [
    ("diffusion.complementary_masking=true",),
    ("diffusion.complementary_masking=true", "diffusion.noise_schedule=position"),
    ("diffusion.random_block_prob=1.0", "diffusion.noise_schedule=position"),
    ("diffusion.loss_normalization=per_term",),
    ("diffusion.block_size=8", "diffusion.decode_block_size=4"),
])
def test_a_short_run_with_each_training_lever_has_finite_losses(run_setup, lever):
    """docs/design.md §2.7: each lever trains end to end on megatron-core (CPU) and the loss stays finite."""
    cfg, output = run_setup
    history = Trainer(cfg("train.steps=3", "checkpoint.save_interval=3", *lever)).fit()
    assert len(history) == 3 and all(math.isfinite(h["loss"]) and h["grad_norm"] > 0 for h in history)
    metadata = json.loads((output / "checkpoints" / "step_0000003" / "ar2dlm.json").read_text())
    if "diffusion.random_block_prob=1.0" in lever:
        assert all(h["block_size"] in (2, 4, 8) for h in history)  # the default candidates of block_size 8
    else:
        assert "block_size" not in history[0]  # the metrics are those of a run without the lever
    if "diffusion.complementary_masking=true" in lever:
        assert all(h["mask_fraction"] == 0.5 for h in history)  # each maskable position masked in one row of two
    if "diffusion.decode_block_size=4" in lever:
        assert metadata["block_size"] == 4 and metadata["extra"]["train_block_size"] == 8
    else:
        assert metadata["block_size"] == 8 and "train_block_size" not in metadata["extra"]


def test_per_term_loss_is_the_weighted_sum_of_the_term_means(run_setup):
    cfg, _ = run_setup
    history = Trainer(cfg("train.steps=2", "checkpoint.save_interval=0", "diffusion.loss_normalization=per_term")).fit()
    for h in history:
        assert h["loss"] == pytest.approx(0.3 * h["dlm_loss"] + 1.0 * h["ar_loss"], rel=1e-6)


def test_resume_with_the_levers_on_reproduces_the_uninterrupted_losses(run_setup, tmp_path, kill_at):
    """Complementary pairs, the drawn block sizes and per-term normalization depend only on (seed, sample, step):
    a run killed in step 3 and resumed from its step-2 checkpoint trains steps 3-4 as the uninterrupted run."""
    cfg, _ = run_setup
    levers = ("diffusion.complementary_masking=true", "diffusion.random_block_prob=0.5",
              "diffusion.loss_normalization=per_term", "diffusion.noise_schedule=position")
    uninterrupted = Trainer(cfg("train.steps=4", "checkpoint.save_interval=2", *levers,
                                f"output={tmp_path / 'reference'}")).fit()
    kill_at(3)
    with pytest.raises(KeyboardInterrupt):
        Trainer(cfg("train.steps=4", "checkpoint.save_interval=2", *levers)).fit()
    kill_at(-1)
    resumed = Trainer(cfg("train.steps=4", "checkpoint.save_interval=2", "resume=true", *levers)).fit()
    assert [h["step"] for h in resumed] == [3, 4]
    assert _losses(resumed) == _losses(uninterrupted[2:])
    assert [h["block_size"] for h in resumed] == [h["block_size"] for h in uninterrupted[2:]]
