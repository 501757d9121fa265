"""`ar2dlm train`: AR, joint AR + diffusion, or diffusion training of a converted model on megatron-core."""

from __future__ import annotations

import math
import signal
import time
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf

from ar2dlm.compat import cuda_available
from ar2dlm.distributed import ParallelLayout, init_distributed, is_rank_zero
from ar2dlm.errors import UserError
from ar2dlm.log import MetricSinks, logger, progress
from ar2dlm.model.checkpoint import HF_DIR, load_model, read_metadata
from ar2dlm.model.gpt import unwrap_model
from ar2dlm.training.block_sizes import RandomBlockSizes, candidate_block_sizes
from ar2dlm.training.checkpointing import (
    load_training_checkpoint,
    newest_checkpoint,
    parameters_are_finite,
    remove_interrupted_saves,
    restore_rng_state,
    resume_checkpoint,
    rng_state,
    save_training_checkpoint,
    step_checkpoints,
)
from ar2dlm.training.data_parallel import wrap_data_parallel
from ar2dlm.training.drafter_model import (
    load_drafter_model,
    lora_settings,
    loss_config,
    with_adapter,
    without_adapter,
)
from ar2dlm.training.forward import (
    ObjectiveSettings,
    PreparedBatch,
    prepare_batch,
    shard_for_context_parallel,
)
from ar2dlm.training.loss import objective_weights
from ar2dlm.training.metrics_file import append_record, truncate_after_step
from ar2dlm.training.noise import NoiseConfig
from ar2dlm.training.optim import build_optimizer, build_scheduler, changed_settings
from ar2dlm.training.parallel_setup import (
    PRECISION_DTYPES,
    configure_provider,
)
from ar2dlm.training.run_output import METRICS_FILE
from ar2dlm.training.schedule import forward_backward
from ar2dlm.training.stop_signals import StopRequest, TrainingStopped

VALIDATION_FILE = "validation.jsonl"


class TrainingDivergedError(UserError):
    """The loss or the gradient became NaN/Inf; no checkpoint is written for that step."""

    exit_code = 3


class Trainer:
    """Owns the model, optimizer, schedule and data of one run; ``fit()`` trains to ``train.steps``."""

    def __init__(self, cfg: DictConfig):
        from megatron.core import parallel_state
        from transformers import AutoTokenizer

        from ar2dlm.data.loader import TrainDataLoader, build_datasets

        self.cfg = cfg
        self.output = Path(cfg.output).expanduser()
        remove_interrupted_saves(self.output)
        resume_from = self._resume_point()
        start_from = resume_from or Path(cfg.init).expanduser()
        self.metadata = read_metadata(start_from)
        # what the weights are trained for (export writes it into config.json); a drafter leaves its base as it was
        if cfg.train.objective not in ("ar", "drafter"):
            self.metadata = self.metadata.trained_with(decode_block_size(cfg.diffusion), cfg.diffusion.clean_pattern,
                                                       train_block_size=cfg.diffusion.block_size)
        self.hf_dir = start_from / HF_DIR  # moves to each new checkpoint: older ones are pruned
        seq_length = cfg.data.seq_length
        load_options = dict(params_dtype=PRECISION_DTYPES[cfg.train.precision], seq_length=seq_length,
                            configure=lambda p: configure_provider(p, cfg),
                            checksums=cfg.checkpoint.checksums and resume_from is None)
        drafter = cfg.train.objective == "drafter"
        if drafter:  # the checkpoint frozen, LoRA adapters trained (training/drafter_model.py)
            self.model = load_drafter_model(start_from, lora_settings(cfg), resuming=resume_from is not None,
                                            **load_options)
            self.metadata = with_adapter(self.metadata, lora_settings(cfg))
        else:
            self.model, _, _ = load_model(start_from, weights=resume_from is None,  # a resume loads them with
                                          **load_options)  # the optimizer
            self.metadata = without_adapter(self.metadata)  # a drafter init's adapter is not loaded nor saved
        self.model = wrap_data_parallel(self.model, cfg)
        self.tokenizer = AutoTokenizer.from_pretrained(self.hf_dir, trust_remote_code=False)
        weights = objective_weights(cfg.train.objective, cfg.diffusion.dlm_loss_weight, cfg.diffusion.ar_loss_weight)
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        self.settings = ObjectiveSettings(
            weights=weights,
            noise=NoiseConfig(mask_token_id=self.metadata.mask_token_id, schedule=cfg.diffusion.noise_schedule,
                              block_size=cfg.diffusion.block_size, eps=cfg.diffusion.eps,
                              half_life_ratio=cfg.diffusion.half_life_ratio),
            clean_pattern=cfg.diffusion.clean_pattern, attention_kernel=cfg.diffusion.attention_kernel,
            seed=cfg.seed, pad_id=int(pad_id or 0), complementary_masking=cfg.diffusion.complementary_masking,
            normalization=cfg.diffusion.loss_normalization, random_blocks=random_block_sizes(cfg.diffusion),
            drafter=loss_config(cfg) if drafter else None,
        )
        self.dp_group = parallel_state.get_data_parallel_group(with_context_parallel=True)
        self.cp_group = (parallel_state.get_context_parallel_group()
                         if parallel_state.get_context_parallel_world_size() > 1 else None)
        dp_rank, dp_size = parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()
        self.dp_rank, self.dp_size = dp_rank, dp_size
        train_set, self.validation_set = build_datasets(cfg.data, self.tokenizer, seq_length=seq_length,
                                                        block_size=cfg.diffusion.block_size, seed=cfg.seed)
        self.loader = TrainDataLoader(train_set, global_batch_size=cfg.train.global_batch_size,
                                      micro_batch_size=cfg.train.micro_batch_size, dp_rank=dp_rank,
                                      dp_size=dp_size, seed=cfg.seed, num_workers=cfg.data.num_workers)
        self.optimizer = build_optimizer(self.model, cfg.optim, use_megatron=cuda_available(),
                                         bf16=cfg.train.precision == "bf16",
                                         distributed=cfg.parallel.distributed_optimizer)
        self.scheduler = build_scheduler(self.optimizer, cfg.optim, cfg.train.steps)
        self.step = 0
        self.saved: Path | None = None
        if resume_from is not None:
            self._restore(resume_from)

    @property
    def unwrapped_model(self) -> list:
        return [unwrap_model(chunk) for chunk in self.model]

    def _resume_point(self) -> Path | None:
        if not self.cfg.resume:
            existing = newest_checkpoint(self.output)
            if existing is not None:
                raise UserError(f"output {self.output} already has checkpoints (latest: {existing.name}); pass "
                                "resume=true to continue that run or choose another output")
            return None
        latest = resume_checkpoint(self.output, checksums=self.cfg.checkpoint.checksums)
        if latest is None:
            logger.info("resume=true but %s has no checkpoint yet: starting from init=%s", self.output, self.cfg.init)
        return latest

    def _restore(self, checkpoint: Path) -> None:
        state = load_training_checkpoint(checkpoint, self.unwrapped_model, self.optimizer)
        self.scheduler.load_state_dict(state["scheduler"])
        self.loader.load_state_dict(state["data"])
        restore_rng_state(state["rng"])
        self.step = state["step"]
        logger.info("resumed from %s at step %d", checkpoint, self.step)
        changes = changed_settings(state.get("config"), self.cfg)
        if changes:
            logger.info("resume: the learning-rate schedule and optimizer follow this run's settings, not the "
                        "checkpoint's (%s)", ", ".join(changes))

    def _trainer_state(self) -> dict:
        return {"step": self.step, "scheduler": self.scheduler.state_dict(), "data": self.loader.state_dict(),
                "rng": rng_state(), "config": OmegaConf.to_container(self.cfg)}

    def _last_checkpoint_note(self, failed_step: int | None = None) -> str:
        """Which checkpoint to resume from after a divergence at ``failed_step``."""
        saved = step_checkpoints(self.output)
        if not saved:
            return "no checkpoint was written"
        note = f"the last checkpoint, all finite, is {saved[-1]}"
        if failed_step is not None and saved[-1].name == f"step_{failed_step - 1:07d}":
            earlier = f"; {saved[-2].name} is the one before it" if len(saved) > 1 else ""
            note += (f"; it was saved right after the update that led to this, so its weights may already be "
                     f"diverging{earlier}")
        return note

    def _save(self) -> Path:
        if not parameters_are_finite(self.unwrapped_model):
            raise TrainingDivergedError(f"the weights are not finite after step {self.step}; no checkpoint is "
                                        f"written for it ({self._last_checkpoint_note()})")
        path = save_training_checkpoint(self.output, self.step, self.unwrapped_model, self.optimizer,
                                        self._trainer_state(), self.metadata, self.hf_dir,
                                        self.cfg.checkpoint.keep_last, checksums=self.cfg.checkpoint.checksums)
        self.hf_dir = path / HF_DIR
        self.saved = path
        logger.info("saved checkpoint %s", path)
        return path

    def _prepare(self, batch, step: int) -> PreparedBatch:
        prepared = prepare_batch(batch, step, self.settings)
        return prepared if self.cp_group is None else shard_for_context_parallel(prepared, self.cp_group)

    def _train_step(self, step: int) -> dict[str, float]:
        """One optimizer step over this rank's micro-batches; the loss is averaged over all tokens of all ranks."""
        started = time.perf_counter()
        for chunk in self.model:
            chunk.train()
        prepared = [self._prepare(batch, step) for batch in self.loader.next_step()]
        global_tokens = torch.stack([p.loss_tokens for p in prepared]).sum()
        maskable = torch.tensor(float(sum(p.maskable for p in prepared)), dtype=torch.float64)
        counts = torch.stack([global_tokens, maskable])
        per_term = self.settings.normalization == "per_term"
        if per_term:  # the global counts of each term, [masked positions, AR targets]
            counts = torch.cat([counts, torch.stack([p.term_tokens for p in prepared]).sum(dim=0)])
        if dist.is_initialized():
            dist.all_reduce(counts, group=self.dp_group)
        global_tokens, maskable = counts[0].clamp(min=1), counts[1].clamp(min=1)
        denominator = counts[2:].clamp(min=1) if per_term else global_tokens
        self.optimizer.zero_grad()
        for chunk in self.model:
            chunk.zero_grad_buffer()
        reduced = forward_backward(self.model, prepared, self.settings, denominator)
        loss = reduced.step_loss(denominator)
        if not math.isfinite(loss):
            raise TrainingDivergedError(f"loss is {loss} at step {step}; stopping without writing a checkpoint "
                                        f"for this step ({self._last_checkpoint_note(step)})")
        self.scheduler.step(1)  # step s trains at the schedule's lr(s): with warmup W, lr * s / W from step 1
        lr = self.optimizer.param_groups[0]["lr"]
        grad_norm = self.optimizer.step()
        if not math.isfinite(grad_norm):
            raise TrainingDivergedError(f"gradient norm is {grad_norm} at step {step}; parameters were not updated "
                                        f"and no checkpoint is written for this step ({self._last_checkpoint_note(step)})")
        elapsed = time.perf_counter() - started
        tokens = self.cfg.train.global_batch_size * prepared[0].layout.seq_len  # data tokens (x_0), all ranks
        metrics = {"loss": loss, "ar_loss": float(reduced.ar_loss), "dlm_loss": float(reduced.dlm_loss),
                   "mask_fraction": float(reduced.dlm_tokens) / float(maskable),
                   "lr": lr, "grad_norm": grad_norm, "tokens_per_s": tokens / elapsed}
        if self.settings.random_blocks is not None:
            metrics["block_size"] = prepared[0].layout.block_size
        return metrics

    def validate(self) -> dict[str, float] | None:
        """Loss on the validation set with fixed noise (that of step 0), averaged over all its tokens."""
        from ar2dlm.data.loader import eval_batches

        if self.validation_set is None:
            return None
        for chunk in self.model:
            chunk.eval()
        batches = [self._prepare(batch, 0)
                   for batch in eval_batches(self.validation_set, micro_batch_size=self.cfg.train.micro_batch_size,
                                             dp_rank=self.dp_rank, dp_size=self.dp_size)]
        with torch.no_grad():
            reduced = forward_backward(self.model, batches, self.settings, forward_only=True)
        return {"loss": float(reduced.loss()), "ar_loss": float(reduced.ar_loss), "dlm_loss": float(reduced.dlm_loss)}

    def fit(self) -> list[dict]:
        cfg = self.cfg
        self.output.mkdir(parents=True, exist_ok=True)
        if is_rank_zero():
            for name in (METRICS_FILE, VALIDATION_FILE):
                truncate_after_step(self.output / name, self.step)
        sinks = MetricSinks(self.output, cfg.logging.tensorboard, cfg.logging.wandb, cfg.logging.wandb_project,
                            cfg.logging.run_name, OmegaConf.to_container(cfg))
        history = []
        try:
            with StopRequest() as stop:
                steps = range(self.step + 1, cfg.train.steps + 1)
                bar = progress(steps, desc=f"train ({cfg.train.objective})", total=len(steps), unit="step",
                               log_every=cfg.train.log_interval)
                for step in bar:
                    self._fit_step(step, history, sinks, bar)
                    signum = stop.requested()
                    if signum and step < cfg.train.steps:
                        self._stop(signum)
        finally:
            sinks.close()
        return history

    def _stop(self, signum: int) -> None:
        path = self.saved if self.saved is not None and self.saved.name == f"step_{self.step:07d}" else self._save()
        raise TrainingStopped(f"stopped by {signal.Signals(signum).name} after step {self.step}; checkpoint {path} "
                              "saved; continue with resume=true", signum)

    def _fit_step(self, step: int, history: list, sinks: MetricSinks, bar) -> None:
        cfg = self.cfg
        metrics = self._train_step(step)
        self.step = step
        history.append({"step": step, **metrics})
        if is_rank_zero():
            append_record(self.output / METRICS_FILE, history[-1])
            bar.set_postfix(step_display(metrics, cfg.train.objective))
        if step % cfg.train.log_interval == 0:
            sinks.log({f"train/{k}": v for k, v in metrics.items()}, step)
            logger.debug("step %d %s", step, metrics)
        if cfg.train.eval_interval and step % cfg.train.eval_interval == 0:
            validation = self.validate()
            if validation is not None and is_rank_zero():
                sinks.log({f"validation/{k}": v for k, v in validation.items()}, step)
                append_record(self.output / VALIDATION_FILE, {"step": step, **validation})
                logger.info("step %d validation loss %.4f", step, validation["loss"])
        if (cfg.checkpoint.save_interval and step % cfg.checkpoint.save_interval == 0) \
                or step == cfg.train.steps:
            self._save()


def decode_block_size(diffusion: DictConfig) -> int:
    """The block size the trained model decodes with (export writes it into config.json): diffusion.decode_block_size,
    else diffusion.block_size."""
    decode = diffusion.get("decode_block_size")
    return int(diffusion.block_size if decode is None else decode)


def random_block_sizes(diffusion: DictConfig) -> RandomBlockSizes | None:
    """How training steps draw their block size; None when diffusion.random_block_prob is 0 (every step: block_size)."""
    if not diffusion.random_block_prob:
        return None
    return RandomBlockSizes(diffusion.block_size, float(diffusion.random_block_prob),
                            candidate_block_sizes(diffusion.block_size, list(diffusion.random_block_sizes)))


def step_display(metrics: dict[str, float], objective: str) -> dict[str, str]:
    """A step's metrics as shown on the progress bar or its log line (the loss terms the objective has)."""
    shown = {"loss": f"{metrics['loss']:.4f}"}
    if objective == "joint":
        shown.update(AR=f"{metrics['ar_loss']:.4f}", diffusion=f"{metrics['dlm_loss']:.4f}")
    elif objective == "drafter":  # its ar_loss is the CE of the drafts against the true tokens
        shown.update({"draft CE": f"{metrics['ar_loss']:.4f}"})
    shown.update({"lr": f"{metrics['lr']:.2e}", "grad norm": f"{metrics['grad_norm']:.3f}",
                  "tokens/s": f"{metrics['tokens_per_s']:,.0f}"})
    return shown


def run_train(cfg: DictConfig) -> int:
    """CLI entry point of `ar2dlm train`; rank 0 holds the output's lock (one run per output) throughout."""
    from ar2dlm.data.build import check_sources
    from ar2dlm.training.output_lock import output_lock
    from ar2dlm.training.run_output import check_train_output

    check_train_output(cfg.output, cfg.init, cfg.resume)
    check_sources(cfg.data)  # a bad data source is one error in seconds, not after the model has loaded
    with output_lock(cfg.output):
        if not (cfg.resume and newest_checkpoint(Path(cfg.output)) is not None):
            read_metadata(cfg.init)  # a bad init is one clear error before process groups start
        layout = ParallelLayout(cfg.parallel.tensor, cfg.parallel.pipeline, cfg.parallel.context)
        init_distributed(layout, seed=cfg.seed)
        history = Trainer(cfg).fit()
    if history and is_rank_zero():
        last = history[-1]
        print(f"trained to step {last['step']}: loss {last['loss']:.4f} (AR {last['ar_loss']:.4f}, "
              f"diffusion {last['dlm_loss']:.4f}); checkpoints in {Path(cfg.output) / 'checkpoints'}")
    return 0
