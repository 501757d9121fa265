"""Export: a converted (untrained) checkpoint becomes an HF folder whose forward is the source's."""

import json

import pytest
import torch
import transformers

from ar2dlm.conversion.convert import convert
from ar2dlm.conversion.export import export
from ar2dlm.conversion.hf_source import SUPPORTED_ARCHITECTURES
from ar2dlm.errors import UserError
from ar2dlm.runtime import modeling_ar2dlm as runtime


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
    assert torch.equal(ar, spec)
    # the source's weights in the runtime class, told the mask token and block size: every mode decodes the same
    # tokens with the same number of forwards (drafts included), so the export kept weights, mask row and config
    source_model = getattr(runtime, f"Ar2dlm{architecture}").from_pretrained(source).eval()
    source_model.config.mask_token_id, source_model.config.block_size = metadata.mask_token_id, 8
    for mode, kwargs in (("linear_spec_generate", {}), ("generate", {"threshold": 0.5})):
        expected, expected_nfe = getattr(source_model, mode)(prompt, max_new_tokens=12, eos_token_id=[], **kwargs)
        decoded, nfe = getattr(model, mode)(prompt, max_new_tokens=12, eos_token_id=[], **kwargs)
        assert torch.equal(decoded, expected) and nfe == expected_nfe, mode


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


def test_export_gives_a_tokenizer_without_pad_token_one_for_left_padded_batches(tiny_tokenizer, make_tiny_hf, tmp_path,
                                                                               megatron_ready, caplog):
    """The README's batched example, as written, on a source whose tokenizer has no pad token."""
    import copy

    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.pad_token = None
    source = make_tiny_hf("LlamaForCausalLM", tokenizer=tokenizer, name="no-pad")
    assert transformers.AutoTokenizer.from_pretrained(source).pad_token is None
    convert(source, tmp_path / "converted")
    with caplog.at_level("INFO", logger="ar2dlm"):
        export(tmp_path / "converted", tmp_path / "exported")
    assert "export pads with '<|eos|>', its EOS token" in caplog.text

    path = tmp_path / "exported"
    model = transformers.AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)
    tok = transformers.AutoTokenizer.from_pretrained(path)
    batch = tok(["Hello", "the quick brown fox"], return_tensors="pt", padding=True)
    out, nfe = model.ar_generate(batch.input_ids, max_new_tokens=6, attention_mask=batch.attention_mask)
    assert (tok.pad_token, tok.padding_side, model.config.pad_token_id) == ("<|eos|>", "left", tok.eos_token_id)
    for row, text in enumerate(["Hello", "the quick brown fox"]):
        alone = tok([text], return_tensors="pt").input_ids
        assert torch.equal(out[row, batch.input_ids.shape[1]:], model.ar_generate(alone, max_new_tokens=6)[0][0, alone.shape[1]:])
