"""The plan of a train config (`ar2dlm plan`): what one GPU holds, whether it fits, FLOPs, time, communication."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from json import dumps

from omegaconf import DictConfig

from ar2dlm.planning.communication import Communication, step_communication
from ar2dlm.planning.flops import SECONDS_PER_DAY, StepFlops, Throughput, step_flops, throughput
from ar2dlm.planning.memory import GpuMemory, gpu_memory
from ar2dlm.planning.parameters import model_parameters
from ar2dlm.planning.run import PlannedRun, planned_run
from ar2dlm.planning.shape import planned_shape

# The plan does not count the CUDA context, NCCL buffers or the allocator's fragmentation (a few GB together):
# a run fits when it needs at most this share of the GPU.
USABLE_FRACTION = 0.9
RECOMPUTES = ("none", "selective", "full")
GB = 1e9


@dataclass(frozen=True)
class Plan:
    run: PlannedRun
    memory: GpuMemory
    gpu_memory_gb: float
    variants: dict[str, dict[str, dict[str, int]]]  # precision -> recompute -> {activations, total} bytes per GPU
    flops: StepFlops
    ar_flops: StepFlops
    throughput: Throughput
    mfu: float
    peak_tflops: float
    communication: Communication
    notes: list[str]

    @property
    def usable_bytes(self) -> float:
        return USABLE_FRACTION * self.gpu_memory_gb * GB

    @property
    def fits(self) -> bool:
        return self.memory.total <= self.usable_bytes


def _precisions(run: PlannedRun) -> dict[str, dict]:
    """The configured precision, bf16, and bf16 with FP8 GEMMs on GPU."""
    variants = {"fp32": {"precision": "fp32", "fp8": False}, "bf16": {"precision": "bf16", "fp8": False}}
    if run.device == "gpu":
        variants["bf16+fp8"] = {"precision": "bf16", "fp8": True}
    if run.precision != "fp32":
        del variants["fp32"]
    return variants


def make_plan(cfg: DictConfig) -> Plan:
    shape, notes = planned_shape(cfg)
    run = planned_run(cfg, shape)
    memory = gpu_memory(run)
    variants = {name: {recompute: _footprint(gpu_memory(run.but(recompute=recompute, **settings)))
                       for recompute in RECOMPUTES}
                for name, settings in _precisions(run).items()}
    flops = step_flops(run)
    notes += _notes(run, memory, variants)
    return Plan(run=run, memory=memory, gpu_memory_gb=cfg.plan.gpu_memory_gb, variants=variants, flops=flops,
                ar_flops=step_flops(run.but(objective="ar")),
                throughput=throughput(flops, run.gpus, cfg.plan.peak_tflops, cfg.plan.mfu), mfu=cfg.plan.mfu,
                peak_tflops=cfg.plan.peak_tflops, communication=step_communication(run, memory.parameters),
                notes=notes)


def _footprint(memory: GpuMemory) -> dict[str, int]:
    return {"activations": memory.activations.peak + memory.mask.held, "total": memory.total}


def _notes(run: PlannedRun, memory: GpuMemory, variants: dict) -> list[str]:
    notes = ["attention work and masks are counted for one document per row (packed documents only remove work)"]
    if run.objective == "drafter":
        notes.append("train.objective=drafter is planned as a joint step over [x_d ; x_0], an upper bound: a drafter "
                     "run holds gradients and optimizer state for its LoRA adapters only, and its split forward runs "
                     "the clean stream without autograd and only the scored draft blocks (docs/design.md §4.7)")
    if run.kernel == "sdpa":
        sparse = "flex" if run.device == "gpu" else "split"
        notes.append(f"the dense mask costs {memory.mask.dense_per_layer / GB:.2f} GB per layer; "
                     f"diffusion.attention_kernel={sparse} keeps no mask per layer")
    if run.recompute == "selective":
        precision = "bf16+fp8" if run.fp8 else run.precision
        saved = variants[precision]["none"]["total"] - variants[precision]["selective"]["total"]
        notes.append(f"selective recompute (of the core attention only) saves {saved / GB:.2f} GB per GPU over "
                     "none")
    if run.device == "gpu":
        notes.append("GPU figures model Transformer Engine layers; the CPU ones are checked against real steps "
                     "(tests/planning)")
    return notes


def plan_dict(plan: Plan) -> dict:
    """The plan in base units (bytes, FLOPs, seconds), for scripts."""
    run, memory = plan.run, plan.memory
    return {
        "model": {**asdict(run.shape), "parameters": model_parameters(run.shape)},
        "run": {key: getattr(run, key) for key in (
            "device", "gpus", "tensor", "pipeline", "context", "data", "sequence_parallel", "distributed_optimizer",
            "global_batch_size", "micro_batch_size", "micro_batches", "steps", "seq_length", "positions",
            "objective", "layout", "block_size", "documents", "kernel", "precision", "fp8", "recompute")},
        "memory": {
            "stage": memory.stage, "parameters": memory.states.parameters, "gradients": memory.states.gradients,
            "optimizer": memory.states.optimizer, "optimizer_distributed": memory.states.optimizer_distributed,
            "optimizer_replicated": memory.states.optimizer_replicated,
            "fp8_weight_copies": memory.states.fp8_weight_copies, "activations": memory.activations.peak,
            "activations_loss": memory.activations.loss, "micro_batches_in_flight": memory.activations.in_flight,
            "mask": memory.mask.held, "mask_flex": memory.mask.flex, "mask_dense": memory.mask.dense,
            "mask_dense_per_layer": memory.mask.dense_per_layer, "total": memory.total,
            "gpu": plan.gpu_memory_gb * GB, "usable": plan.usable_bytes, "fits": plan.fits,
        },
        "by_precision_and_recompute": plan.variants,
        "flops": {"model": plan.flops.model, "kernel": plan.flops.kernel, "ar_model": plan.ar_flops.model,
                  "joint_over_ar": plan.flops.model / plan.ar_flops.model, "data_tokens": plan.flops.data_tokens,
                  "seconds_per_step": plan.throughput.seconds_per_step,
                  "data_tokens_per_day": plan.throughput.data_tokens_per_day,
                  "seconds_for_train_steps": run.steps * plan.throughput.seconds_per_step, "mfu": plan.mfu,
                  "peak_tflops": plan.peak_tflops},
        "communication": asdict(plan.communication),
        "notes": plan.notes,
    }


def _gb(value: float) -> str:
    return f"{value / GB:.2f}"


def _shape_line(plan: Plan) -> str:
    s = plan.run.shape
    traits = ", ".join(t for t, present in (("tied embeddings", s.tied_embeddings), ("QKV bias", s.qkv_bias),
                                            ("q/k norm", s.qk_norm)) if present)
    count = model_parameters(s)
    shown = f"{count / 1e9:.2f}B" if count >= 1e8 else f"{count / 1e6:.2f}M"
    return (f"{shown} parameters: {s.num_layers} layers, hidden {s.hidden_size}, "
            f"{s.num_attention_heads} query / {s.num_key_value_heads} key-value heads of {s.head_dim}, MLP "
            f"{s.ffn_hidden_size}, vocabulary {s.vocab_size}" + (f", {traits}" if traits else ""))


def format_plan(plan: Plan) -> str:
    run, memory, states = plan.run, plan.memory, plan.memory.states
    sequence = (f"[x_t ; x_0] = {run.positions} positions per sequence (L = {run.seq_length})"
                if run.positions != run.seq_length else f"{run.positions} positions per sequence")
    precision = "bf16 + FP8" if run.fp8 else run.precision
    lines = [
        f"model:   {run.shape.name or 'unnamed'} (from {run.shape.source})",
        f"         {_shape_line(plan)}",
        f"run:     {run.objective} objective, {sequence}, {run.kernel} attention, {precision}, recompute "
        f"{run.recompute}, {run.device}",
        f"layout:  {run.gpus} GPUs = TP {run.tensor} x PP {run.pipeline} x CP {run.context} x DP {run.data}"
        f"{' (sequence parallel)' if run.sequence_parallel else ''}; micro-batch {run.micro_batch_size}, "
        f"{run.micro_batches} micro-batches per step, global batch {run.global_batch_size}",
        "",
        f"memory per GPU (GB = 1e9 bytes; the most loaded is pipeline stage {memory.stage}):",
        f"  parameters        {_gb(states.parameters):>8}",
        f"  gradients         {_gb(states.gradients):>8}",
        f"  optimizer state   {_gb(states.optimizer):>8}   " + (
            f"distributed over {run.data * run.context} ranks: {_gb(states.optimizer_distributed)}, not distributed: "
            f"{_gb(states.optimizer_replicated)}" if run.device == "gpu" else "torch AdamW, on every rank"),
    ]
    if states.fp8_weight_copies:
        lines.append(f"  FP8 weight copies {_gb(states.fp8_weight_copies):>8}")
    lines += [
        f"  activations       {_gb(memory.activations.peak):>8}   micro-batches in flight: "
        f"{memory.activations.in_flight}; of which loss head {_gb(memory.activations.loss)}",
        f"  attention mask    {_gb(memory.mask.held):>8}   flex BlockMask {_gb(memory.mask.flex)}; dense "
        f"{_gb(memory.mask.dense)} + {_gb(memory.mask.dense_per_layer)} per layer",
        f"  total             {_gb(memory.total):>8}   {'fits' if plan.fits else 'DOES NOT FIT'} "
        f"{plan.gpu_memory_gb:g} GB GPUs ({_gb(plan.usable_bytes)} GB usable: {USABLE_FRACTION:.0%})",
        "",
        "activations (with the mask) / total per GPU, GB, by precision and recompute:",
        f"  {'':<10}" + "".join(f"{recompute:>16}" for recompute in RECOMPUTES),
    ]
    for name, footprints in plan.variants.items():
        cells = (f"{_gb(footprints[r]['activations'])} / {_gb(footprints[r]['total'])}" for r in RECOMPUTES)
        lines.append(f"  {name:<10}" + "".join(f"{cell:>16}" for cell in cells))
    flops, ar = plan.flops, plan.ar_flops
    lines += [
        "",
        f"compute per step ({run.global_batch_size} sequences, {flops.data_tokens / 1e6:.2f}M data tokens):",
        f"  model FLOPs       {flops.model:.3e}   {run.objective} = {flops.model / ar.model:.2f} x AR "
        f"({ar.model:.3e}) on the same data tokens",
        f"  kernel FLOPs      {flops.kernel:.3e}   with recompute and the work the kernel does around the mask",
        f"  time per step     {plan.throughput.seconds_per_step:8.2f} s at MFU {plan.mfu:g} of "
        f"{plan.peak_tflops:g} TFLOP/s on {run.gpus} GPUs",
        f"  tokens per day    {plan.throughput.data_tokens_per_day / 1e9:8.2f} B data tokens",
        f"  train.steps       {run.steps:8d}   {run.steps * plan.throughput.seconds_per_step / SECONDS_PER_DAY:.1f} days",
        "",
        "communication per GPU per step (GB sent; DP reduces over data x context ranks):",
    ]
    comm = plan.communication
    for name, group, value in (("TP", run.tensor, comm.tensor), ("PP", run.pipeline, comm.pipeline),
                               ("CP", run.context, comm.context), ("DP", run.data * run.context, comm.data)):
        shown = _gb(value) if group > 1 else "-"
        lines.append(f"  {name} (group of {group:>3})  {shown:>8}")
    lines += ["", "notes:"] + [f"  - {note}" for note in plan.notes]
    return "\n".join(lines)


def run_plan(cfg: DictConfig, json: bool = False) -> int:  # noqa: A002 (the --json option)
    """CLI entry point of `ar2dlm plan`; exit code 0 when it fits, 1 when it does not."""
    plan = make_plan(cfg)
    print(dumps(plan_dict(plan), indent=2) if json else format_plan(plan))
    return 0 if plan.fits else 1
