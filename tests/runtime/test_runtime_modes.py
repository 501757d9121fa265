"""The tri-mode runtime: family fidelity, self-speculation == AR, cache == recompute, NFE, EOS, arguments."""

from __future__ import annotations

import pytest
import torch

from ar2dlm.conversion.hf_source import SUPPORTED_ARCHITECTURES

FAMILIES = SUPPORTED_ARCHITECTURES
PROMPTS = ([17, 42, 99], [5, 60, 61, 62, 200, 13, 77], [250, 11, 12, 30, 31])
NO_EOS: list[int] = []  # an empty EOS list: decode all max_new_tokens


def new_part(sequences: torch.Tensor, prompt_width: int) -> torch.Tensor:
    return sequences[:, prompt_width:]


def cut_at_eos(tokens: torch.Tensor, eos: int, pad: int) -> torch.Tensor:
    """What rows that stop at ``eos`` must look like: pads after the first EOS."""
    expected = tokens.clone()
    for row in range(tokens.shape[0]):
        hits = (tokens[row] == eos).nonzero()
        if len(hits):
            expected[row, int(hits[0]) + 1:] = pad
    return expected


@pytest.mark.parametrize("arch", FAMILIES)
def test_forward_is_the_family_forward(arch, runtime_exports, load_runtime):
    import transformers

    family = getattr(transformers, arch)
    plain = family.from_pretrained(runtime_exports[arch]).eval()
    model = load_runtime(arch)
    assert type(model).__name__ == f"Ar2dlm{arch}" and isinstance(model, family)
    assert model.state_dict().keys() == plain.state_dict().keys()
    ids = torch.randint(10, 250, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        error = (model(ids).logits - plain(ids).logits).abs().max()
    assert error < 1e-4


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("arch", FAMILIES)
def test_self_spec_equals_ar_batched_and_alone(arch, attn, load_runtime, prompt_batch):
    model = load_runtime(arch, attn)
    ids, mask = prompt_batch
    ar, _ = model.ar_generate(ids, 12, attention_mask=mask)
    for block_length in (1, 4, 7):
        spec, _ = model.linear_spec_generate(ids, 12, block_length=block_length, attention_mask=mask)
        assert torch.equal(spec, ar), block_length
    for row, prompt in enumerate(PROMPTS):
        alone = torch.tensor([prompt])
        ar_alone, _ = model.ar_generate(alone, 12)
        spec_alone, _ = model.linear_spec_generate(alone, 12, block_length=4)
        assert torch.equal(new_part(ar_alone, len(prompt))[0], new_part(ar, ids.shape[1])[row])
        assert torch.equal(spec_alone, ar_alone)


@pytest.mark.parametrize("arch", FAMILIES)
def test_ar_matches_hf_greedy_generate(arch, load_runtime):
    model = load_runtime(arch)
    ids = torch.tensor([PROMPTS[1]])
    ours, _ = model.ar_generate(ids, 10)
    pad = model.config.pad_token_id
    reference = model.hf_generate(ids, max_new_tokens=10, do_sample=False, pad_token_id=pad)
    assert torch.equal(ours[:, : reference.shape[1]], reference)
    assert bool((ours[:, reference.shape[1]:] == pad).all())


@pytest.mark.parametrize("arch", FAMILIES)
def test_diffusion_with_block_1_and_threshold_1_is_ar(arch, load_runtime, prompt_batch):
    model = load_runtime(arch)
    ids, mask = prompt_batch
    ar, ar_nfe = model.ar_generate(ids, 9, attention_mask=mask)
    diffusion, nfe = model.generate(ids, 9, block_length=1, threshold=1.0, attention_mask=mask)
    assert torch.equal(diffusion, ar) and nfe == ar_nfe


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("arch", FAMILIES)
def test_prefix_cache_equals_recomputing_the_prefix(arch, attn, load_runtime, prompt_batch):
    cached = load_runtime(arch, attn)
    recompute = load_runtime(arch, attn, fresh=True)
    recompute._use_prefix_cache = False
    ids, mask = prompt_batch
    for block_length, threshold in ((4, 0.9), (3, 0.0), (5, 0.3)):
        args = dict(block_length=block_length, threshold=threshold, attention_mask=mask)
        assert _same(cached.generate(ids, 11, **args), recompute.generate(ids, 11, **args)), args
    spec = cached.linear_spec_generate(ids, 11, block_length=4, attention_mask=mask)
    assert _same(spec, recompute.linear_spec_generate(ids, 11, block_length=4, attention_mask=mask))


def _same(left: tuple[torch.Tensor, int], right: tuple[torch.Tensor, int]) -> bool:
    return torch.equal(left[0], right[0]) and left[1] == right[1]


@pytest.mark.parametrize("arch", ["LlamaForCausalLM", "Qwen3ForCausalLM"])
def test_diffusion_rows_equal_the_prompt_decoded_alone(arch, load_runtime, prompt_batch):
    model = load_runtime(arch)
    ids, mask = prompt_batch
    settings = dict(block_length=4, threshold=0.5, eos_token_id=NO_EOS)
    batched, _ = model.generate(ids, 10, attention_mask=mask, **settings)
    for row, prompt in enumerate(PROMPTS):
        alone, _ = model.generate(torch.tensor([prompt]), 10, **settings)
        assert torch.equal(new_part(alone, len(prompt))[0], new_part(batched, ids.shape[1])[row])


def count_forwards(model, call) -> tuple[torch.Tensor, int, int]:
    """(sequences, nfe, forward calls actually made)."""
    calls = []
    handle = model.register_forward_hook(lambda *_: calls.append(1))
    try:
        sequences, nfe = call()
    finally:
        handle.remove()
    return sequences, nfe, len(calls)


def test_nfe_by_hand(load_runtime, prompt_batch):
    model = load_runtime("LlamaForCausalLM")
    ids, mask = prompt_batch

    def nfe(method, n, **kwargs) -> int:
        kwargs |= {"attention_mask": mask, "eos_token_id": NO_EOS}
        _, reported, made = count_forwards(model, lambda: method(ids, n, **kwargs))
        assert reported == made
        return reported

    assert nfe(model.ar_generate, 7) == 7  # prefill gives token 1, then one forward per token
    assert nfe(model.ar_generate, 1) == 1
    # threshold 0 commits a whole block per pass: 1 prefill + 1 pass per block + 1 causal pass between blocks
    assert nfe(model.generate, 10, block_length=4, threshold=0.0) == 1 + 3 + 2  # blocks of 4, 4, 2
    assert nfe(model.generate, 8, block_length=4, threshold=0.0) == 1 + 2 + 1
    assert nfe(model.generate, 5, block_length=1, threshold=0.0) == 5  # blocks of 1 have no mask: AR
    # threshold 1 commits one position per pass: B - 1 passes per block
    assert nfe(model.generate, 8, block_length=4, threshold=1.0) == 1 + 3 + 1 + 3
    # self-speculation: a block of 1 has nothing to draft, so each cycle is one verify pass (== AR)
    assert nfe(model.linear_spec_generate, 6, block_length=1) == 6
    assert nfe(model.linear_spec_generate, 1, block_length=4) == 1


def test_self_spec_nfe_is_two_per_cycle(known):
    """On the known-answer model (tests/conftest.py) [S, C0] continues C1 C2 C3 F F ..., and every draft
    of [seed, M, M, M] is [seed, F, F, F]."""
    model = known.load()
    ids = torch.tensor([[known.sink, known.chain[0]]])
    sequences, nfe, made = count_forwards(
        model, lambda: model.linear_spec_generate(ids, 16, block_length=4, eos_token_id=NO_EOS))
    # prefill: C1; cycles emit C2 | C3 | F F F F (3 drafts accepted) | F F F F | F F F F with a draft and a verify
    # pass each; the 16th token is a cycle of one position: a verify pass only
    assert nfe == made == 1 + 2 * 5 + 1
    assert sequences[0, 2:].tolist() == list(known.chain[1:]) + [known.fixed] * 13


@pytest.mark.parametrize("arch", ["LlamaForCausalLM", "MistralForCausalLM"])
def test_rows_stop_at_eos_and_pad(arch, load_runtime, prompt_batch):
    model = load_runtime(arch)
    ids, mask = prompt_batch
    width, n, pad = ids.shape[1], 12, model.config.pad_token_id
    free, _ = model.ar_generate(ids, n, attention_mask=mask, eos_token_id=NO_EOS)
    eos = next(t for t in new_part(free, width)[0, 2:].tolist() if t != pad)  # row 0 emits it at step >= 3
    expected = cut_at_eos(new_part(free, width), eos, pad)
    for sequences, _ in (
        model.ar_generate(ids, n, attention_mask=mask, eos_token_id=eos),
        model.linear_spec_generate(ids, n, block_length=4, attention_mask=mask, eos_token_id=eos),
        model.generate(ids, n, block_length=1, threshold=1.0, attention_mask=mask, eos_token_id=[eos]),
    ):
        assert sequences.shape == (3, width + n)
        assert torch.equal(sequences[:, :width], ids)
        assert torch.equal(new_part(sequences, width), expected)
    diffusion, _ = model.generate(ids, n, block_length=4, threshold=0.5, attention_mask=mask,
                                  eos_token_id=eos)
    new = new_part(diffusion, width)
    assert diffusion.shape == (3, width + n) and torch.equal(new, cut_at_eos(new, eos, pad))


def test_sampling_is_seeded_and_well_formed(load_runtime, prompt_batch):
    model = load_runtime("Qwen3ForCausalLM")
    ids, mask = prompt_batch
    for method, kwargs in ((model.ar_generate, {}), (model.generate, {"block_length": 4, "threshold": 0.5}),
                           (model.linear_spec_generate, {"block_length": 4})):
        torch.manual_seed(3)
        first, _ = method(ids, 9, temperature=0.8, attention_mask=mask, eos_token_id=NO_EOS, **kwargs)
        torch.manual_seed(3)
        second, _ = method(ids, 9, temperature=0.8, attention_mask=mask, eos_token_id=NO_EOS, **kwargs)
        assert torch.equal(first, second) and first.shape == (3, ids.shape[1] + 9)
        assert bool((first < model.config.vocab_size).all()) and bool((first >= 0).all())


def test_defaults_come_from_the_config(load_runtime, prompt_batch):
    model = load_runtime("LlamaForCausalLM")
    ids, mask = prompt_batch
    assert model.config.block_size == 4 and model.config.diffusion_threshold == 0.9
    default = model.generate(ids, 6, attention_mask=mask)
    assert _same(default, model.generate(ids, 6, block_length=4, threshold=0.9, attention_mask=mask))
    default_spec = model.linear_spec_generate(ids, 6, attention_mask=mask)
    assert _same(default_spec, model.linear_spec_generate(ids, 6, block_length=4, attention_mask=mask))


@pytest.mark.parametrize("method, kwargs, message", [
    ("ar_generate", {"max_new_tokens": 0}, "max_new_tokens"),
    ("generate", {"max_new_tokens": -3}, "max_new_tokens"),
    ("generate", {"block_length": 0}, "block_length"),
    ("linear_spec_generate", {"block_length": 0}, "block_length"),
    ("generate", {"threshold": 1.5}, "threshold"),
    ("generate", {"threshold": -0.1}, "threshold"),
    ("ar_generate", {"temperature": -1.0}, "temperature"),
    ("linear_spec_generate", {"max_new_tokens": 5000}, "context window"),
    ("ar_generate", {"attention_mask": torch.tensor([[1, 1, 0]])}, "left-padded"),
    ("ar_generate", {"attention_mask": torch.tensor([[1, 1]])}, "shape"),
    ("ar_generate", {"input_ids": torch.tensor([1, 2, 3])}, "2D"),
])
def test_bad_arguments_raise_value_error(method, kwargs, message, load_runtime):
    model = load_runtime("LlamaForCausalLM")
    arguments = {"input_ids": torch.tensor([[20, 21, 22]]), "max_new_tokens": 4} | kwargs
    with pytest.raises(ValueError, match=message):
        getattr(model, method)(**arguments)


def test_missing_mask_token_id_raises(load_runtime):
    model = load_runtime("LlamaForCausalLM", fresh=True)
    model.config.mask_token_id = None
    with pytest.raises(ValueError, match="mask_token_id"):
        model.generate(torch.tensor([[20, 21]]), 4)
    assert model.ar_generate(torch.tensor([[20, 21]]), 2)[0].shape == (1, 4)  # AR needs no mask token


@pytest.mark.parametrize("pattern", ["block_causal", "none"])
def test_clean_patterns_the_runtime_does_not_serve_are_refused(pattern, load_runtime):
    model = load_runtime("LlamaForCausalLM", fresh=True)
    model.config.clean_pattern = pattern
    for decode in (model.generate, model.linear_spec_generate):
        with pytest.raises(ValueError, match=f"clean-stream pattern '{pattern}'"):
            decode(torch.tensor([[20, 21]]), 4)
    assert model.ar_generate(torch.tensor([[20, 21]]), 2)[0].shape == (1, 4)
    model.config.clean_pattern = "causal"
    assert model.generate(torch.tensor([[20, 21]]), 2)[0].shape == (1, 4)


@pytest.mark.parametrize("arch, overrides", [
    ("MistralForCausalLM", {"sliding_window": 3}),
    ("Qwen2ForCausalLM", {"use_sliding_window": True, "sliding_window": 3, "max_window_layers": 1}),
])
def test_sliding_window_models_match_hf(arch, overrides, make_export):
    from transformers import AutoModelForCausalLM

    path = make_export(arch, **overrides)
    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).eval()
    ids = torch.tensor([PROMPTS[1]])
    ar, _ = model.ar_generate(ids, 10, eos_token_id=NO_EOS)
    with torch.no_grad():  # a full causal forward over the result predicts every generated token
        assert torch.equal(model(ar).logits[0, len(PROMPTS[1]) - 1: -1].argmax(-1), ar[0, len(PROMPTS[1]):])
    assert torch.equal(model.linear_spec_generate(ids, 10, block_length=4, eos_token_id=NO_EOS)[0], ar)


def test_decode_stats_are_returned_on_request(known):
    model = known.load()
    c = known.chain
    ids, mask = torch.tensor([[0, known.sink, c[0]], [known.sink, c[1], c[2]]]), torch.tensor([[0, 1, 1], [1, 1, 1]])
    sequences, nfe = model.linear_spec_generate(ids, 9, block_length=4, attention_mask=mask, eos_token_id=NO_EOS)
    again, stats = model.linear_spec_generate(ids, 9, block_length=4, attention_mask=mask, eos_token_id=NO_EOS,
                                              return_stats=True)
    assert torch.equal(again, sequences) and not hasattr(model, "last_decode_stats")
    # row 0: C1 (prefill) | C2 | C3 | F F F F | F (a draft of [F, M]: a lone mask says O, rejected) | F;
    # row 1 is done after two cycles: C3 | F F F F | F F F F
    assert (stats.mode, stats.nfe, stats.cycles, stats.new_tokens) == ("self_spec", nfe, 5, (9, 9))
    assert nfe == 1 + 2 * 4 + 1
    for decode, mode in ((model.ar_generate, "ar"), (model.generate, "diffusion")):
        plain, plain_nfe = decode(ids, 5, attention_mask=mask)
        same, mode_stats = decode(ids, 5, attention_mask=mask, return_stats=True)
        assert torch.equal(plain, same) and (mode_stats.mode, mode_stats.nfe) == (mode, plain_nfe)
    with pytest.raises(ValueError, match="return_stats"):
        model.generate(ids, attention_mask=mask, do_sample=False, return_stats=True)
