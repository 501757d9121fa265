"""install_runtime: files copied, config.json fields; ar2dlm/runtime/ holds exactly what ships, which imports only
torch and transformers and keeps its own copies of ar2dlm's constants."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from ar2dlm.conversion.runtime_install import (
    RUNTIME_DIR,
    RUNTIME_FILES,
    SERVED_CLEAN_PATTERN,
    install_runtime,
)


def test_install_runtime_writes_config_and_files(make_export, tiny_tokenizer):
    path = make_export("Qwen3ForCausalLM")
    config = json.loads((path / "config.json").read_text())
    mask_id = tiny_tokenizer.convert_tokens_to_ids("<|fim_pad|>")
    assert config["auto_map"] == {"AutoModelForCausalLM": "modeling_ar2dlm.Ar2dlmQwen3ForCausalLM"}
    assert (config["mask_token_id"], config["block_size"], config["diffusion_threshold"]) == (mask_id, 4, 0.9)
    assert config["dllm"] == {"algorithms": ["LinearSpec", "FastDiffuser"], "block_size": 4,
                              "mask_token_id": mask_id, "causal_context": True}
    assert config["architectures"] == ["Qwen3ForCausalLM"]  # the source architecture is kept
    assert config["clean_pattern"] == "causal"
    assert all((path / name).read_bytes() == (RUNTIME_DIR / name).read_bytes() for name in RUNTIME_FILES)


def test_install_runtime_records_the_clean_pattern(make_export):
    path = make_export("LlamaForCausalLM")
    install_runtime(path, architecture="LlamaForCausalLM", mask_token_id=3, block_size=16, clean_pattern="block_causal")
    config = json.loads((path / "config.json").read_text())
    assert (config["block_size"], config["clean_pattern"], config["dllm"]["causal_context"]) == (16, "block_causal", False)


def test_install_runtime_rejects_unknown_architecture(make_export):
    path = make_export("LlamaForCausalLM")
    with pytest.raises(ValueError, match="unsupported architecture"):
        install_runtime(path, architecture="GPT2LMHeadModel", mask_token_id=3, block_size=4)
    with pytest.raises(FileNotFoundError):
        install_runtime(path / "missing", architecture="LlamaForCausalLM", mask_token_id=3, block_size=4)


def test_the_runtime_folder_holds_exactly_what_ships():
    shipped = {path.name for path in RUNTIME_DIR.iterdir() if path.suffix == ".py"}
    assert shipped == {"__init__.py", *RUNTIME_FILES}
    assert "import" not in (RUNTIME_DIR / "__init__.py").read_text()  # the package marker: a docstring


def test_runtime_files_import_only_torch_and_transformers():
    from transformers.dynamic_module_utils import get_imports

    for name in RUNTIME_FILES:
        third_party = set(get_imports(RUNTIME_DIR / name)) - set(sys.stdlib_module_names)
        assert "torch" in third_party and third_party <= {"torch", "transformers", "safetensors"}, name  # safetensors:
        # a dependency of transformers


def test_the_runtime_keeps_its_own_copies_of_the_supported_architectures_and_served_pattern():
    from ar2dlm.conversion.hf_source import SUPPORTED_ARCHITECTURES
    from ar2dlm.runtime import modeling_ar2dlm

    assert tuple(modeling_ar2dlm.RUNTIME_CLASSES) == SUPPORTED_ARCHITECTURES
    assert modeling_ar2dlm.SERVED_CLEAN_PATTERN == SERVED_CLEAN_PATTERN == "causal"


def test_installing_imports_neither_megatron_nor_torch():
    code = ("import sys, ar2dlm.conversion.runtime_install; "
            "print(any(m.split('.')[0] in ('megatron', 'torch') for m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
