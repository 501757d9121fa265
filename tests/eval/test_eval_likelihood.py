"""AR perplexity, continuation log-probs and the diffusion ELBO: hand-checkable values on a model with
uniform logits, the doubled forward against direct references, and batch-size invariance."""

from __future__ import annotations

import math

import pytest
import torch

from ar2dlm.errors import UserError
from ar2dlm.eval.elbo import diffusion_elbo, doubled_hidden
from ar2dlm.eval.likelihood import continuation_logprobs, encode_pair, encode_texts, perplexity
from ar2dlm.training.noise import NoiseConfig, sample_noise

TEXTS = ["copy: a b c = a b c", "add: 1 2 + 3 4 = 4 6", "sort: 3 1 2 = 1 2 3", "x", "recall: a 1 b 2 ; b = 2"]


def test_perplexity_of_uniform_logits_is_the_vocabulary_size(uniform):
    model, tokenizer = uniform
    tokens = encode_texts(tokenizer, TEXTS)
    assert all(row[-1] == tokenizer.eos_token_id for row in tokens)
    result = perplexity(model, tokens, batch_size=2)
    assert result["perplexity"] == pytest.approx(model.config.vocab_size, rel=1e-6)
    assert result["tokens"] == sum(len(row) - 1 for row in tokens)


def test_perplexity_does_not_depend_on_the_batch_size(tiny):
    model, tokenizer = tiny
    tokens = encode_texts(tokenizer, TEXTS)
    one, three = perplexity(model, tokens, batch_size=1), perplexity(model, tokens, batch_size=3)
    assert one["tokens"] == three["tokens"]
    assert one["perplexity"] == pytest.approx(three["perplexity"], rel=1e-6)
    # by hand: the mean CE of every text's plain forward, text by text
    total = count = 0
    for row in tokens:
        ids = torch.tensor([row])
        with torch.no_grad():
            logits = model(ids).logits[0, :-1]
        total += torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum").item()
        count += len(row) - 1
    assert one["nll"] == pytest.approx(total / count, rel=1e-6)


def test_continuation_logprobs(uniform, tiny):
    model, tokenizer = uniform
    pairs = [encode_pair(tokenizer, "copy: a b =", " a b"), encode_pair(tokenizer, "", "x y")]
    for (logprob, _), (_, continuation) in zip(continuation_logprobs(model, pairs, 2), pairs, strict=True):
        assert logprob == pytest.approx(-len(continuation) * math.log(model.config.vocab_size), rel=1e-6)
    model, tokenizer = tiny
    context, continuation = encode_pair(tokenizer, "sort: 3 1 2 = ", "1 2 3")
    assert tokenizer.decode(continuation).startswith(" ")  # the context's trailing space moved over
    with torch.no_grad():
        logits = model(torch.tensor([context + continuation])).logits[0].log_softmax(-1)
    expected = sum(logits[len(context) - 1 + i, token].item() for i, token in enumerate(continuation))
    forced = [int(logits[len(context) - 1 + i].argmax()) for i in range(len(continuation))]
    sequences, _ = model.ar_generate(torch.tensor([context]), len(continuation), eos_token_id=[])
    greedy = sequences[0, len(context):].tolist()
    both = continuation_logprobs(model, [(context, continuation), (context, greedy)], batch_size=2)
    assert both[0] == (pytest.approx(expected, rel=1e-5), forced == continuation)
    assert both[1][1] is True


def test_elbo_of_uniform_logits_by_hand(uniform):
    model, tokenizer = uniform
    tokens = encode_texts(tokenizer, TEXTS)
    result = diffusion_elbo(model, tokens, draws=3, seed=5, batch_size=2)
    config = NoiseConfig(mask_token_id=model.config.mask_token_id, block_size=model.config.block_size)
    weighted = masked = 0.0
    for index, row in enumerate(tokens):
        for draw in range(3):
            noise = sample_noise(torch.tensor([row]), [index], step=draw, seed=5, config=config)
            weighted += noise.masked.sum().item() / noise.rate[0, 0].item()  # every masked CE is ln V
            masked += noise.masked.sum().item()
    log_v = math.log(model.config.vocab_size)
    assert result["masked_tokens"] == masked and result["tokens"] == 3 * sum(map(len, tokens))
    assert result["loss"] == pytest.approx(log_v * weighted / masked, rel=1e-5)
    assert result["nelbo_per_token"] == pytest.approx(log_v * weighted / result["tokens"], rel=1e-5)


def test_elbo_does_not_depend_on_the_batch_size_and_is_seeded(tiny):
    model, tokenizer = tiny
    tokens = encode_texts(tokenizer, TEXTS)
    one = diffusion_elbo(model, tokens, draws=2, seed=1, batch_size=1)
    four = diffusion_elbo(model, tokens, draws=2, seed=1, batch_size=4)
    assert one["masked_tokens"] == four["masked_tokens"]
    assert one["loss"] == pytest.approx(four["loss"], rel=1e-6)
    assert diffusion_elbo(model, tokens, draws=2, seed=2, batch_size=4)["loss"] != four["loss"]
    assert one["block_size"] == model.config.block_size and one["schedule"] == "uniform"


def test_doubled_forward_matches_direct_references(tiny):
    """Clean half == the plain causal forward; noisy block k == a forward over [x_0 before block k ;
    x_t block k] with the block bidirectional: the docs/design.md §2.2 mask, through the HF model, with padding."""
    model, tokenizer = tiny
    block = model.config.block_size
    rows = [encode_texts(tokenizer, [text])[0][:11] for text in TEXTS[:2]]
    rows[1] = rows[1][:7]
    width = 12
    clean = torch.tensor([row + [0] * (width - len(row)) for row in rows])
    valid = torch.tensor([[True] * len(row) + [False] * (width - len(row)) for row in rows])
    generator = torch.Generator().manual_seed(0)
    noisy = torch.where(torch.rand(clean.shape, generator=generator) < 0.5, model.config.mask_token_id, clean)
    hidden = doubled_hidden(model, noisy, clean, valid, block)
    head = model.get_output_embeddings()
    with torch.no_grad():
        doubled_logits = head(hidden)
        for b, row in enumerate(rows):
            n = len(row)
            plain = model(torch.tensor([row])).logits[0]
            assert torch.allclose(doubled_logits[b, width:width + n], plain, atol=1e-4)
            for start in range(0, n, block):
                stop = min(start + block, n)
                ids = torch.cat([clean[b, :start], noisy[b, start:stop]])[None]
                q = torch.arange(stop)[:, None]
                k = torch.arange(stop)[None, :]
                allowed = (k <= q) | ((q >= start) & (k >= start))
                mask = torch.where(allowed, 0.0, torch.finfo(torch.float32).min)[None, None]
                reference = model(ids, attention_mask=mask).logits[0, start:stop]
                assert torch.allclose(doubled_logits[b, start:stop], reference, atol=1e-4), (b, start)


def test_likelihood_errors(tiny):
    model, tokenizer = tiny
    with pytest.raises(UserError, match="two or more tokens"):
        perplexity(model, [[5]])
    with pytest.raises(UserError, match="draws >= 1"):
        diffusion_elbo(model, [[5, 6]], draws=0)
    with pytest.raises(UserError, match="non-empty context"):
        continuation_logprobs(model, [([], [5])])


def test_toy_training_lowers_the_loss(fresh):
    from ar2dlm.data.synthetic import split_corpus
    from ar2dlm.eval.toy import train_toy

    model, tokenizer = fresh()
    losses = train_toy(model, tokenizer, [e.text for e in split_corpus(100, 1, seed=1)[0]], steps=20, batch_size=8)
    assert len(losses) == 20 and sum(losses[-5:]) < sum(losses[:5]) and not model.training
