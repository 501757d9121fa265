"""Quadratic self-speculation: AR's greedy tokens for every family, NFE and acceptance by hand on the known-answer
model (tests/conftest.py), and the shared forward's attention checked key by key against a reference built here."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from ar2dlm.conversion.hf_source import SUPPORTED_ARCHITECTURES
from ar2dlm.runtime.speculation_ar2dlm import quadratic_layout

from .conftest import PROMPTS

NO_EOS: list[int] = []


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("arch", SUPPORTED_ARCHITECTURES)
def test_quadratic_spec_equals_ar_batched_alone_and_without_cache(arch, attn, load_runtime, prompt_batch):
    model = load_runtime(arch, attn)
    recompute = load_runtime(arch, attn, fresh=True)
    recompute._use_prefix_cache = False
    ids, mask = prompt_batch
    ar, _ = model.ar_generate(ids, 12, attention_mask=mask)
    for block_length, draft_length in ((2, None), (4, None), (7, None), (7, 2)):
        args = dict(block_length=block_length, draft_length=draft_length, attention_mask=mask)
        quad, nfe = model.quadratic_spec_generate(ids, 12, **args)
        assert torch.equal(quad, ar), args
        again, again_nfe = recompute.quadratic_spec_generate(ids, 12, **args)
        assert torch.equal(again, quad) and again_nfe == nfe, args
    for row, prompt in enumerate(PROMPTS):
        alone = torch.tensor([prompt])
        quad_alone, _ = model.quadratic_spec_generate(alone, 12, block_length=4)
        assert torch.equal(quad_alone[0, len(prompt):], ar[row, ids.shape[1]:])


def _decoder_calls(model, call):
    """Run ``call``; return its result and the decoder's (input_ids, position_ids, allowed [B, q, K]) per forward."""
    calls = []

    def hook(_module, _args, kwargs):
        mask = kwargs["attention_mask"]
        calls.append((kwargs["input_ids"].clone(), kwargs["position_ids"].clone(), mask[:, 0] == 0))

    handle = model.get_decoder().register_forward_pre_hook(hook, with_kwargs=True)
    try:
        return call(), calls
    finally:
        handle.remove()


def test_nfe_and_acceptance_by_hand(known):
    """[S, C0] continues C1 C2 C3 F F ...; every mask of a hypothesis block sees other masks and drafts F."""
    model = known.load()
    c, f = known.chain, known.fixed
    ids = torch.tensor([[known.sink, c[0]]])
    (sequences, stats), calls = _decoder_calls(model, lambda: model.quadratic_spec_generate(
        ids, 16, block_length=4, eos_token_id=NO_EOS, return_stats=True))
    # prefill: C1 (+ drafts F F F) | C2 | C3 | F F F F | F F F F | F F F F | one token left: F, no drafts
    # (the drafts of each cycle's forward: [C1 F F F], [C2 F F F], [C3 F F F], [F F F F], [F F F F], [F])
    assert sequences[0, 2:].tolist() == list(c[1:]) + [f] * 13
    assert stats.nfe == len(calls) == 1 + 6 and stats.cycles == 6 and stats.mode == "quad_spec"
    assert [call[0][0, :4].tolist() for call in calls[1:]] == [
        [c[1], f, f, f], [c[2], f, f, f], [c[3], f, f, f], [f, f, f, f], [f, f, f, f], [f]]
    assert [call[0].shape[1] for call in calls[1:]] == [4 * 5] * 5 + [1]  # (k + 1)(k + 2) tokens, k = 3
    # offsets 1..3 drafted in the five cycles that had drafts; accepted in the last three of them
    assert stats.drafted_by_offset == (5, 5, 5) and stats.accepted_by_offset == (3, 3, 3)
    linear, linear_nfe = model.linear_spec_generate(ids, 16, block_length=4, eos_token_id=NO_EOS)
    assert torch.equal(linear, sequences) and linear_nfe == 1 + 2 * 5 + 1


def test_rows_accept_different_lengths_in_one_batch(known):
    """Row 0 [pad, S, C0] rejects its drafts for two cycles while row 1 [S, C1, C2] accepts all of them."""
    model = known.load()
    c, f = known.chain, known.fixed
    ids, mask = torch.tensor([[0, known.sink, c[0]], [known.sink, c[1], c[2]]]), torch.tensor([[0, 1, 1], [1, 1, 1]])
    quad, stats = model.quadratic_spec_generate(ids, 12, block_length=4, attention_mask=mask, eos_token_id=NO_EOS,
                                                return_stats=True)
    ar, _ = model.ar_generate(ids, 12, attention_mask=mask, eos_token_id=NO_EOS)
    assert torch.equal(quad, ar) and quad[:, 3:].tolist() == [[c[1], c[2], c[3]] + [f] * 9, [c[3]] + [f] * 11]
    # cycles: row 0 accepts 0, 0, 3, 3 drafts then one token; row 1 accepts 3, 3, 3 and is done (1 + 3 * 4 > 12)
    assert stats.nfe == 1 + 5 and stats.new_tokens == (12, 12)
    assert stats.accepted_by_offset == (5, 5, 5) and stats.drafted_by_offset == (7, 7, 7)
    recompute = known.load()
    recompute._use_prefix_cache = False  # the holes of rejected drafts: the same answer without a cache
    assert torch.equal(recompute.quadratic_spec_generate(ids, 12, block_length=4, attention_mask=mask,
                                                         eos_token_id=NO_EOS)[0], quad)


@dataclass(frozen=True)
class Role:
    """A token of a cycle's shared forward: the draft's i-th token, or mask j of the block of hypothesis c."""

    hypothesis: int | None  # None: a draft token
    index: int

    def position(self) -> int:  # after the seed's position
        return self.index if self.hypothesis is None else self.hypothesis + 1 + self.index

    def sees(self, other: Role) -> bool:
        if self.hypothesis is None:
            return other.hypothesis is None and other.index <= self.index
        if other.hypothesis is None:
            return other.index <= self.hypothesis
        return other.hypothesis == self.hypothesis


def reference_roles(drafts: int) -> list[Role]:
    width = drafts + 1
    return [Role(None, i) for i in range(width)] + [Role(c, j) for c in range(width) for j in range(width)]


def test_shared_forward_masks_equal_a_reference_key_by_key(known):
    """Every cycle of a left-padded batch: queries see the valid keys of the accepted text and, among the new
    tokens, what their role allows; positions continue after the seed."""
    model = known.load()
    c = known.chain
    ids, mask = torch.tensor([[0, known.sink, c[0]], [known.sink, c[1], c[2]]]), torch.tensor([[0, 1, 1], [1, 1, 1]])
    _, calls = _decoder_calls(model, lambda: model.quadratic_spec_generate(
        ids, 12, block_length=4, attention_mask=mask, eos_token_id=NO_EOS))
    text = [[1, 2], [0, 1, 2]]  # per row: the cache slots that hold its accepted text (slot 0 of row 0 is padding)
    next_position = [2, 3]
    for tokens, positions, allowed in calls[1:]:
        width = 1 if tokens.shape[1] == 1 else round(((1 + 4 * tokens.shape[1]) ** 0.5 - 1) / 2)  # q = w (w + 1)
        roles = reference_roles(width - 1)[: tokens.shape[1]]
        old = allowed.shape[2] - tokens.shape[1]
        rows = tokens.shape[0]  # row 1 finishes first and leaves the batch (row 0 stays row 0)
        for row in range(rows):
            for q, role in enumerate(roles):
                assert positions[row, q] == next_position[row] + role.position()
                expected = [slot in text[row] for slot in range(old)] + [role.sees(other) for other in roles]
                assert allowed[row, q].tolist() == expected, (row, q, role)
        verified = tokens[:, :width]  # the known model's verifier: each accepted token's successor
        for row in range(rows):
            accepted = 1
            while accepted < width and int(verified[row, accepted]) == known.successor(int(verified[row, accepted - 1])):
                accepted += 1
            text[row] += list(range(old, old + accepted))
            next_position[row] += accepted
    assert quadratic_layout(3)[1].shape == (20, 20)


def test_layout_is_cached_and_position_offsets_follow_the_hypotheses():
    offsets, within = quadratic_layout(2)
    assert offsets.tolist() == [0, 1, 2] + [1, 2, 3] + [2, 3, 4] + [3, 4, 5]
    assert quadratic_layout(2)[1] is within
    roles = reference_roles(2)
    assert within.tolist() == [[a.sees(b) for b in roles] for a in roles]


def test_sampling_is_seeded_and_well_formed(load_runtime, prompt_batch):
    model = load_runtime("Qwen3ForCausalLM")
    ids, mask = prompt_batch
    torch.manual_seed(3)
    first, _ = model.quadratic_spec_generate(ids, 9, block_length=4, temperature=0.8, attention_mask=mask,
                                             eos_token_id=NO_EOS)
    torch.manual_seed(3)
    second, _ = model.quadratic_spec_generate(ids, 9, block_length=4, temperature=0.8, attention_mask=mask,
                                              eos_token_id=NO_EOS)
    assert torch.equal(first, second) and first.shape == (3, ids.shape[1] + 9)
    assert bool((first >= 0).all()) and bool((first < model.config.vocab_size).all())


@pytest.mark.parametrize("kwargs, message", [
    ({"block_length": 1}, "block_length >= 2"),
    ({"block_length": 4, "draft_length": 4}, "draft_length"),
    ({"block_length": 4, "draft_length": 0}, "draft_length"),
    ({"block_length": 100}, "context window"),
])
def test_bad_arguments_raise_value_error(kwargs, message, known):
    model = known.load()
    with pytest.raises(ValueError, match=message):
        model.quadratic_spec_generate(torch.tensor([[20, 21]]), 4, **kwargs)


def test_a_missing_mask_token_is_refused(known):
    model = known.load()
    model.config.mask_token_id = None
    with pytest.raises(ValueError, match="mask_token_id"):
        model.quadratic_spec_generate(torch.tensor([[20, 21]]), 4)


@pytest.mark.parametrize("arch", ["LlamaForCausalLM", "Qwen3ForCausalLM"])
def test_each_row_drafts_from_the_block_of_its_acceptance_length(arch, load_runtime, prompt_batch):
    """The next draft of row b is the argmax of positions 1.. of hypothesis block m_b, m_b its accepted drafts."""
    model = load_runtime(arch)
    ids, mask = prompt_batch
    seen = []

    def hook(_module, _args, kwargs, output):
        seen.append((kwargs["input_ids"].clone(), output.last_hidden_state.detach().clone()))

    handle = model.get_decoder().register_forward_hook(hook, with_kwargs=True)
    try:
        model.quadratic_spec_generate(ids, 14, block_length=4, attention_mask=mask, eos_token_id=NO_EOS)
    finally:
        handle.remove()
    head = model.get_output_embeddings()
    checked = 0
    for (tokens, hidden), (next_tokens, _) in zip(seen[1:], seen[2:], strict=False):
        if next_tokens.shape[0] != tokens.shape[0]:
            continue  # a row finished and left the batch: rows no longer line up
        width = round(((1 + 4 * tokens.shape[1]) ** 0.5 - 1) / 2)
        next_width = next(w for w in range(1, width + 1) if next_tokens.shape[1] in (w * (w + 1), 1))
        with torch.no_grad():
            verified = head(hidden[:, :width]).argmax(-1)
        for row in range(tokens.shape[0]):
            matched = 0
            while matched < width - 1 and verified[row, matched] == tokens[row, matched + 1]:
                matched += 1
            start = width * (matched + 1) + 1
            with torch.no_grad():
                expected = head(hidden[row, start:start + next_width - 1]).argmax(-1)
            assert next_tokens[row, 0] == verified[row, matched]
            assert torch.equal(next_tokens[row, 1:next_width], expected), (row, matched)
            checked += 1
    assert checked >= 6


@pytest.mark.parametrize("arch", SUPPORTED_ARCHITECTURES)
def test_tied_embeddings_too(arch, make_export, prompt_batch):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(make_export(arch, tie_word_embeddings=True),
                                                 trust_remote_code=True).eval()
    assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    ids, mask = prompt_batch
    ar, _ = model.ar_generate(ids, 10, attention_mask=mask, eos_token_id=NO_EOS)
    for block_length in (3, 6):
        quad, _ = model.quadratic_spec_generate(ids, 10, block_length=block_length, attention_mask=mask,
                                                eos_token_id=NO_EOS)
        assert torch.equal(quad, ar), block_length
