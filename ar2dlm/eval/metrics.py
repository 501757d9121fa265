"""Decoding metrics as pure functions of per-example results (no model here).

Definitions (every one is independent of the evaluation batch size):

- **generated tokens** of an example: the new tokens up to and including the first EOS (or all
  ``max_new_tokens`` when there is none): the ``new_tokens`` of its row in the stats its runtime call returns.
- **NFE of an example**: the model forward passes needed to decode that example *alone* (batch 1),
  prefill included: what the runtime returns at batch size 1. A batched call reports one NFE for the
  whole batch (the slowest row's), so it is not used as is; see :func:`alone_costs`. Diffusion and
  self-speculation rows need a second pass, one example at a time, for that (``decode_alone``); without
  it their NFE and cycles are the batch's (:func:`batch_costs`, an upper bound; ``nfe_basis`` "batch").
- **tokens per forward (TPF)**: sum of generated tokens / sum of per-example NFE over the examples
  (AR is exactly 1).
- **acceptance by draft offset** (self-speculation): of the cycles that verified a draft token at offset j
  (1 = the first after the seed), the share that accepted it; counted where the NFE is (decoded alone when
  ``decode_alone``; else the batched calls, whose drafts near the end are as wide as the batch's longest row needs).
- **acceptance length** (self-speculation, both modes): tokens committed per verify cycle = accepted draft tokens
  + the verifier's own next token, counting only tokens up to EOS / ``max_new_tokens``. An example
  decoded alone gets 1 token from the prefill and the rest from its cycles, so its committed tokens are
  ``new_tokens - 1`` over ``cycles`` verify cycles; the mean is sum(new_tokens - 1) / sum(cycles).
- **acceptance ceiling** (self-speculation): the acceptance length had every draft been accepted, for the same
  outputs: sum(new_tokens - 1) over the fewest cycles that commit them, ceil((new_tokens - 1) / (k + 1)) per
  example for k draft tokens per cycle (block length - 1, or quad_spec's draft length). Short outputs cap it:
  the room a drafter has is the gap between the two.
- **accuracy**: exact match of the answer (generated text up to the first newline, whitespace
  stripped) with the reference answer (stripped), with ``correct`` of ``examples`` and its 95% Wilson
  score interval (:mod:`ar2dlm.eval.intervals`), overall and per task.
- **tokens/s**: generated tokens / wall seconds of the batched decoding calls (this one does depend on
  the batch size and the machine: it is throughput).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

from ar2dlm.eval.intervals import wilson_interval
from ar2dlm.generation.modes import SPECULATIVE_MODES


@dataclass
class ExampleResult:
    """One example decoded in one setting."""

    task: str
    prompt: str
    answer: str
    prediction: str
    correct: bool
    new_tokens: int
    nfe: int
    cycles: int


@dataclass
class ModeResult:
    """Aggregate metrics of one decoding setting (mode, block length, threshold)."""

    mode: str
    block_length: int | None
    threshold: float | None
    examples: int
    accuracy: float
    task_accuracy: dict[str, float]
    new_tokens: int
    nfe: int
    nfe_per_example: float
    tokens_per_forward: float
    acceptance_length: float | None
    seconds: float
    tokens_per_second: float
    batch_forwards: int  # forward passes the batched calls ran (depends on the batch size)
    batch_mismatches: int = 0  # examples whose batched output differs from the output decoded alone
    nfe_basis: str = "alone"  # "batch": some examples carry their batch's NFE and cycles (see batch_costs)
    correct: int = 0  # examples answered exactly
    accuracy_interval: tuple[float, float] = (0.0, 1.0)  # 95% Wilson score interval of correct / examples
    task_counts: dict[str, tuple[int, int]] = field(default_factory=dict)  # task -> (correct, examples)
    task_interval: dict[str, tuple[float, float]] = field(default_factory=dict)  # task -> 95% Wilson interval
    acceptance_by_offset: list[float] | None = None  # self-speculation: acceptance rate of draft offset 1, 2, ...
    acceptance_ceiling: float | None = None  # self-speculation: the acceptance length with every draft accepted
    draft_length: int | None = None  # quad_spec's draft tokens per cycle (None: block_length - 1)
    drafter: bool | None = None  # self-speculation with (True) or without (False) the export's drafter LoRA
    rows: list[ExampleResult] = field(default_factory=list)

    def summary(self) -> dict:
        """Everything but the per-example rows (JSON-ready)."""
        data = asdict(self)
        data.pop("rows")
        return data


@dataclass
class OffsetCounts:
    """Draft tokens verified and accepted at each offset, summed over decoding calls (``DecodeStats``)."""

    drafted: list[int] = field(default_factory=list)
    accepted: list[int] = field(default_factory=list)

    def add(self, stats) -> None:
        drafted, accepted = getattr(stats, "drafted_by_offset", ()), getattr(stats, "accepted_by_offset", ())
        for totals, counts in ((self.drafted, drafted), (self.accepted, accepted)):
            totals.extend([0] * (len(counts) - len(totals)))
            for offset, count in enumerate(counts):
                totals[offset] += int(count)

    def rates(self) -> list[float] | None:
        """Accepted / drafted per offset, up to the last offset ever drafted; None when nothing was drafted."""
        rates = [a / d for a, d in zip(self.accepted, self.drafted, strict=True) if d > 0]
        return rates or None


def answer_from_text(text: str) -> str:
    """The answer in a generated text: up to the first newline, whitespace stripped."""
    return text.split("\n", 1)[0].strip()


def exact_match(prediction: str, answer: str) -> bool:
    return prediction.strip() == answer.strip()


def tokens_per_forward(tokens: int, nfe: int) -> float:
    """Generated tokens per model forward pass (0 when nothing ran)."""
    return tokens / nfe if nfe > 0 else 0.0


def acceptance_length(new_tokens: Sequence[int], cycles: Sequence[int]) -> float | None:
    """Mean tokens committed per self-speculation verify cycle over examples decoded alone:
    sum(new_tokens - 1) / sum(cycles) (the prefill gives the first token); None without cycles."""
    total_cycles = sum(cycles)
    if total_cycles == 0:
        return None
    return sum(max(n - 1, 0) for n in new_tokens) / total_cycles


def acceptance_ceiling(new_tokens: Sequence[int], draft_tokens: int) -> float | None:
    """The acceptance length had every draft been accepted: sum(new_tokens - 1) over the fewest verify cycles,
    each committing at most ``draft_tokens`` + 1 tokens; None when no example needs a cycle."""
    per_cycle = draft_tokens + 1
    committed = [max(n - 1, 0) for n in new_tokens]
    cycles = sum(-(-c // per_cycle) for c in committed)
    return sum(committed) / cycles if cycles else None


def alone_costs(stats, mode: str) -> list[tuple[int, int]] | None:
    """Per-row (NFE, cycles) of decoding each row alone, from the stats a runtime call returned, or None
    when the stats cannot give them (then decode the rows one at a time).

    - a batch of one row: the call's own ``nfe`` and ``cycles``;
    - AR: exact for any batch, as a row alone needs one forward per generated token (the prefill gives
      the first token) and one cycle per token after the first.
    Diffusion and self-speculation batches share their passes (rows move through blocks in lockstep; a
    self-speculation draft is as long as the longest open row needs), so their rows' own counts are not
    in the stats of this runtime."""
    new_tokens = list(stats.new_tokens)
    if len(new_tokens) == 1:
        return [(int(stats.nfe), int(stats.cycles))]
    if mode == "ar":
        return [(n, max(n - 1, 0)) for n in new_tokens]
    return None


def batch_costs(stats) -> list[tuple[int, int]]:
    """Each row charged the (NFE, cycles) of the whole batched call: every pass of the batch ran for it, so
    this bounds what decoding it alone costs from above (exact for a batch of one)."""
    return [(int(stats.nfe), int(stats.cycles))] * len(stats.new_tokens)


def task_counts(rows: Sequence[ExampleResult]) -> dict[str, tuple[int, int]]:
    """(correct, examples) per task name, tasks in order of first appearance."""
    by_task: dict[str, list[bool]] = defaultdict(list)
    for row in rows:
        by_task[row.task].append(row.correct)
    return {task: (sum(hits), len(hits)) for task, hits in by_task.items()}


def task_accuracy(rows: Sequence[ExampleResult]) -> dict[str, float]:
    """Accuracy per task name, tasks in order of first appearance."""
    return {task: hits / count for task, (hits, count) in task_counts(rows).items()}


def summarize(mode: str, block_length: int | None, threshold: float | None, rows: list[ExampleResult],
              seconds: float, batch_forwards: int, batch_mismatches: int = 0, nfe_basis: str = "alone",
              acceptance_by_offset: list[float] | None = None, draft_length: int | None = None) -> ModeResult:
    """Aggregate the per-example results of one setting."""
    count = len(rows)
    correct = sum(row.correct for row in rows)
    per_task = task_counts(rows)
    tokens = sum(row.new_tokens for row in rows)
    nfe = sum(row.nfe for row in rows)
    acceptance = ceiling = None
    if mode in SPECULATIVE_MODES:
        acceptance = acceptance_length([r.new_tokens for r in rows], [r.cycles for r in rows])
        if block_length is not None:
            ceiling = acceptance_ceiling([r.new_tokens for r in rows],
                                         block_length - 1 if draft_length is None else draft_length)
    return ModeResult(
        mode=mode, block_length=block_length, threshold=threshold, examples=count,
        accuracy=correct / count if count else 0.0,
        task_accuracy=task_accuracy(rows), new_tokens=tokens, nfe=nfe,
        nfe_per_example=nfe / count if count else 0.0, tokens_per_forward=tokens_per_forward(tokens, nfe),
        acceptance_length=acceptance, seconds=seconds,
        tokens_per_second=tokens / seconds if seconds > 0 else 0.0,
        batch_forwards=batch_forwards, batch_mismatches=batch_mismatches, nfe_basis=nfe_basis,
        correct=correct, accuracy_interval=wilson_interval(correct, count), task_counts=per_task,
        task_interval={task: wilson_interval(hits, n) for task, (hits, n) in per_task.items()},
        acceptance_by_offset=acceptance_by_offset, acceptance_ceiling=ceiling, draft_length=draft_length, rows=rows,
    )
