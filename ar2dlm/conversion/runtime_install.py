"""Installing the tri-mode runtime (:mod:`ar2dlm.runtime`) into an exported HF folder (stdlib only here)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import ar2dlm.runtime
from ar2dlm.conversion.hf_source import SUPPORTED_ARCHITECTURES

RUNTIME_DIR = Path(ar2dlm.runtime.__file__).parent
RUNTIME_FILES: tuple[str, ...] = (
    "modeling_ar2dlm.py", "decoding_ar2dlm.py", "speculation_ar2dlm.py", "drafter_ar2dlm.py")
SERVING_ALGORITHMS: tuple[str, ...] = ("LinearSpec", "FastDiffuser")
SERVED_CLEAN_PATTERN = "causal"  # the runtime's diffusion and self-speculation read a causal prefix cache


def runtime_class_name(architecture: str) -> str:
    """``LlamaForCausalLM`` -> ``Ar2dlmLlamaForCausalLM`` (the class that auto_map names)."""
    if architecture not in SUPPORTED_ARCHITECTURES:
        supported = ", ".join(SUPPORTED_ARCHITECTURES)
        raise ValueError(f"unsupported architecture {architecture!r}; supported: {supported}")
    return f"Ar2dlm{architecture}"


def install_runtime(hf_dir: Path, *, architecture: str, mask_token_id: int, block_size: int,
                    threshold: float = 0.9, clean_pattern: str = SERVED_CLEAN_PATTERN) -> None:
    """Copy the runtime files into ``hf_dir`` and record auto_map, mask id, the training's block size and
    clean-stream pattern, threshold and the dLLM serving hints in its config.json."""
    hf_dir = Path(hf_dir)
    config_path = hf_dir / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} does not exist")
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be in [0, 1], got {threshold}")
    class_name = runtime_class_name(architecture)
    for name in RUNTIME_FILES:
        shutil.copyfile(RUNTIME_DIR / name, hf_dir / name)
    config = json.loads(config_path.read_text())
    config["auto_map"] = {"AutoModelForCausalLM": f"modeling_ar2dlm.{class_name}"}
    config.update(mask_token_id=int(mask_token_id), block_size=int(block_size),
                  diffusion_threshold=float(threshold), clean_pattern=str(clean_pattern))
    config["dllm"] = {"algorithms": list(SERVING_ALGORITHMS), "block_size": int(block_size),
                      "mask_token_id": int(mask_token_id), "causal_context": clean_pattern == SERVED_CLEAN_PATTERN}
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
