"""Optimizer and learning-rate schedule.

GPU: megatron-core's optimizer (distributed optimizer, grad clipping, mixed precision).
CPU: torch AdamW with torch's grad clipping, because megatron-core's optimizer needs CUDA; its
state is exposed as a megatron sharded state dict (the same helpers megatron uses for its FP32
optimizer), so optimizer checkpoints load under any parallel layout either way.
The schedule is megatron-core's OptimizerParamScheduler (WSD, cosine, constant; linear warmup).

A resumed run takes the moments and the step count from its checkpoint, and everything else (learning rates,
schedule, steps, betas, eps, clipping) from its own settings: extending ``train.steps`` or changing
``optim.lr`` on resume rebuilds the schedule around the checkpoint's step.
"""

from __future__ import annotations

import math

import torch
from megatron.core import parallel_state
from megatron.core.dist_checkpointing.optimizer import (
    get_param_id_to_sharded_param_map,
    optim_state_to_sharding_state,
)
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate
from megatron.core.transformer.module import param_is_not_shared
from omegaconf import DictConfig

_DECAY_STYLE = {"wsd": "WSD", "cosine": "cosine", "constant": "constant"}


def _no_weight_decay(name: str, parameter: torch.nn.Parameter) -> bool:
    return parameter.ndim < 2 or name.endswith(".bias")


class TorchAdamW:
    """torch AdamW + grad-norm clipping, with megatron-style sharded state for checkpoints."""

    def __init__(self, model_chunks: list, optim: DictConfig):
        decay, no_decay = [], []
        for chunk in model_chunks:
            for name, parameter in chunk.named_parameters():
                if parameter.requires_grad:
                    (no_decay if _no_weight_decay(name, parameter) else decay).append(parameter)
        groups = [{"params": decay, "wd_mult": 1.0}, {"params": no_decay, "wd_mult": 0.0}]
        self.optimizer = torch.optim.AdamW(groups, lr=optim.lr, betas=(optim.beta1, optim.beta2),
                                           eps=optim.adam_eps, weight_decay=optim.weight_decay, foreach=True)
        self.grad_clip = optim.grad_clip
        self.settings = optim

    @property
    def param_groups(self) -> list[dict]:
        return self.optimizer.param_groups

    def parameters(self) -> list[torch.nn.Parameter]:
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def grad_norm(self) -> float:
        """Global L2 norm of the gradients across tensor/pipeline ranks (TP duplicates and the last stage's
        copy of tied embeddings counted once)."""
        grads = [p.grad.detach() for p in self.parameters()
                 if p.grad is not None and param_is_not_tensor_parallel_duplicate(p) and param_is_not_shared(p)]
        norms = torch._foreach_norm(grads) if grads else []
        squares = torch.stack([n.double() for n in norms]).pow(2).sum().cpu() if norms else torch.zeros((),
                                                                                                     dtype=torch.float64)
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(squares, group=parallel_state.get_model_parallel_group())
        return math.sqrt(float(squares))

    def step(self) -> float:
        """Clip to ``grad_clip`` (if > 0), step, and return the pre-clipping global grad norm."""
        grad_norm = self.grad_norm()
        if self.grad_clip > 0 and grad_norm > self.grad_clip:
            torch._foreach_mul_([p.grad for p in self.parameters() if p.grad is not None],
                                self.grad_clip / (grad_norm + 1e-6))
        if math.isfinite(grad_norm):
            self.optimizer.step()
        return grad_norm

    def _init_state(self) -> None:
        for parameter in self.parameters():
            state = self.optimizer.state[parameter]
            if not state:
                state["step"] = torch.tensor(0.0)
                state["exp_avg"] = torch.zeros_like(parameter)
                state["exp_avg_sq"] = torch.zeros_like(parameter)

    def sharded_state_dict(self, model_sharded_state_dict: dict, is_loading: bool = False) -> dict:
        if is_loading:
            self._init_state()
        state = self.optimizer.state_dict()
        steps = {float(s["step"]) for s in state["state"].values() if "step" in s}
        id_map = get_param_id_to_sharded_param_map(model_sharded_state_dict, self.parameters())
        optim_state_to_sharding_state(state, id_map, exclude_keys=("step",))
        for per_param in state["state"].values():
            per_param.pop("step", None)
        state["common_step"] = steps.pop() if steps else 0.0
        return state

    def load_state_dict(self, state: dict) -> None:
        step = state.pop("common_step", 0.0)
        for per_param in state["state"].values():
            per_param["step"] = torch.tensor(float(step))
        self.optimizer.load_state_dict(state)
        keep_adam_settings(self.param_groups, self.settings)


class MegatronOptimizer:
    """megatron-core's optimizer (GPU): distributed optimizer, clipping and mixed precision inside."""

    def __init__(self, model_chunks: list, optim: DictConfig, *, bf16: bool, distributed: bool):
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

        config = OptimizerConfig(
            optimizer="adam", lr=optim.lr, min_lr=optim.min_lr, weight_decay=optim.weight_decay,
            adam_beta1=optim.beta1, adam_beta2=optim.beta2, adam_eps=optim.adam_eps, clip_grad=optim.grad_clip,
            bf16=bf16, params_dtype=torch.float32 if not bf16 else torch.bfloat16,
            use_distributed_optimizer=distributed,
        )
        self.optimizer = get_megatron_optimizer(config, model_chunks)
        self.settings = optim

    @property
    def param_groups(self) -> list[dict]:
        return self.optimizer.param_groups

    def zero_grad(self) -> None:
        self.optimizer.zero_grad()

    def step(self) -> float:
        _, grad_norm, _ = self.optimizer.step()
        return float(grad_norm or 0.0)

    def sharded_state_dict(self, model_sharded_state_dict: dict, is_loading: bool = False) -> dict:
        return self.optimizer.sharded_state_dict(model_sharded_state_dict, is_loading=is_loading)

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state)
        keep_adam_settings(self.param_groups, self.settings)


def keep_adam_settings(param_groups: list[dict], optim: DictConfig) -> None:
    """Put this run's betas and eps back after loading a checkpoint's parameter groups (the scheduler sets lr and
    weight decay)."""
    for group in param_groups:
        if "betas" in group:
            group["betas"] = (optim.beta1, optim.beta2)
        if "eps" in group:
            group["eps"] = optim.adam_eps


def build_optimizer(model_chunks: list, optim: DictConfig, *, use_megatron: bool, bf16: bool = False,
                    distributed: bool = True):
    if use_megatron:
        return MegatronOptimizer(model_chunks, optim, bf16=bf16, distributed=distributed)
    return TorchAdamW(model_chunks, optim)


def build_scheduler(optimizer, optim: DictConfig, total_steps: int) -> OptimizerParamScheduler:
    """megatron-core's scheduler; WSD decays over the last ``decay_fraction`` of the steps.

    Its position is the number of steps taken: the trainer advances it before each step, so step s trains at
    lr(s) (warmup: ``lr * s / warmup_steps``, never 0). Loading a state dict restores only that position; the
    schedule itself always comes from ``optim`` and ``total_steps``.
    """
    warmup = min(optim.warmup_steps, max(total_steps - 1, 0))
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0 if warmup else optim.lr, max_lr=optim.lr, min_lr=optim.min_lr,
        lr_warmup_steps=warmup, lr_decay_steps=max(total_steps, warmup + 1),
        lr_decay_style=_DECAY_STYLE[optim.schedule], start_wd=optim.weight_decay, end_wd=optim.weight_decay,
        wd_incr_steps=max(total_steps, 1), wd_incr_style="constant",
        wsd_decay_steps=max(1, round(optim.decay_fraction * total_steps)), lr_wsd_decay_style="linear",
        use_checkpoint_opt_param_scheduler=False, override_opt_param_scheduler=True,
    )
    return scheduler


RESUMABLE_SETTINGS = ("train.steps", "optim.lr", "optim.min_lr", "optim.schedule", "optim.warmup_steps",
                      "optim.decay_fraction", "optim.weight_decay", "optim.beta1", "optim.beta2", "optim.adam_eps",
                      "optim.grad_clip")


def changed_settings(saved: dict | None, cfg: DictConfig) -> list[str]:
    """``"key old -> new"`` for each optimizer or schedule setting of ``cfg`` that differs from the ``saved`` run's
    config (a checkpoint's trainer state); empty when there is nothing to compare with."""
    changes = []
    for key in RESUMABLE_SETTINGS:
        section, name = key.split(".")
        old = (saved or {}).get(section, {}).get(name)
        new = cfg[section][name]
        if old is not None and old != new:
            changes.append(f"{key} {old} -> {new}")
    return changes
