"""Self-speculation and diffusion on the known-answer model (``known`` in tests/conftest.py): drafts
that are accepted, acceptance per cycle, NFE and the attention inside the block, all exact.

The model's rules: a token predicts its successor (C0 -> C1 -> C2 -> C3 -> F -> F ...; O -> C0); a mask predicts
F while it sees another mask and O when it sees no mask but itself. So the bidirectional draft of
[seed, M, M, M] is [seed, F, F, F], accepted in full once the text has reached F; a causal draft pass would give
[seed, O, F, F], and a causal diffusion block fills its first mask with O.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

NO_EOS: list[int] = []


@dataclass
class Forward:
    """One model call of a decoding run: its tokens, their positions, and what each of them may attend to."""

    tokens: torch.Tensor  # [B, q]
    positions: torch.Tensor  # [B, q]
    allowed: torch.Tensor  # bool [B, q, K]

    def block_attention(self) -> torch.Tensor:
        """Bool [B, q, q]: which of this call's tokens each of them sees."""
        return self.allowed[:, :, -self.tokens.shape[1]:]


def record_forwards(model, call) -> tuple[tuple[torch.Tensor, int], list[Forward]]:
    """Run ``call`` and return its result with every forward the model made."""
    forwards = []

    def hook(_module, _args, kwargs):
        mask = kwargs["attention_mask"]  # additive [B, 1, q, K]: 0 = attend
        forwards.append(Forward(kwargs["input_ids"].clone(), kwargs["position_ids"].clone(), mask[:, 0] == 0))

    handle = model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        return call(), forwards
    finally:
        handle.remove()


@pytest.fixture
def batch(known):
    """Row 0: [pad, S, C0] (AR continues C1 C2 C3 F F ...); row 1: [S, C1, C2] (C3 F F ...)."""
    c = known.chain
    return torch.tensor([[0, known.sink, c[0]], [known.sink, c[1], c[2]]]), torch.tensor([[0, 1, 1], [1, 1, 1]])


def accepted_per_cycle(verify_passes: list[Forward]) -> list[list[int]]:
    """Per row, the draft tokens each cycle accepted: the next cycle's seed sits c + 1 positions further. Finished
    rows leave the batch, so row r is in the passes that still have more than r rows (here only the last row
    finishes early)."""
    accepted = []
    for row in range(verify_passes[0].tokens.shape[0]):
        seeds = [int(f.positions[row, 0]) for f in verify_passes if f.tokens.shape[0] > row]
        accepted.append([after - before - 1 for before, after in zip(seeds, seeds[1:], strict=False)])
    return accepted


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_self_spec_accepts_the_drafts_the_weights_dictate(attn, known, batch):
    model = known.load(attn)
    ids, mask = batch
    c, f = known.chain, known.fixed
    (spec, nfe), forwards = record_forwards(
        model, lambda: model.linear_spec_generate(ids, 12, block_length=4, attention_mask=mask, eos_token_id=NO_EOS))
    ar, _ = model.ar_generate(ids, 12, attention_mask=mask, eos_token_id=NO_EOS)
    assert spec[:, 3:].tolist() == [[c[1], c[2], c[3]] + [f] * 9, [c[3]] + [f] * 11] and torch.equal(spec, ar)
    # prefill, 4 cycles of draft + verify, then one token left for row 0: a verify pass alone
    assert nfe == len(forwards) == 10
    drafts, verifies = forwards[1:9:2], forwards[2:9:2] + forwards[9:]
    assert all(bool((d.tokens[:, 1:] == known.mask).all()) for d in drafts)
    assert [v.tokens.tolist() for v in verifies] == [
        [[c[1], f, f, f], [c[3], f, f, f]],  # row 0 rejects its draft (C2 != F), row 1 accepts all three
        [[c[2], f, f, f], [f, f, f, f]],
        [[c[3], f, f, f], [f, f, f, f]],  # row 0 reaches F: accepted from now on; row 1 has its 12 tokens
        [[f, f, f, f]],  # finished rows run no more forwards
        [[f]],  # one token left: no mask to draft
    ]
    assert accepted_per_cycle(verifies) == [[0, 0, 3, 3], [3, 3]]
    recompute = known.load(attn)
    recompute._use_prefix_cache = False  # the rejected drafts left holes in the cache: the same answer without it
    assert torch.equal(recompute.linear_spec_generate(ids, 12, block_length=4, attention_mask=mask,
                                                      eos_token_id=NO_EOS)[0], spec)


@pytest.mark.parametrize("threshold, expected, passes", [
    # one commit per pass: a mask seeing 3, then 2 masks says F; the last one, alone, says O
    (1.0, lambda c, f, o: [[c[1], f, f, o, c[0], f, f, o], [c[3], f, f, o, c[0], f, f, o]], 1 + 3 + 1 + 3),
    # F at 0.985 >= 0.9 with three masks visible: every mask commits in the first pass
    (0.9, lambda c, f, o: [[c[1]] + [f] * 7, [c[3]] + [f] * 7], 1 + 1 + 1 + 1),
])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_diffusion_fills_the_block_as_the_weights_dictate(attn, threshold, expected, passes, known, batch):
    model = known.load(attn)
    ids, mask = batch
    (sequences, nfe), forwards = record_forwards(
        model, lambda: model.generate(ids, 8, block_length=4, threshold=threshold, attention_mask=mask,
                                      eos_token_id=NO_EOS))
    assert sequences[:, 3:].tolist() == expected(known.chain, known.fixed, known.other)
    assert nfe == len(forwards) == passes


@pytest.mark.parametrize("mode", ["self_spec", "diffusion"])
def test_blocks_attend_bidirectionally_and_verification_causally(mode, known, batch):
    """Every pass holding masks sees its whole block; every other pass is causal; all see exactly the valid
    earlier keys (left padding and rejected drafts hidden), as many as the block's first position."""
    model = known.load()
    ids, mask = batch
    call = {"self_spec": lambda: model.linear_spec_generate(ids, 12, block_length=4, attention_mask=mask),
            "diffusion": lambda: model.generate(ids, 12, block_length=4, threshold=1.0, attention_mask=mask)}[mode]
    _, forwards = record_forwards(model, call)
    has_masks = [bool((f.tokens == known.mask).any()) for f in forwards[1:]]
    assert sum(has_masks) == {"self_spec": 4, "diffusion": 9}[mode]  # drafts; 3 blocks x 3 denoising passes
    for forward, block_pass in zip(forwards[1:], has_masks, strict=True):
        width = forward.tokens.shape[1]
        causal = torch.ones(width, width, dtype=torch.bool).tril()
        expected = torch.ones_like(causal) if block_pass else causal
        assert torch.equal(forward.block_attention(), expected.expand_as(forward.block_attention()))
        earlier = forward.allowed[:, :, :-width].sum(-1)
        assert torch.equal(earlier, forward.positions[:, :1].expand_as(earlier))
