"""install_runtime: files copied, config.json fields; the runtime imports only torch and transformers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest


def test_install_runtime_writes_config_and_files(make_export, tiny_tokenizer):
    from ar2dlm.runtime import RUNTIME_FILES

    path = make_export("Qwen3ForCausalLM")
    config = json.loads((path / "config.json").read_text())
    mask_id = tiny_tokenizer.convert_tokens_to_ids("<|fim_pad|>")
    assert config["auto_map"] == {"AutoModelForCausalLM": "modeling_ar2dlm.Ar2dlmQwen3ForCausalLM"}
    assert (config["mask_token_id"], config["block_size"], config["diffusion_threshold"]) == (mask_id, 4, 0.9)
    assert config["dllm"] == {"algorithms": ["LinearSpec", "FastDiffuser"], "block_size": 4,
                              "mask_token_id": mask_id, "causal_context": True}
    assert config["architectures"] == ["Qwen3ForCausalLM"]  # the source architecture is kept
    assert config["clean_pattern"] == "causal"
    assert all((path / name).is_file() for name in RUNTIME_FILES)


def test_install_runtime_records_the_clean_pattern(make_export):
    from ar2dlm.runtime import install_runtime

    path = make_export("LlamaForCausalLM")
    install_runtime(path, architecture="LlamaForCausalLM", mask_token_id=3, block_size=16, clean_pattern="block_causal")
    config = json.loads((path / "config.json").read_text())
    assert (config["block_size"], config["clean_pattern"], config["dllm"]["causal_context"]) == (16, "block_causal", False)
    from ar2dlm.runtime import SERVED_CLEAN_PATTERN, modeling_ar2dlm  # the runtime file keeps its own copy

    assert modeling_ar2dlm.SERVED_CLEAN_PATTERN == SERVED_CLEAN_PATTERN == "causal"


def test_install_runtime_rejects_unknown_architecture(make_export):
    from ar2dlm.runtime import install_runtime

    path = make_export("LlamaForCausalLM")
    with pytest.raises(ValueError, match="unsupported architecture"):
        install_runtime(path, architecture="GPT2LMHeadModel", mask_token_id=3, block_size=4)
    with pytest.raises(FileNotFoundError):
        install_runtime(path / "missing", architecture="LlamaForCausalLM", mask_token_id=3, block_size=4)


def test_runtime_files_import_only_torch_and_transformers():
    from transformers.dynamic_module_utils import get_imports

    import ar2dlm.runtime
    from ar2dlm.runtime import RUNTIME_FILES

    folder = Path(ar2dlm.runtime.__file__).parent
    for name in RUNTIME_FILES:
        third_party = set(get_imports(folder / name)) - set(sys.stdlib_module_names)
        assert third_party == {"torch", "transformers"}, name


def test_runtime_package_does_not_import_megatron():
    code = "import sys, ar2dlm.runtime; print(any(m.startswith('megatron') for m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
