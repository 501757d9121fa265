"""Each bad input to `convert` is one clear error, and nothing is left behind in `output`."""

import json
import shutil
import subprocess
import sys

import pytest

from ar2dlm.conversion.convert import convert
from ar2dlm.errors import UserError


def _nothing_left(output):
    assert not output.exists()
    assert not [p for p in output.parent.iterdir() if p.name.startswith(f".{output.name}.")]


@pytest.fixture
def source(make_tiny_hf):
    return make_tiny_hf("LlamaForCausalLM")


def _refused(source_path, output, match, **kwargs):
    with pytest.raises(UserError, match=match) as error:
        convert(source_path, output, **kwargs)
    assert "\n" not in str(error.value)


def test_missing_directory(tmp_path, megatron_ready):
    _refused(tmp_path / "nope", tmp_path / "out", "does not exist")
    _nothing_left(tmp_path / "out")


def test_file_instead_of_directory(tmp_path, megatron_ready):
    (tmp_path / "file").write_text("x")
    _refused(tmp_path / "file", tmp_path / "out", "is not a directory")


def test_no_config(source, tmp_path, megatron_ready):
    (source / "config.json").unlink()
    _refused(source, tmp_path / "out", "has no config.json")
    _nothing_left(tmp_path / "out")


def test_unsupported_architecture_names_the_supported_ones(source, tmp_path, megatron_ready):
    config = json.loads((source / "config.json").read_text())
    config["architectures"] = ["GPT2LMHeadModel"]
    (source / "config.json").write_text(json.dumps(config))
    _refused(source, tmp_path / "out", "unsupported architecture GPT2LMHeadModel .* supported: LlamaForCausalLM, "
             "Qwen2ForCausalLM, Qwen3ForCausalLM, MistralForCausalLM")


def test_corrupt_safetensors(source, tmp_path, megatron_ready):
    (source / "model.safetensors").write_bytes(b"\x00garbage" * 10)
    _refused(source, tmp_path / "out", "not a valid safetensors file")
    _nothing_left(tmp_path / "out")


def test_truncated_safetensors(source, tmp_path, megatron_ready):
    weights = source / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    _refused(source, tmp_path / "out", "truncated or corrupt: expected .* bytes, found")
    _nothing_left(tmp_path / "out")


def test_shapes_that_disagree_with_the_config(source, tmp_path, megatron_ready):
    config = json.loads((source / "config.json").read_text())
    config["intermediate_size"] = 96
    (source / "config.json").write_text(json.dumps(config))
    _refused(source, tmp_path / "out", r"shape mismatch: model.layers.0.mlp.gate_proj.weight is \[128, 64\] .* \[96, 64\]")


def test_layer_count_that_disagrees_with_the_config(source, tmp_path, megatron_ready):
    config = json.loads((source / "config.json").read_text())
    config["num_hidden_layers"] = 3
    (source / "config.json").write_text(json.dumps(config))
    _refused(source, tmp_path / "out", "weights have 2 layers but config.json says num_hidden_layers=3")


def test_pickle_weights_are_never_loaded(source, tmp_path, megatron_ready):
    (source / "model.safetensors").rename(source / "pytorch_model.bin")
    _refused(source, tmp_path / "out", "only PyTorch pickle weights .* never unpickles; re-save them as safetensors")


def test_missing_shard_named_by_the_index(source, tmp_path, megatron_ready):
    (source / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "model-1-of-2.safetensors"}}))
    _refused(source, tmp_path / "out", "names shard.* missing: model-1-of-2.safetensors")


def test_mask_id_out_of_range(source, tmp_path, megatron_ready):
    _refused(source, tmp_path / "out", r"mask_token_id=100000 is out of range: the vocabulary has \d+ ids",
             mask_token_id=100000)
    _nothing_left(tmp_path / "out")


def test_existing_output_is_kept_unless_overwrite(source, tmp_path, megatron_ready):
    output = tmp_path / "out"
    output.mkdir()
    (output / "keep.txt").write_text("mine")
    _refused(source, output, "exists and is not empty .*overwrite=true")
    assert (output / "keep.txt").read_text() == "mine"
    convert(source, output, overwrite=True)
    assert not (output / "keep.txt").exists() and (output / "ar2dlm.json").is_file()


def test_failure_midway_leaves_previous_output_intact(source, tmp_path, megatron_ready, monkeypatch):
    output = tmp_path / "out"
    convert(source, output)
    before = sorted(p.relative_to(output) for p in output.rglob("*"))

    def crash(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr("ar2dlm.conversion.convert.save_weights", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        convert(source, output, overwrite=True)
    assert sorted(p.relative_to(output) for p in output.rglob("*")) == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]


def test_cli_reports_one_line_and_exit_code_2(tmp_path):
    result = subprocess.run([sys.executable, "-m", "ar2dlm.cli", "convert", f"source={tmp_path / 'missing'}",
                             f"output={tmp_path / 'out'}"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == f"ar2dlm convert: error: source {tmp_path / 'missing'} does not exist"
    assert "Traceback" not in result.stderr
    _nothing_left(tmp_path / "out")


def test_cli_converts(make_tiny_hf, tmp_path):
    source = make_tiny_hf("Qwen2ForCausalLM")
    result = subprocess.run([sys.executable, "-m", "ar2dlm.cli", "convert", f"source={source}",
                             f"output={tmp_path / 'out'}"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "converted Qwen2ForCausalLM" in result.stdout
    assert "reading shard 1/1: model.safetensors" in result.stderr
    shutil.rmtree(tmp_path / "out")


def test_unreachable_hub_id_is_one_clear_error(tmp_path, monkeypatch, megatron_ready):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)
    _refused("someorg/some-model", tmp_path / "out", "source someorg/some-model is not a local folder and could "
             "not be downloaded from the Hugging Face hub")
    _nothing_left(tmp_path / "out")
