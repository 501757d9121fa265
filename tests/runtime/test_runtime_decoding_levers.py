"""Diffusion's decoding levers (docs/design.md §4.4): sub-block windows, position-aware confidence, the commit rule."""

from __future__ import annotations

import pytest
import torch

from ar2dlm.runtime.decoding_ar2dlm import DecodeSettings, choose_tokens, commit_rule, position_confidence

PROMPTS = ([17, 42, 99], [5, 60, 61, 62, 200, 13, 77], [250, 11, 12, 30, 31])
NO_EOS: list[int] = []


def decoding_globals(model) -> dict:
    """The namespace of the decoding module the loaded (remote-code) model runs, to patch its functions."""
    import sys

    return sys.modules[type(model).__module__].diffusion_decode.__globals__


def todays_denoise_step(logits, block, committed, settings) -> None:
    """The denoising step before the levers existed, verbatim: the reference for sub_block_length=None."""
    tokens, confidence = choose_tokens(logits, settings.temperature)
    confidence = confidence.masked_fill(committed, -1.0)
    pick = (confidence >= settings.threshold) & ~committed
    open_rows = (~committed).any(1)
    best = confidence.argmax(1)
    pick[open_rows, best[open_rows]] = True
    block[pick] = tokens[pick]
    committed |= pick


def serial_reference(model, prompt: list[int], max_new_tokens: int, block_length: int) -> tuple[list[int], int]:
    """Plain serial diffusion decoding written out with full forwards: per block [seed, MASK...], one pass per
    mask commits the leftmost one (argmax of its unshifted logit); a causal pass between blocks gives the
    next seed. Returns (new tokens, forward passes)."""
    mask_id = model.config.mask_token_id
    with torch.no_grad():
        sequence = list(prompt)
        seed, nfe, new = int(model(torch.tensor([sequence])).logits[0, -1].argmax()), 1, []
        while len(new) < max_new_tokens:
            block = [seed] + [mask_id] * (min(block_length, max_new_tokens - len(new)) - 1)
            for index in range(1, len(block)):
                logits = model(torch.tensor([sequence + block]), attention_mask=block_mask(len(sequence), len(block)))
                block[index] = int(logits.logits[0, len(sequence) + index].argmax())
                nfe += 1
            sequence, new = sequence + block, new + block
            if len(new) < max_new_tokens:
                seed, nfe = int(model(torch.tensor([sequence])).logits[0, -1].argmax()), nfe + 1
    return new, nfe


def block_mask(prefix: int, block: int) -> torch.Tensor:
    """Additive [1, 1, L, L]: causal, and the last ``block`` tokens also see each other."""
    total = prefix + block
    allowed = torch.ones(total, total).tril().bool()
    allowed[prefix:, prefix:] = True
    return torch.zeros(1, 1, total, total).masked_fill(~allowed, torch.finfo(torch.float32).min)


@pytest.mark.parametrize("threshold", [1.0, 0.0])
@pytest.mark.parametrize("arch", ["LlamaForCausalLM", "Qwen3ForCausalLM"])
def test_sub_block_1_is_plain_serial_diffusion_decoding(arch, threshold, load_runtime):
    model = load_runtime(arch)
    for prompt in PROMPTS:
        sequences, nfe = model.generate(torch.tensor([prompt]), 10, block_length=4, threshold=threshold,
                                        sub_block_length=1, eos_token_id=NO_EOS)
        expected, expected_nfe = serial_reference(model, prompt, 10, block_length=4)
        assert sequences[0, len(prompt):].tolist() == expected and nfe == expected_nfe == 1 + 3 + 1 + 3 + 1 + 1


@pytest.mark.parametrize("arch", ["LlamaForCausalLM", "Qwen3ForCausalLM"])
def test_without_levers_decoding_is_todays(arch, load_runtime, prompt_batch, monkeypatch):
    model = load_runtime(arch)
    ids, mask = prompt_batch
    settings = [(block, threshold) for block in (3, 4, 8) for threshold in (0.0, 0.5, 0.9, 1.0)]
    now = [model.generate(ids, 11, block_length=b, threshold=t, attention_mask=mask) for b, t in settings]
    same_window = [model.generate(ids, 11, block_length=b, threshold=t, attention_mask=mask, sub_block_length=b,
                                  confidence="position", position_decay=1.0) for b, t in settings]
    monkeypatch.setitem(decoding_globals(model), "_denoise_step", todays_denoise_step)
    before = [model.generate(ids, 11, block_length=b, threshold=t, attention_mask=mask) for b, t in settings]
    for setting, new, window, old in zip(settings, now, same_window, before, strict=True):
        assert torch.equal(new[0], old[0]) and new[1] == old[1], setting
        assert torch.equal(window[0], old[0]) and window[1] == old[1], setting


def test_the_known_model_decodes_as_before_and_in_sub_blocks(known):
    """[S, C0]: the prefill seeds C1; a block [C1, M, M, M] of three visible masks says F F F at 0.985. In
    sub-blocks of 2 the first pass may commit position 1 only (F); then two masks see each other (F at 0.87 <
    0.9: the first is committed) and a lone mask says O."""
    model = known.load()
    ids = torch.tensor([[known.sink, known.chain[0]]])
    c1, f, o = known.chain[1], known.fixed, known.other
    whole, whole_nfe = model.generate(ids, 4, block_length=4, threshold=0.9, eos_token_id=NO_EOS)
    assert whole[0, 2:].tolist() == [c1, f, f, f] and whole_nfe == 1 + 1
    split, split_nfe = model.generate(ids, 4, block_length=4, threshold=0.9, sub_block_length=2, eos_token_id=NO_EOS)
    assert split[0, 2:].tolist() == [c1, f, f, o] and split_nfe == 1 + 3


@pytest.mark.parametrize("sub_block, threshold", [(3, 0.0), (3, 0.5), (2, 0.9), (5, 0.2)])
def test_commits_stay_in_the_leftmost_unfinished_sub_block(sub_block, threshold, load_runtime, prompt_batch,
                                                           monkeypatch):
    model = load_runtime("LlamaForCausalLM")
    ids, mask = prompt_batch
    namespace = decoding_globals(model)
    rule, passes = namespace["commit_rule"], []

    def recorded_rule(probability, masked, settings):
        pick = rule(probability, masked, settings)
        passes.append((masked.clone(), pick.clone()))
        return pick

    monkeypatch.setitem(namespace, "commit_rule", recorded_rule)
    _, nfe = model.generate(ids, 16, block_length=8, threshold=threshold, sub_block_length=sub_block,
                            attention_mask=mask, eos_token_id=NO_EOS)
    assert passes and nfe == 1 + len(passes) + 1
    for masked, pick in passes:
        assert not bool((pick & ~masked).any())
        for row in range(masked.shape[0]):
            picked = pick[row].nonzero()[:, 0]
            if not bool(masked[row].any()):  # a row that finished its block before the others
                assert len(picked) == 0
                continue
            window = int(masked[row].nonzero()[0]) // sub_block
            assert len(picked) >= 1 and bool((picked // sub_block == window).all())
    if threshold == 0.0:  # every pass fills its whole sub-block: blocks 0-2 | 3-5 | 6-7 of 8 take 3 passes
        assert nfe == 1 + 3 + 1 + 3


def test_position_confidence_is_probability_discounted_by_distance_from_the_leftmost_mask():
    probability = torch.tensor([[1.0, 0.5, 0.6, 0.7], [1.0, 1.0, 0.3, 0.8]])
    masked = torch.tensor([[False, True, True, True], [False, False, True, True]])
    assert torch.allclose(position_confidence(probability, masked, 0.5),
                          torch.tensor([[1.0, 0.5, 0.3, 0.175], [1.0, 1.0, 0.3, 0.4]]))
    settings = dict(max_new_tokens=4, temperature=0.0, eos_ids=(), pad_id=0, threshold=1.0)
    by_probability = commit_rule(probability, masked, DecodeSettings(**settings))
    by_position = commit_rule(probability, masked, DecodeSettings(**settings, confidence="position",
                                                                  position_decay=0.5))
    assert by_probability.nonzero().tolist() == [[0, 3], [1, 3]]
    assert by_position.nonzero().tolist() == [[0, 1], [1, 3]]  # row 1: 0.8 x 0.5 still beats 0.3


def test_a_steep_position_decay_decodes_left_to_right(load_runtime, prompt_batch):
    """Every probability is >= 1 / vocabulary > 1e-4, so with decay 1e-4 the leftmost mask always ranks first."""
    model = load_runtime("Qwen3ForCausalLM")
    assert model.config.vocab_size < 1e4
    ids, mask = prompt_batch
    steep = model.generate(ids, 10, block_length=4, threshold=1.0, attention_mask=mask, confidence="position",
                           position_decay=1e-4)
    serial = model.generate(ids, 10, block_length=4, threshold=1.0, attention_mask=mask, sub_block_length=1)
    assert torch.equal(steep[0], serial[0]) and steep[1] == serial[1]


@pytest.mark.parametrize("kwargs, message", [
    ({"sub_block_length": 0}, "sub_block_length"),
    ({"sub_block_length": 2.0}, "sub_block_length"),
    ({"confidence": "entropy"}, "confidence"),
    ({"position_decay": 0.0}, "position_decay"),
    ({"position_decay": 1.5}, "position_decay"),
])
def test_bad_levers_raise_value_error(kwargs, message, load_runtime):
    model = load_runtime("LlamaForCausalLM")
    with pytest.raises(ValueError, match=message):
        model.generate(torch.tensor([[20, 21, 22]]), 4, **kwargs)
