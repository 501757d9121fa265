"""The decoding modes by name: each calls its runtime method and returns that call's stats."""

from __future__ import annotations

import pytest
import torch

from ar2dlm.generation.modes import MODES, decode

METHODS = {"ar": "ar_generate", "diffusion": "generate", "self_spec": "linear_spec_generate",
           "quad_spec": "quadratic_spec_generate"}


@pytest.mark.parametrize("mode", MODES)
def test_each_mode_returns_what_its_runtime_method_returns_with_the_stats(mode, known):
    model = known.load()
    ids = torch.tensor([[known.sink, known.chain[0]]])
    sequences, stats = decode(model, mode, ids, 6, block_length=4, threshold=0.9)
    kwargs = {} if mode == "ar" else {"block_length": 4, **({"threshold": 0.9} if mode == "diffusion" else {})}
    expected, nfe = getattr(model, METHODS[mode])(ids, 6, **kwargs)
    assert torch.equal(sequences, expected) and (stats.mode, stats.nfe) == (mode, nfe)


def test_diffusion_passes_its_levers_to_the_runtime(known):
    """In sub-blocks of 2 the known model's block [C1, M, M, M] becomes C1 F F O, not C1 F F F (see
    tests/runtime/test_runtime_decoding_levers.py)."""
    model = known.load()
    ids = torch.tensor([[known.sink, known.chain[0]]])
    levers = dict(sub_block_length=2, confidence="position", position_decay=1.0)
    sequences, stats = decode(model, "diffusion", ids, 4, block_length=4, threshold=0.9, **levers)
    assert sequences[0, 2:].tolist() == [known.chain[1], known.fixed, known.fixed, known.other] and stats.nfe == 4
    expected, nfe = model.generate(ids, 4, block_length=4, threshold=0.9, **levers)
    assert torch.equal(sequences, expected) and stats.nfe == nfe


def test_an_unknown_mode_is_refused(known):
    with pytest.raises(ValueError, match="mode 'beam' is not one of: ar, diffusion, self_spec"):
        decode(known.load(), "beam", torch.tensor([[known.sink]]), 2)
