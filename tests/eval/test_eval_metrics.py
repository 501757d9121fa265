"""Metric definitions on hand-checkable inputs (no model): TPF, acceptance length, per-example NFE from
the runtime's decoding stats, answers and exact match, aggregation."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from ar2dlm.eval.generation import cut_at_stop
from ar2dlm.eval.intervals import wilson_interval
from ar2dlm.eval.metrics import (
    ExampleResult,
    OffsetCounts,
    acceptance_ceiling,
    acceptance_length,
    alone_costs,
    answer_from_text,
    exact_match,
    summarize,
    tokens_per_forward,
)


def stats(mode, nfe, cycles, new_tokens):
    """A stand-in for the runtime's ``DecodeStats``."""
    return SimpleNamespace(mode=mode, nfe=nfe, cycles=cycles, new_tokens=tuple(new_tokens))


def row(task="copy", correct=True, new_tokens=4, nfe=4, cycles=3) -> ExampleResult:
    return ExampleResult(task, "p =", "a", "a" if correct else "b", correct, new_tokens, nfe, cycles)


def test_tokens_per_forward_is_tokens_over_nfe():
    assert tokens_per_forward(12, 4) == 3.0
    assert tokens_per_forward(7, 7) == 1.0
    assert tokens_per_forward(0, 0) == 0.0


def test_acceptance_length_by_hand():
    # self-speculation alone, block length 1: the prefill gives token 1, each cycle verifies one more
    assert acceptance_length([8], [7]) == 1.0
    # 10 tokens: 1 from the prefill, 9 from 3 verify cycles (e.g. 3 + 4 + 2 committed)
    assert acceptance_length([10], [3]) == 3.0
    # a mean over cycles, not over examples: (9 + 4) / (3 + 1)
    assert acceptance_length([10, 5], [3, 1]) == 3.25
    assert acceptance_length([1, 1], [0, 0]) is None  # EOS (or max_new_tokens 1) straight from the prefill


def test_alone_costs_from_decode_stats():
    # a batch of one row: the call's own counts
    assert alone_costs(stats("diffusion", 9, 2, [8]), "diffusion") == [(9, 2)]
    # AR: a row alone needs one forward per generated token, whatever the batch ran
    assert alone_costs(stats("ar", 12, 11, [12, 3, 5]), "ar") == [(12, 11), (3, 2), (5, 4)]
    # diffusion / self-speculation rows share their passes in a batch: not derivable
    assert alone_costs(stats("self_spec", 15, 7, [12, 3]), "self_spec") is None
    assert alone_costs(stats("diffusion", 15, 2, [8, 8]), "diffusion") is None


def test_answers_and_exact_match():
    assert answer_from_text(" 1 2 3\nadd: 4 =") == "1 2 3"
    assert answer_from_text("") == ""
    assert exact_match("1 2 3", " 1 2 3 ")
    assert not exact_match("1 2", "1 2 3")
    assert cut_at_stop("abc\n\nQ: next", ["\n\n", "Q:"]) == "abc"
    assert cut_at_stop("abc", []) == "abc"


def test_summarize_aggregates_rows():
    rows = [row("copy", True, new_tokens=10, nfe=7, cycles=3), row("copy", False, new_tokens=5, nfe=3, cycles=1),
            row("add", True, new_tokens=1, nfe=1, cycles=0)]
    result = summarize("self_spec", 4, None, rows, seconds=2.0, batch_forwards=9)
    assert result.accuracy == pytest.approx(2 / 3)
    assert result.task_accuracy == {"copy": 0.5, "add": 1.0}
    assert result.correct == 2 and result.task_counts == {"copy": (1, 2), "add": (1, 1)}
    assert result.accuracy_interval == pytest.approx(wilson_interval(2, 3))
    assert result.task_interval == {"copy": wilson_interval(1, 2), "add": wilson_interval(1, 1)}
    assert result.summary()["accuracy_interval"] == result.accuracy_interval
    assert (result.new_tokens, result.nfe) == (16, 11)
    assert result.tokens_per_forward == pytest.approx(16 / 11)
    assert result.nfe_per_example == pytest.approx(11 / 3)
    assert result.acceptance_length == pytest.approx((9 + 4 + 0) / 4)
    assert result.tokens_per_second == 8.0
    assert "rows" not in result.summary() and result.summary()["batch_forwards"] == 9
    assert summarize("diffusion", 4, 0.9, rows, 1.0, 5).acceptance_length is None


def test_quadratic_self_speculation_has_an_acceptance_length_and_offsets_add_over_calls():
    rows = [row("copy", True, new_tokens=10, nfe=4, cycles=3)]
    assert summarize("quad_spec", 4, None, rows, 1.0, 4).acceptance_length == pytest.approx(9 / 3)
    counts = OffsetCounts()
    assert counts.rates() is None
    counts.add(SimpleNamespace(drafted_by_offset=(4, 4, 4), accepted_by_offset=(3, 2, 0)))
    counts.add(SimpleNamespace(drafted_by_offset=(4, 4, 4, 2), accepted_by_offset=(1, 0, 0, 1)))
    counts.add(SimpleNamespace())  # AR and diffusion stats have no offsets
    assert counts.drafted == [8, 8, 8, 2] and counts.accepted == [4, 2, 0, 1]
    assert counts.rates() == [0.5, 0.25, 0.0, 0.5]
    result = summarize("quad_spec", 4, None, rows, 1.0, 4, acceptance_by_offset=counts.rates())
    assert result.summary()["acceptance_by_offset"] == [0.5, 0.25, 0.0, 0.5]


def test_acceptance_ceiling_is_the_acceptance_of_drafts_all_accepted():
    # block 4: a cycle commits at most 4 tokens; 10 new tokens -> 9 after the prefill -> 3 cycles, 1 -> none, 5 -> 1
    assert acceptance_ceiling([10, 1, 5], 3) == pytest.approx((9 + 0 + 4) / (3 + 0 + 1))
    assert acceptance_ceiling([1, 1], 3) is None
    rows = [row("copy", True, new_tokens=10, nfe=4, cycles=3), row("copy", True, new_tokens=5, nfe=3, cycles=2)]
    assert summarize("self_spec", 4, None, rows, 1.0, 4).acceptance_ceiling == pytest.approx(13 / 4)
    # quad_spec with 2 draft tokens per cycle: at most 3 committed -> 3 + 2 cycles
    assert summarize("quad_spec", 4, None, rows, 1.0, 4, draft_length=2).acceptance_ceiling == pytest.approx(13 / 5)
    assert summarize("ar", None, None, rows, 1.0, 4).acceptance_ceiling is None

