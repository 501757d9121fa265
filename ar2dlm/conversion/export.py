"""`ar2dlm export`: an ar2dlm checkpoint (converted or trained) -> a self-contained HF folder.

The folder is an ordinary checkpoint of the source architecture (same tensor names) plus the
tri-mode runtime (remote code named in ``auto_map``), so ``AutoModelForCausalLM.from_pretrained(
path, trust_remote_code=True)`` decodes in AR, diffusion and self-speculation modes.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from omegaconf import DictConfig

from ar2dlm.conversion.hf_weights import export_bridge, hf_tensors, save_safetensors_shards
from ar2dlm.conversion.lora_export import PEFT_DIR, load_model_and_adapter, write_peft_adapter
from ar2dlm.conversion.runtime_install import SERVED_CLEAN_PATTERN, install_runtime
from ar2dlm.errors import UserError
from ar2dlm.fs import atomic_directory, check_output_dir, refuse_overlap
from ar2dlm.log import logger
from ar2dlm.model.checkpoint import HF_DIR, METADATA_FILE, CheckpointMetadata, read_metadata
from ar2dlm.model.manifest import verify_manifest

MODEL_CARD = """---
library_name: transformers
tags: [ar2dlm, diffusion-language-model, block-diffusion, self-speculation]
---
# {name}

A {architecture} checkpoint converted by ar2dlm into a block-diffusion
language model that keeps its autoregressive ability (trained {step} steps after conversion).
Mask token id {mask_token_id}; diffusion block size {block_size} and a `{clean_pattern}` clean stream,
as trained.{refusal}

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained(PATH, trust_remote_code=True)
tok = AutoTokenizer.from_pretrained(PATH)  # pads on the left
batch = tok(["Your prompt", "Another, longer prompt"], return_tensors="pt", padding=True)
ids, mask = batch.input_ids, batch.attention_mask
out, nfe = model.ar_generate(ids, max_new_tokens=64, attention_mask=mask)                  # autoregressive
out, nfe = model.generate(ids, max_new_tokens=64, block_length={block_size}, threshold=0.9, attention_mask=mask)  # diffusion
out, nfe = model.linear_spec_generate(ids, max_new_tokens=64, block_length={block_size}, attention_mask=mask)    # self-speculation (lossless)
out, nfe = model.quadratic_spec_generate(ids, max_new_tokens=64, block_length={block_size}, attention_mask=mask) # one forward per cycle (lossless)
print(tok.batch_decode(out[:, ids.shape[1]:], skip_special_tokens=True), "forward passes:", nfe)
```

`forward` is the unchanged {architecture} forward, so perplexity tools and lm-eval work as usual.
All four methods take left-padded batches with an `attention_mask` and return `(sequences, nfe)`.
A call in Hugging Face's style (`model.generate(**batch, do_sample=False)`, `pipeline("text-generation")`)
runs transformers' own `generate`.
"""

REFUSAL = """

The bundled runtime refuses diffusion and self-speculation for this model: they decode over a causal
prefix cache, which a `{clean_pattern}` clean stream was not trained to read. `ar_generate` works."""


def resolve_checkpoint(path: str | Path) -> Path:
    """``path`` when it is a checkpoint; for a training run's output folder, its newest checkpoint (the one
    ``checkpoints/latest`` names once its save completed), checked before any work."""
    from ar2dlm.training.checkpointing import checkpoint_root, step_checkpoints

    path = Path(path).expanduser()
    if (path / METADATA_FILE).is_file() or not checkpoint_root(path).is_dir():
        return path
    checkpoints = step_checkpoints(path)
    if not checkpoints:
        raise UserError(f"{path} is a training run without a checkpoint yet: {checkpoint_root(path)} has no step_* "
                        "folder")
    newest = checkpoints[-1]
    try:
        read_metadata(newest)
        verify_manifest(newest, checksums=False)
    except UserError as error:
        earlier = f"export an earlier one with checkpoint={checkpoints[-2]}" if len(checkpoints) > 1 else \
            "the run has no earlier checkpoint"
        raise UserError(f"{error}; it is the newest checkpoint of run {path}: {earlier}") from None
    logger.info("%s is a training run: exporting its newest checkpoint, %s", path, newest.name)
    return newest


def trained_metadata(checkpoint: Path, metadata: CheckpointMetadata) -> CheckpointMetadata:
    """``metadata`` with the diffusion block size and clean-stream pattern the weights were trained with.

    Checkpoints written before ar2dlm recorded them (``clean_pattern`` None) take them from the run's config in
    trainer_state.json; one without it was converted and never trained, so its only stream is the source's causal one.
    """
    from ar2dlm.training.checkpointing import TRAINER_STATE, read_trainer_state

    if metadata.clean_pattern is not None:
        return metadata
    config = {}
    if (checkpoint / TRAINER_STATE).is_file():
        config = read_trainer_state(checkpoint).get("config") or {}
    if (config.get("train") or {}).get("objective", "ar") == "ar":
        return metadata.trained_with(metadata.block_size, SERVED_CLEAN_PATTERN)
    diffusion = config.get("diffusion") or {}
    decode = diffusion.get("decode_block_size") or diffusion.get("block_size", metadata.block_size)
    return metadata.trained_with(decode,
                                 diffusion.get("clean_pattern", SERVED_CLEAN_PATTERN))


def export(checkpoint: str | Path, output: str | Path, *, overwrite: bool = False,
           threshold: float = 0.9, checksums: bool = True) -> CheckpointMetadata:
    """Write the HF folder for ``checkpoint`` (a checkpoint, or a training run: its newest checkpoint) at
    ``output``; returns the checkpoint's metadata with the diffusion settings it was trained with."""
    check_output_dir(output, overwrite, inputs=[checkpoint])
    source = resolve_checkpoint(checkpoint)
    refuse_overlap(output, source)
    metadata = trained_metadata(source, read_metadata(source))
    chunks, adapter, lora = load_model_and_adapter(source, checksums=checksums)  # adapter: a drafter run's LoRA
    bridge = export_bridge(source / HF_DIR, metadata.hf_tensor_names)
    with atomic_directory(output, overwrite) as staging:
        for item in (source / HF_DIR).iterdir():
            if item.is_file():
                shutil.copy2(item, staging / item.name)
        logger.info("writing safetensors weights")
        save_safetensors_shards(hf_tensors(bridge, chunks), staging, dtype=metadata.torch_dtype)
        if adapter is not None:
            from transformers import AutoConfig

            logger.info("writing the drafter adapter as PEFT LoRA: %s/", PEFT_DIR)
            write_peft_adapter(staging, adapter, lora, AutoConfig.from_pretrained(source / HF_DIR),
                               metadata.torch_dtype)
        pad_for_batches(staging, metadata)
        install_runtime(staging, architecture=metadata.architecture, mask_token_id=metadata.mask_token_id,
                        block_size=metadata.block_size, threshold=threshold, clean_pattern=metadata.clean_pattern)
        refusal = "" if metadata.clean_pattern == SERVED_CLEAN_PATTERN else \
            REFUSAL.format(clean_pattern=metadata.clean_pattern)
        (staging / "README.md").write_text(MODEL_CARD.format(
            name=Path(output).name, architecture=metadata.architecture, step=metadata.step,
            mask_token_id=metadata.mask_token_id, block_size=metadata.block_size,
            clean_pattern=metadata.clean_pattern, refusal=refusal))
    if metadata.clean_pattern != SERVED_CLEAN_PATTERN:
        logger.warning("the checkpoint was trained with diffusion.clean_pattern=%s: the export's runtime serves AR "
                       "decoding only (diffusion and self-speculation need a causal clean stream)",
                       metadata.clean_pattern)
    return metadata


def pad_for_batches(hf_dir: Path, metadata: CheckpointMetadata) -> None:
    """Make the tokenizer in ``hf_dir`` pad on the left (the runtime's batches are left-padded), with its EOS
    token (else the mask token) when it has no pad token; config.json gets the same pad id if it has none."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(hf_dir, trust_remote_code=False, padding_side="left")  # saved with it
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is not None:
            tokenizer.pad_token, reason = tokenizer.eos_token, "its EOS token"
        else:
            tokenizer.pad_token = tokenizer.convert_ids_to_tokens(metadata.mask_token_id)
            reason = "the mask token (it has no EOS token)"
        logger.info("the tokenizer has no pad token: the export pads with %r, %s", tokenizer.pad_token, reason)
    tokenizer.save_pretrained(hf_dir)
    config_path = hf_dir / "config.json"
    config = json.loads(config_path.read_text())
    if config.get("pad_token_id") is None:
        config["pad_token_id"] = tokenizer.pad_token_id
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def run_export(cfg: DictConfig) -> int:
    """CLI entry point of `ar2dlm export`."""
    from ar2dlm.distributed import ParallelLayout, init_distributed

    started = time.perf_counter()
    check_output_dir(cfg.output, cfg.overwrite, inputs=[cfg.checkpoint])
    checkpoint = resolve_checkpoint(cfg.checkpoint)
    refuse_overlap(cfg.output, checkpoint)
    read_metadata(checkpoint)
    init_distributed(ParallelLayout())
    metadata = export(checkpoint, cfg.output, overwrite=cfg.overwrite, checksums=cfg.checksums)
    print(f"exported {metadata.architecture} (step {metadata.step}, {checkpoint}) -> {cfg.output} in "
          f"{time.perf_counter() - started:.1f}s; load it with AutoModelForCausalLM.from_pretrained(..., "
          "trust_remote_code=True)")
    return 0
