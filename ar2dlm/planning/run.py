"""The facts of one training run that the planning formulas need, read from a train config."""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

from omegaconf import DictConfig

from ar2dlm.errors import UserError
from ar2dlm.planning.shape import ModelShape

DEFAULT_GPUS = 8  # one node, when neither plan.gpus nor the launch's WORLD_SIZE says otherwise


@dataclass(frozen=True)
class PlannedRun:
    shape: ModelShape
    device: str  # gpu (megatron-core's optimizer and DDP, Transformer Engine layers) | cpu (torch AdamW, local layers)
    gpus: int
    tensor: int
    pipeline: int
    context: int
    sequence_parallel: bool
    distributed_optimizer: bool
    global_batch_size: int
    micro_batch_size: int
    steps: int
    seq_length: int  # L: data tokens of one training row
    objective: str
    layout: str  # causal | bidirectional | doubled_causal | doubled_block_causal (ar2dlm.model.masks)
    block_size: int
    documents: bool  # packed rows carry document ids: masks are built per row
    kernel: str  # flex | sdpa | split: what diffusion.attention_kernel resolves to on the device
    precision: str  # fp32 | bf16
    fp8: bool
    recompute: str  # none | selective | full

    @property
    def data(self) -> int:
        return self.gpus // (self.tensor * self.pipeline * self.context)

    @property
    def micro_batches(self) -> int:
        """Micro-batches each data-parallel rank runs per step."""
        return self.global_batch_size // (self.micro_batch_size * self.data)

    @property
    def positions(self) -> int:
        """Positions of one sequence through the model: 2L for the doubled [x_t ; x_0], else L."""
        from ar2dlm.model.masks import total_length

        return total_length(self.layout, self.seq_length)

    @property
    def local_tokens(self) -> int:
        """Tokens of one micro-batch on one GPU (context parallelism splits the sequence)."""
        return self.micro_batch_size * self.positions // self.context

    @property
    def activation_bytes(self) -> int:
        return 4 if self.precision == "fp32" else 2

    @property
    def mask_rows(self) -> int:
        """Rows of a mask: one per sequence with packed documents, else one shared by the micro-batch."""
        return self.micro_batch_size if self.documents else 1

    def but(self, **changes) -> PlannedRun:
        """This run with some settings changed (another recompute, FP8, the AR objective, ...)."""
        if "objective" in changes and "layout" not in changes:
            changes["layout"] = objective_layout(changes["objective"], "causal")
            changes["kernel"] = resolve_kernel("auto" if self.kernel == "split" else self.kernel, changes["layout"],
                                               self.device, self.context)
        return replace(self, **changes)


def planned_gpus(cfg: DictConfig) -> int:
    """plan.gpus; else the launch's WORLD_SIZE; else one node of 8 GPUs, with as many data-parallel ranks as fit
    in it (at least one) and divide the micro-batches of a step."""
    if cfg.plan.gpus is not None:
        return cfg.plan.gpus
    if "WORLD_SIZE" in os.environ:
        return int(os.environ["WORLD_SIZE"])
    model_parallel = max(1, cfg.parallel.tensor * cfg.parallel.pipeline * cfg.parallel.context)
    micro_batches = max(1, cfg.train.global_batch_size // max(1, cfg.train.micro_batch_size))
    data = max(d for d in range(1, max(1, DEFAULT_GPUS // model_parallel) + 1) if micro_batches % d == 0)
    return data * model_parallel


def objective_layout(objective: str, clean_pattern: str) -> str:
    """The attention layout the trainer uses for an objective (one definition: ObjectiveSettings.layout)."""
    from ar2dlm.training.forward import ObjectiveSettings
    from ar2dlm.training.loss import objective_weights

    weights = objective_weights(objective)
    return ObjectiveSettings(weights=weights, noise=None, clean_pattern=clean_pattern, attention_kernel="auto",
                             seed=0, pad_id=0).layout


def resolve_kernel(kernel: str, layout: str, device: str, context: int) -> str:
    """What diffusion.attention_kernel runs on the device (ar2dlm.model.attention.select_kernel; context
    parallelism uses FlexAttention on GPU for auto / flex and SDPA otherwise)."""
    import torch

    from ar2dlm.model.attention import select_kernel

    if context > 1:
        return "flex" if device == "gpu" and kernel in ("auto", "flex") else "sdpa"
    try:
        return select_kernel(kernel, layout, torch.device("cuda" if device == "gpu" else "cpu"), needs_grad=True)
    except ValueError as error:
        raise UserError(f"diffusion.attention_kernel={kernel}: {error}") from None


def layout_problems(shape: ModelShape, run: PlannedRun) -> list[str]:
    """Ways the model cannot be split as asked (megatron-core would refuse them when building the model)."""
    t = run.tensor
    checks = (
        (shape.num_layers % run.pipeline, f"{shape.num_layers} layers do not split into parallel.pipeline={run.pipeline} "
                                          "equal stages"),
        (shape.num_attention_heads % t, f"{shape.num_attention_heads} attention heads do not split over "
                                        f"parallel.tensor={t}"),
        (shape.num_key_value_heads % t, f"{shape.num_key_value_heads} key/value heads do not split over "
                                        f"parallel.tensor={t}"),
        (shape.ffn_hidden_size % t, f"MLP width {shape.ffn_hidden_size} does not split over parallel.tensor={t}"),
        (shape.padded_vocab_size(t) % t, f"vocabulary {shape.padded_vocab_size(t)} does not split over "
                                         f"parallel.tensor={t}"),
    )
    return [message for remainder, message in checks if remainder]


def planned_run(cfg: DictConfig, shape: ModelShape) -> PlannedRun:
    """The run a validated plan config describes, for the model ``shape``."""
    layout = objective_layout(cfg.train.objective, cfg.diffusion.clean_pattern)
    device = cfg.plan.device
    run = PlannedRun(
        shape=shape, device=device, gpus=planned_gpus(cfg), tensor=cfg.parallel.tensor,
        pipeline=cfg.parallel.pipeline, context=cfg.parallel.context,
        sequence_parallel=cfg.parallel.sequence_parallel,
        distributed_optimizer=cfg.parallel.distributed_optimizer and device == "gpu",
        global_batch_size=cfg.train.global_batch_size, micro_batch_size=cfg.train.micro_batch_size,
        steps=cfg.train.steps, seq_length=cfg.data.seq_length, objective=cfg.train.objective, layout=layout,
        block_size=cfg.diffusion.block_size, documents=cfg.data.pack,
        kernel=resolve_kernel(cfg.diffusion.attention_kernel, layout, device, cfg.parallel.context),
        precision=cfg.train.precision, fp8=cfg.train.fp8 is not None, recompute=cfg.train.recompute,
    )
    problems = layout_problems(shape, run)
    if problems:
        raise UserError(f"impossible layout for {shape.name or 'this model'}: {'; '.join(problems)}")
    return run
