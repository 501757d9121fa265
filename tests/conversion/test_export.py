"""Export: a converted (untrained) checkpoint becomes an HF folder whose forward is the source's."""

import json

import pytest
import torch
import transformers

from ar2dlm.conversion.convert import convert
from ar2dlm.conversion.export import export
from ar2dlm.conversion.hf_source import SUPPORTED_ARCHITECTURES
from ar2dlm.errors import UserError


@pytest.mark.parametrize("architecture", SUPPORTED_ARCHITECTURES)
def test_export_round_trip_forward_and_decoding(architecture, make_tiny_hf, tmp_path, megatron_ready):
    source = make_tiny_hf(architecture, tied=architecture == "Qwen3ForCausalLM")
    convert(source, tmp_path / "converted", block_size=8)
    metadata = export(tmp_path / "converted", tmp_path / "exported")
    config = json.loads((tmp_path / "exported" / "config.json").read_text())
    assert config["architectures"] == [architecture]
    assert config["mask_token_id"] == metadata.mask_token_id and config["block_size"] == 8
    assert "AutoModelForCausalLM" in config["auto_map"]
    assert (tmp_path / "exported" / "README.md").read_text().count("linear_spec_generate") == 1

    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "exported", trust_remote_code=True).eval()
    reference = transformers.AutoModelForCausalLM.from_pretrained(source).eval()
    ids = torch.randint(0, 250, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=0, atol=1e-4)
    prompt = ids[:1, :6]
    ar, _ = model.ar_generate(prompt, max_new_tokens=12, eos_token_id=[])
    spec, nfe = model.linear_spec_generate(prompt, max_new_tokens=12, eos_token_id=[])
    assert torch.equal(ar, spec) and nfe >= 2


def test_export_refuses_bad_input(make_tiny_hf, tmp_path, megatron_ready):
    with pytest.raises(UserError, match="is not an ar2dlm checkpoint"):
        export(tmp_path, tmp_path / "exported")
    convert(make_tiny_hf("LlamaForCausalLM"), tmp_path / "converted")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("x")
    with pytest.raises(UserError, match="exists and is not empty"):
        export(tmp_path / "converted", tmp_path / "busy")
    assert sorted(p.name for p in (tmp_path / "busy").iterdir()) == ["x"]


def test_an_export_converts_again(make_tiny_hf, tmp_path, megatron_ready):
    """An exported folder (remote code in auto_map) is read as its native architecture."""
    source = make_tiny_hf("LlamaForCausalLM")
    convert(source, tmp_path / "converted")
    export(tmp_path / "converted", tmp_path / "exported")
    again = convert(tmp_path / "exported", tmp_path / "again")
    assert again.architecture == "LlamaForCausalLM"
    export(tmp_path / "again", tmp_path / "exported_again")
    first = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "exported", trust_remote_code=True)
    second = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "exported_again", trust_remote_code=True)
    ids = torch.randint(0, 250, (1, 12), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert torch.equal(first(ids).logits, second(ids).logits)
