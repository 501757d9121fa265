"""Value rules that types cannot express: choices, ranges, and how keys constrain each other."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

import torch
from omegaconf import DictConfig

from ar2dlm.generation.modes import MODES
from ar2dlm.runtime.decoding_ar2dlm import CONFIDENCES

CHOICES: dict[str, tuple] = {
    "logging.level": ("DEBUG", "INFO", "WARNING", "ERROR"),
    "train.objective": ("ar", "joint", "diffusion", "drafter"),
    "train.precision": ("fp32", "bf16"),
    "train.fp8": (None, "hybrid", "e4m3"),
    "train.fp8_recipe": ("delayed", "tensorwise", "mxfp8"),
    "train.recompute": ("none", "full", "selective"),
    "diffusion.clean_pattern": ("causal", "block_causal", "none"),
    "diffusion.noise_schedule": ("uniform", "position"),
    "diffusion.attention_kernel": ("auto", "flex", "sdpa", "split"),
    "diffusion.loss_normalization": ("shared", "per_term"),
    "optim.schedule": ("wsd", "cosine", "constant"),
    "mode": MODES,
    "confidence": CONFIDENCES,
    "dtype": ("auto", "float32", "bfloat16", "float16"),
    "plan.device": ("gpu", "cpu"),
}


def _get(cfg: DictConfig, dotted: str):
    node = cfg
    for part in dotted.split("."):
        if not isinstance(node, DictConfig) or part not in node:
            return _ABSENT
        node = node[part]
    return node


_ABSENT = object()


def _choices(cfg: DictConfig) -> Iterator[str]:
    for key, allowed in CHOICES.items():
        value = _get(cfg, key)
        if value is not _ABSENT and value not in allowed:
            shown = ", ".join("null" if a is None else a for a in allowed)
            yield f"{key}={value!r} is not one of: {shown}"


def _at_least(cfg: DictConfig, key: str, minimum: float) -> Iterator[str]:
    value = _get(cfg, key)
    if value is not _ABSENT and value is not None and value < minimum:
        yield f"{key}={value} must be >= {minimum}"


def _between(cfg: DictConfig, key: str, low: float, high: float) -> Iterator[str]:
    value = _get(cfg, key)
    if value is not _ABSENT and value is not None and not low <= value <= high:
        yield f"{key}={value} must be in [{low}, {high}]"


def _training_rules(cfg: DictConfig, world: int | None = None, on_this_machine: bool = True) -> Iterator[str]:
    """``world``: the world size (default: WORLD_SIZE); ``on_this_machine=False`` checks a run meant for another
    machine (``plan``): FP8 is not refused for want of a GPU here."""
    train, diffusion, parallel, optim = cfg.train, cfg.diffusion, cfg.parallel, cfg.optim
    for key in ("train.steps", "train.global_batch_size", "train.micro_batch_size", "diffusion.block_size",
                "data.seq_length", "parallel.tensor", "parallel.pipeline", "parallel.context",
                "checkpoint.keep_last", "train.log_interval", "data.max_document_chars", "diffusion.decode_block_size"):
        yield from _at_least(cfg, key, 1)
    for key in ("optim.warmup_steps", "checkpoint.save_interval", "optim.weight_decay", "optim.grad_clip",
                "train.eval_interval", "diffusion.dlm_loss_weight", "diffusion.ar_loss_weight"):
        yield from _at_least(cfg, key, 0)
    yield from _between(cfg, "diffusion.eps", 0.0, 0.5)
    yield from _between(cfg, "diffusion.random_block_prob", 0.0, 1.0)
    yield from _lever_rules(train, diffusion)
    yield from _drafter_rules(cfg)
    yield from _between(cfg, "optim.decay_fraction", 0.0, 1.0)
    yield from _between(cfg, "optim.beta1", 0.0, 0.999999)
    yield from _between(cfg, "optim.beta2", 0.0, 0.999999)
    yield from _between(cfg, "data.validation_fraction", 0.0, 0.5)
    if diffusion.half_life_ratio <= 0:
        yield f"diffusion.half_life_ratio={diffusion.half_life_ratio} must be > 0"
    if optim.lr <= 0 or optim.min_lr < 0 or optim.min_lr > optim.lr:
        yield f"need 0 <= optim.min_lr <= optim.lr and optim.lr > 0, got lr={optim.lr} min_lr={optim.min_lr}"
    if train.objective != "ar" and diffusion.block_size >= 1 and cfg.data.seq_length % diffusion.block_size:
        yield (f"data.seq_length={cfg.data.seq_length} is not a multiple of "
               f"diffusion.block_size={diffusion.block_size}")
    if train.objective == "joint" and diffusion.dlm_loss_weight == 0 and diffusion.ar_loss_weight == 0:
        yield "objective joint needs diffusion.dlm_loss_weight or diffusion.ar_loss_weight > 0"
    if parallel.context > 1 and cfg.data.seq_length % (2 * parallel.context):
        yield (f"data.seq_length={cfg.data.seq_length} must be a multiple of 2 x parallel.context = "
               f"{2 * parallel.context} (each context-parallel rank holds two chunks of the sequence)")
    yield from _layout_rules(train, parallel, world)
    yield from _fp8_rules(train, needs_gpu_here=on_this_machine)
    for index, source in enumerate(cfg.data.sources):
        if source.weight < 0:
            yield f"data.sources[{index}].weight={source.weight} must be >= 0"
    if cfg.data.sources and sum(source.weight for source in cfg.data.sources) <= 0:
        yield "data.sources weights must sum to a positive number"
    if diffusion.clean_pattern == "none" and train.objective != "diffusion":
        yield ("diffusion.clean_pattern=none (no clean stream: the single-stream baseline) needs "
               "train.objective=diffusion")
    if diffusion.clean_pattern == "block_causal" and train.objective == "joint":
        yield ("diffusion.clean_pattern=block_causal lets a clean token see the next token of its own block, so the "
               "AR loss of train.objective=joint would learn to copy: use train.objective=diffusion (no AR loss) "
               "or diffusion.clean_pattern=causal")


def _lever_rules(train: DictConfig, diffusion: DictConfig) -> Iterator[str]:
    """The training levers of docs/design.md §2.7 (complementary masking, random block sizes)."""
    if train.objective == "ar" and diffusion.complementary_masking:  # objective drafter: see _drafter_rules
        yield "diffusion.complementary_masking needs a diffusion loss: train.objective=joint or diffusion, not ar"
    if train.objective == "ar" and diffusion.random_block_prob > 0:
        yield "diffusion.random_block_prob > 0 needs a diffusion loss: train.objective=joint or diffusion, not ar"
    bad = [size for size in diffusion.random_block_sizes if size < 1 or diffusion.block_size % size]
    if bad and diffusion.block_size >= 1:
        yield (f"diffusion.random_block_sizes={list(diffusion.random_block_sizes)}: each must divide "
               f"diffusion.block_size={diffusion.block_size} (offending: {bad})")


def _drafter_rules(cfg: DictConfig) -> Iterator[str]:
    """The drafter objective's keys (checked whatever the objective) and what it needs of the run."""
    from ar2dlm.model.lora import KNOWN_TARGETS
    from ar2dlm.training.drafter import CE_TARGETS

    drafter = _get(cfg, "drafter")
    if drafter is _ABSENT:
        return
    yield from _at_least(cfg, "drafter.rank", 1)
    yield from _at_least(cfg, "drafter.top_k", 1)
    yield from _at_least(cfg, "drafter.ce_weight", 0)
    if drafter.ce_target not in CE_TARGETS:
        yield f"drafter.ce_target={drafter.ce_target!r} must be one of: {', '.join(CE_TARGETS)}"
    for key in ("alpha", "kl_temperature"):
        if not drafter[key] > 0:
            yield f"drafter.{key}={drafter[key]} must be > 0"
    unknown = [t for t in drafter.target_modules if t not in KNOWN_TARGETS and "*" not in t]
    if not drafter.target_modules or unknown:
        yield (f"drafter.target_modules={list(drafter.target_modules)} has no trainable target: give one or more of "
               f"{', '.join(KNOWN_TARGETS)} (or a pattern with '*')")
    if cfg.train.objective != "drafter":
        return
    parallel, diffusion = cfg.parallel, cfg.diffusion
    if drafter.rank >= 1 and parallel.tensor >= 1 and drafter.rank % parallel.tensor:
        yield f"drafter.rank={drafter.rank} must be a multiple of parallel.tensor={parallel.tensor}"
    if diffusion.clean_pattern != "causal":
        yield ("train.objective=drafter needs diffusion.clean_pattern=causal: the drafter reads the causal prefix the "
               "verifier writes")
    if parallel.context > 1:
        yield "train.objective=drafter does not support parallel.context > 1 yet"
    if parallel.sequence_parallel:
        yield "train.objective=drafter does not support parallel.sequence_parallel"
    if diffusion.complementary_masking:  # random_block_prob applies: the drafts' blocks are then of random sizes
        yield "train.objective=drafter has no noise: diffusion.complementary_masking does not apply to it"


def _layout_rules(train: DictConfig, parallel: DictConfig, world: int | None = None) -> Iterator[str]:
    if min(parallel.tensor, parallel.pipeline, parallel.context, train.micro_batch_size) < 1:
        return
    world = int(os.environ.get("WORLD_SIZE", "1")) if world is None else world
    model_parallel = parallel.tensor * parallel.pipeline * parallel.context
    if world % model_parallel:
        yield (f"world size {world} is not divisible by parallel.tensor x parallel.pipeline x "
               f"parallel.context = {model_parallel}")
        return
    data_parallel = world // model_parallel
    if train.global_batch_size % (train.micro_batch_size * data_parallel):
        yield (f"train.global_batch_size={train.global_batch_size} is not a multiple of "
               f"train.micro_batch_size x data-parallel size = {train.micro_batch_size} x {data_parallel}")
    if parallel.sequence_parallel and parallel.tensor == 1:
        yield "parallel.sequence_parallel needs parallel.tensor > 1"


def _fp8_rules(train: DictConfig, needs_gpu_here: bool = True) -> Iterator[str]:
    if train.fp8 is None:
        return
    if needs_gpu_here and not torch.cuda.is_available():
        yield f"train.fp8={train.fp8} needs a CUDA GPU with Transformer Engine; this machine has no GPU"
    if train.precision != "bf16":
        yield f"train.fp8={train.fp8} needs train.precision=bf16 (got {train.precision})"


def _convert_rules(cfg: DictConfig) -> Iterator[str]:
    yield from _at_least(cfg, "mask_token_id", 0)
    yield from _at_least(cfg, "block_size", 1)


def _generate_rules(cfg: DictConfig) -> Iterator[str]:
    for key in ("max_new_tokens", "block_length"):
        yield from _at_least(cfg, key, 1)
    yield from _between(cfg, "threshold", 0.0, 1.0)
    yield from _at_least(cfg, "sub_block_length", 1)
    yield from _at_least(cfg, "draft_length", 1)
    decay = _get(cfg, "position_decay")
    if decay is not _ABSENT and decay is not None and not 0.0 < decay <= 1.0:
        yield f"position_decay={decay} must be in (0, 1]"
    yield from _at_least(cfg, "temperature", 0.0)


def _generate_stage_rules(cfg: DictConfig) -> Iterator[str]:
    yield from _generate_rules(cfg)
    if cfg.prompt is None and cfg.prompt_file is None:
        yield "no prompt: give prompt=TEXT (taken as it is) or prompt_file=PATH ('-' reads stdin)"
    elif cfg.prompt is not None and cfg.prompt_file is not None:
        yield "give prompt=TEXT or prompt_file=PATH, not both"
    elif cfg.prompt == "":
        yield "prompt is empty: give the text to continue, e.g. prompt=\"Hello, my name is\""
    elif cfg.prompt_file == "":
        yield "prompt_file is empty: give a path, or '-' to read the prompt from stdin"


def _eval_rules(cfg: DictConfig) -> Iterator[str]:
    yield from _generate_rules(cfg)
    yield from _at_least(cfg, "batch_size", 1)
    for mode in cfg.modes:
        if mode not in MODES:
            yield f"modes: {mode!r} is not one of: {', '.join(MODES)}"
    for threshold in cfg.thresholds:
        if not 0.0 <= threshold <= 1.0:
            yield f"thresholds: {threshold} must be in [0, 1]"


def _run_rules(cfg: DictConfig) -> Iterator[str]:
    yield from _training_rules(cfg)
    yield from _between(cfg, "drafter_stage.random_block_prob", 0.0, 1.0)
    yield from _eval_rules(cfg.eval)
    yield from _convert_rules(cfg)


def _data_prepare_rules(cfg: DictConfig) -> Iterator[str]:
    yield from _at_least(cfg, "batch_size", 1)
    yield from _at_least(cfg, "max_document_chars", 1)
    yield from _at_least(cfg, "source.max_documents", 1)


def _data_continue_rules(cfg: DictConfig) -> Iterator[str]:
    yield from _at_least(cfg, "batch_size", 1)
    yield from _at_least(cfg, "max_new_tokens", 1)
    yield from _at_least(cfg, "limit", 1)
    yield from _at_least(cfg, "source.max_documents", 1)


def _plan_rules(cfg: DictConfig) -> Iterator[str]:
    """The train rules for the planned cluster (plan.gpus GPUs, not this machine), and the plan's own."""
    from ar2dlm.planning.run import planned_gpus

    gpus = planned_gpus(cfg)
    if gpus < 1:
        yield f"plan.gpus={gpus} must be >= 1"
    else:
        yield from _training_rules(cfg, world=gpus, on_this_machine=False)
    plan = cfg.plan
    if plan.gpu_memory_gb <= 0:
        yield f"plan.gpu_memory_gb={plan.gpu_memory_gb} must be > 0"
    if not 0 < plan.mfu <= 1:
        yield f"plan.mfu={plan.mfu} must be in (0, 1]"
    if plan.peak_tflops <= 0:
        yield f"plan.peak_tflops={plan.peak_tflops} must be > 0"
    if plan.device == "cpu" and cfg.train.fp8 is not None:
        yield f"train.fp8={cfg.train.fp8} needs plan.device=gpu (Transformer Engine)"
    if plan.device == "cpu" and cfg.parallel.sequence_parallel:
        yield "parallel.sequence_parallel needs plan.device=gpu"


_STAGE_RULES: dict[str, Callable[[DictConfig], Iterator[str]]] = {
    "data_prepare": _data_prepare_rules,
    "data_continue": _data_continue_rules,
    "convert": _convert_rules,
    "train": _training_rules,
    "export": lambda cfg: iter(()),
    "generate": _generate_stage_rules,
    "eval": _eval_rules,
    "run": _run_rules,
    "plan": _plan_rules,
}


def validate_stage(stage: str, cfg: DictConfig) -> list[str]:
    """All the problems with a composed, type-checked config (empty when it can run)."""
    return list(_choices(cfg)) + list(_STAGE_RULES[stage](cfg))
