"""`generate` keeps NLD's diffusion signature, and calls in Hugging Face's style reach transformers' own generate:
`pipeline("text-generation")`, `model.generate(**enc, do_sample=False)`, a GenerationConfig, no max_new_tokens."""

from __future__ import annotations

import torch
import transformers


def test_text_generation_pipeline_runs_hf_greedy_decoding(known, tiny_tokenizer):
    """The known-answer export continues any prompt ending in an unlisted token with C0 C1 C2 C3 F F ..."""
    pipe = transformers.pipeline("text-generation", model=str(known.path), trust_remote_code=True, device="cpu")
    prompt = "the quick brown fox"
    [result] = pipe(prompt, max_new_tokens=8, do_sample=False)
    expected = tiny_tokenizer.decode(list(known.chain) + [known.fixed] * 4)
    assert result["generated_text"] == prompt + expected


def test_hf_style_calls_reach_hf_generate_and_nld_calls_diffusion(known, tiny_tokenizer):
    model = known.load()
    enc = tiny_tokenizer(["the quick brown fox"], return_tensors="pt", return_token_type_ids=False)  # as Llama's
    ar, _ = model.ar_generate(enc.input_ids, 8, eos_token_id=[])
    hf = model.generate(**enc, do_sample=False, max_new_tokens=8)
    assert isinstance(hf, torch.Tensor) and torch.equal(hf, ar)
    config = transformers.GenerationConfig(max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(enc.input_ids, config), ar[:, :-5])  # HF's positional generation_config
    default = model.generate(enc.input_ids, pad_token_id=0)  # no max_new_tokens: HF's default length, 20 new tokens
    assert default.shape == (1, enc.input_ids.shape[1] + 20) and torch.equal(default[:, : ar.shape[1]], ar)
    sequences, nfe = model.generate(**enc, max_new_tokens=8, threshold=0.9)  # NLD's arguments only: diffusion
    c, f = known.chain, known.fixed
    assert sequences[0, enc.input_ids.shape[1]:].tolist() == [c[0]] + [f] * 7 and nfe == 4
