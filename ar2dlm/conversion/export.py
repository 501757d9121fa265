"""`ar2dlm export`: an ar2dlm checkpoint (converted or trained) -> a self-contained HF folder.

The folder is an ordinary checkpoint of the source architecture (same tensor names) plus the
tri-mode runtime (remote code named in ``auto_map``), so ``AutoModelForCausalLM.from_pretrained(
path, trust_remote_code=True)`` decodes in AR, diffusion and self-speculation modes.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from omegaconf import DictConfig

from ar2dlm.conversion.hf_weights import export_bridge, hf_tensors, save_safetensors_shards
from ar2dlm.fs import atomic_directory, check_output_dir
from ar2dlm.log import logger
from ar2dlm.model.checkpoint import HF_DIR, CheckpointMetadata, load_model, read_metadata

MODEL_CARD = """---
library_name: transformers
tags: [ar2dlm, diffusion-language-model, block-diffusion, self-speculation]
---
# {name}

A {architecture} checkpoint converted by ar2dlm into a block-diffusion
language model that keeps its autoregressive ability (trained {step} steps after conversion).
Mask token id {mask_token_id}, block size {block_size}.

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained(PATH, trust_remote_code=True)
tok = AutoTokenizer.from_pretrained(PATH)
ids = tok("Your prompt", return_tensors="pt").input_ids
out, nfe = model.ar_generate(ids, max_new_tokens=64)                               # autoregressive
out, nfe = model.generate(ids, max_new_tokens=64, block_length={block_size}, threshold=0.9)  # diffusion
out, nfe = model.linear_spec_generate(ids, max_new_tokens=64, block_length={block_size})    # self-speculation (lossless)
print(tok.decode(out[0, ids.shape[1]:]), "forward passes:", nfe)
```

`forward` is the unchanged {architecture} forward, so perplexity tools and lm-eval work as usual.
All three methods take left-padded batches with an `attention_mask` and return `(sequences, nfe)`.
"""


def export(checkpoint: str | Path, output: str | Path, *, overwrite: bool = False,
           threshold: float = 0.9, checksums: bool = True) -> CheckpointMetadata:
    """Write the HF folder for ``checkpoint`` at ``output``; returns the checkpoint's metadata."""
    from ar2dlm.runtime import install_runtime

    check_output_dir(output, overwrite)
    source = Path(checkpoint).expanduser()
    metadata = read_metadata(source)
    chunks, _, _ = load_model(source, checksums=checksums)
    bridge = export_bridge(source / HF_DIR, metadata.hf_tensor_names)
    with atomic_directory(output, overwrite) as staging:
        for item in (source / HF_DIR).iterdir():
            if item.is_file():
                shutil.copy2(item, staging / item.name)
        logger.info("writing safetensors weights")
        save_safetensors_shards(hf_tensors(bridge, chunks), staging, dtype=metadata.torch_dtype)
        install_runtime(staging, architecture=metadata.architecture, mask_token_id=metadata.mask_token_id,
                        block_size=metadata.block_size, threshold=threshold)
        (staging / "README.md").write_text(MODEL_CARD.format(
            name=Path(output).name, architecture=metadata.architecture, step=metadata.step,
            mask_token_id=metadata.mask_token_id, block_size=metadata.block_size))
    return metadata


def run_export(cfg: DictConfig) -> int:
    """CLI entry point of `ar2dlm export`."""
    from ar2dlm.distributed import ParallelLayout, init_distributed

    started = time.perf_counter()
    check_output_dir(cfg.output, cfg.overwrite)
    read_metadata(cfg.checkpoint)
    init_distributed(ParallelLayout())
    metadata = export(cfg.checkpoint, cfg.output, overwrite=cfg.overwrite, checksums=cfg.checksums)
    print(f"exported {metadata.architecture} (step {metadata.step}) -> {cfg.output} in "
          f"{time.perf_counter() - started:.1f}s; load it with AutoModelForCausalLM.from_pretrained(..., "
          "trust_remote_code=True)")
    return 0
