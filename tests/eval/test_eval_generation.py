"""Decoding evaluation on a real tiny export: batch-size invariance, per-example NFE, acceptance and
accuracy checked by hand."""

from __future__ import annotations

from dataclasses import replace

import pytest

from ar2dlm.errors import UserError
from ar2dlm.eval.generation import DecodeConfig, encode_prompts, evaluate_setting, generate_texts
from ar2dlm.eval.run import EvalSettings, sweep

SETTINGS = EvalSettings(thresholds=(0.0, 0.9), block_lengths=(2, 4), max_new_tokens=8, warmup=False)


def per_example(result):
    return [(r.prediction, r.new_tokens, r.nfe, r.cycles, r.correct) for r in result.rows]


def test_results_do_not_depend_on_the_batch_size(trained, held_out):
    model, tokenizer = trained
    alone = sweep(model, tokenizer, held_out, replace(SETTINGS, batch_size=1))
    batched = sweep(model, tokenizer, held_out, replace(SETTINGS, batch_size=3, decode_alone=True))  # 3 + 2
    # the rows differ (EOS at different places, different acceptance), so a mix-up would show
    assert len({r.new_tokens for r in batched[0].rows}) > 1
    for mode in ("diffusion", "self_spec", "quad_spec"):
        assert any(len({r.nfe for r in res.rows}) > 1 for res in batched if res.mode == mode), mode
    assert [(r.mode, r.block_length, r.threshold) for r in batched] == [
        ("ar", None, None), ("diffusion", 2, 0.0), ("diffusion", 2, 0.9), ("self_spec", 2, None),
        ("quad_spec", 2, None), ("diffusion", 4, 0.0), ("diffusion", 4, 0.9), ("self_spec", 4, None),
        ("quad_spec", 4, None)]
    for one, three in zip(alone, batched, strict=True):
        assert per_example(one) == per_example(three), (one.mode, one.block_length, one.threshold)
        for key in ("accuracy", "nfe", "nfe_per_example", "tokens_per_forward", "acceptance_length",
                    "acceptance_by_offset"):
            assert getattr(one, key) == getattr(three, key), key
        assert three.batch_mismatches == 0
    assert batched[0].batch_forwards < alone[0].batch_forwards  # what the batch ran does depend on it


class CountingCalls:
    """Wraps a model's decoding methods and counts the prompts each one decodes."""

    def __init__(self, model, monkeypatch):
        self.prompts = {}
        for name in ("ar_generate", "generate", "linear_spec_generate", "quadratic_spec_generate"):
            method = getattr(model, name)
            monkeypatch.setattr(model, name, self.counting(name, method))

    def counting(self, name, method):
        def call(input_ids, *args, **kwargs):
            self.prompts[name] = self.prompts.get(name, 0) + input_ids.shape[0]
            return method(input_ids, *args, **kwargs)

        return call


def test_each_prompt_is_decoded_once_unless_decode_alone(trained, held_out, monkeypatch):
    model, tokenizer = trained
    calls = CountingCalls(model, monkeypatch)
    settings = replace(SETTINGS, thresholds=(0.9,), block_lengths=(4,), batch_size=3)
    results = sweep(model, tokenizer, held_out, settings)
    assert calls.prompts == {"ar_generate": 5, "generate": 5, "linear_spec_generate": 5, "quadratic_spec_generate": 5}
    # each example carries the NFE and cycles of its batch (3 + 2 examples): an upper bound of decoding it alone
    alone = {r.mode: r for r in sweep(model, tokenizer, held_out, replace(settings, batch_size=1))}
    for result in results:
        assert result.nfe_basis == ("alone" if result.mode == "ar" else "batch")
        assert all(row.nfe >= one.nfe for row, one in zip(result.rows, alone[result.mode].rows, strict=True))
    assert len({row.nfe for row in results[1].rows}) <= 2  # one value per batch
    calls.prompts.clear()
    sweep(model, tokenizer, held_out, replace(settings, decode_alone=True))
    assert calls.prompts == {"ar_generate": 5, "generate": 10, "linear_spec_generate": 10,
                             "quadratic_spec_generate": 10}


def test_ar_nfe_per_example_is_the_nfe_of_decoding_alone(tiny, held_out):
    model, tokenizer = tiny
    encoded = encode_prompts(tokenizer, [e.prompt for e in held_out], None, 8)
    result = evaluate_setting(model, tokenizer, held_out, encoded, DecodeConfig("ar", 8), batch_size=5,
                              warmup=False)
    for ids, example in zip(encoded, result.rows, strict=True):
        import torch

        _, stats = model.ar_generate(torch.tensor([ids]), 8, return_stats=True)
        assert example.nfe == stats.nfe == stats.new_tokens[0] == example.new_tokens
    assert result.tokens_per_forward == 1.0 and result.acceptance_length is None


def test_self_spec_with_block_1_accepts_exactly_one_token_per_cycle(tiny, held_out):
    model, tokenizer = tiny
    encoded = encode_prompts(tokenizer, [e.prompt for e in held_out], None, 8)
    config = DecodeConfig("self_spec", 8, block_length=1)
    result = evaluate_setting(model, tokenizer, held_out, encoded, config, batch_size=2, warmup=False)
    assert result.acceptance_length == 1.0 and result.tokens_per_forward == 1.0
    assert all(r.nfe == r.new_tokens == r.cycles + 1 for r in result.rows)


def test_self_spec_predicts_what_ar_predicts(tiny, held_out):
    model, tokenizer = tiny
    results = sweep(model, tokenizer, held_out, replace(SETTINGS, modes=("ar", "self_spec"), batch_size=2))
    assert [r.prediction for r in results[0].rows] == [r.prediction for r in results[1].rows]
    assert all(r.acceptance_length is not None and r.acceptance_length >= 1.0 for r in results[1:])


def test_accuracy_by_hand(tiny, held_out):
    model, tokenizer = tiny
    settings = replace(SETTINGS, modes=("ar",), batch_size=2)
    predictions = [r.prediction for r in sweep(model, tokenizer, held_out[:4], settings)[0].rows]
    # the first two answers are what the model says (with whitespace around), the last two are not
    rigged = [replace(e, answer=f"  {p} ") for e, p in zip(held_out[:2], predictions[:2], strict=True)]
    rigged += [replace(e, answer=p + " x") for e, p in zip(held_out[2:4], predictions[2:4], strict=True)]
    result = sweep(model, tokenizer, rigged, settings)[0]
    assert result.accuracy == 0.5
    assert [r.correct for r in result.rows] == [True, True, False, False]


def test_generate_texts_cuts_at_stop_strings(trained, held_out):
    model, tokenizer = trained
    prompts = encode_prompts(tokenizer, [e.prompt for e in held_out[:3]], None, 8)
    config = DecodeConfig("diffusion", 8, 4, 0.9)
    full = generate_texts(model, tokenizer, prompts, config, batch_size=2)
    assert generate_texts(model, tokenizer, prompts, config, batch_size=3) == full
    longest = max(full, key=len)
    assert len(longest) >= 2
    stop = longest[1]
    cut = generate_texts(model, tokenizer, prompts, config, batch_size=2, stops=["\uffff", stop])
    assert cut == [text[: text.find(stop)] if stop in text else text for text in full]


@pytest.mark.parametrize("kwargs, message", [
    (dict(mode="beam"), "not one of"),
    (dict(mode="diffusion", block_length=4, threshold=1.5), "threshold"),
    (dict(mode="self_spec"), "block_length"),
    (dict(mode="ar", max_new_tokens=0), "max_new_tokens"),
])
def test_bad_decode_configs(kwargs, message):
    with pytest.raises(UserError, match=message):
        DecodeConfig(**kwargs)


def test_prompt_longer_than_the_context_is_refused(tiny):
    _, tokenizer = tiny
    with pytest.raises(UserError, match="context window"):
        encode_prompts(tokenizer, ["copy: a b c d e f ="], context=10, max_new_tokens=8)
