"""The demo corpus: seeded, generated tasks whose answers can be checked exactly.

Each example is one line, ``<task>: <input> = <answer>``, with symbols separated by spaces so that
a small tokenizer keeps one symbol per token. Tasks: copy, reverse, sort, add (digit by digit),
recall (key-value lookup). Training text is the whole line; evaluation gives the model the text up
to and including ``=`` and compares the generated answer (up to the end of the line / EOS).
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

TASKS = ("copy", "reverse", "sort", "add", "recall")
LETTERS = "abcdefghijklmnop"
DIGITS = "0123456789"


@dataclass(frozen=True)
class Example:
    task: str
    prompt: str  # ends with " ="
    answer: str  # starts with a space

    @property
    def text(self) -> str:
        return self.prompt + self.answer


def _symbols(rng: random.Random, alphabet: str, low: int, high: int) -> list[str]:
    return [rng.choice(alphabet) for _ in range(rng.randint(low, high))]


def _digits(value: int) -> str:
    return " ".join(str(value))


def make_example(task: str, rng: random.Random) -> Example:
    """One example of ``task`` drawn from ``rng``."""
    if task == "copy":
        items = _symbols(rng, LETTERS + DIGITS, 4, 14)
        return Example(task, f"copy: {' '.join(items)} =", " " + " ".join(items))
    if task == "reverse":
        items = _symbols(rng, LETTERS + DIGITS, 4, 14)
        return Example(task, f"reverse: {' '.join(items)} =", " " + " ".join(reversed(items)))
    if task == "sort":
        items = _symbols(rng, DIGITS, 4, 14)
        return Example(task, f"sort: {' '.join(items)} =", " " + " ".join(sorted(items)))
    if task == "add":
        a, b = rng.randint(10, 999), rng.randint(10, 999)
        return Example(task, f"add: {_digits(a)} + {_digits(b)} =", " " + _digits(a + b))
    if task == "recall":
        keys = rng.sample(LETTERS, rng.randint(3, 5))
        values = {key: rng.choice(DIGITS) for key in keys}
        query = rng.choice(keys)
        pairs = " ".join(f"{key} {values[key]}" for key in keys)
        return Example(task, f"recall: {pairs} ; {query} =", f" {values[query]}")
    raise ValueError(f"unknown task {task!r}; tasks: {', '.join(TASKS)}")


def examples(count: int, seed: int, tasks: tuple[str, ...] = TASKS) -> Iterator[Example]:
    """``count`` examples cycling through ``tasks``, deterministic in ``seed``."""
    rng = random.Random(seed)
    for index in range(count):
        yield make_example(tasks[index % len(tasks)], rng)


def split_corpus(train_count: int, eval_count: int, seed: int) -> tuple[list[Example], list[Example]]:
    """Training examples and held-out evaluation examples whose prompts never occur in training."""
    train = list(examples(train_count, seed))
    seen = {example.prompt for example in train}
    held_out: list[Example] = []
    for example in examples(eval_count * 4, seed + 1_000_003):
        if example.prompt not in seen and len(held_out) < eval_count:
            held_out.append(example)
            seen.add(example.prompt)
    return train, held_out


def write_jsonl(path: Path, items: list[Example]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as handle:
        for example in items:
            handle.write(json.dumps({"text": example.text, "task": example.task, "prompt": example.prompt,
                                     "answer": example.answer}) + "\n")
    return path


def read_jsonl(path: Path) -> list[Example]:
    with path.open() as handle:
        return [Example(r["task"], r["prompt"], r["answer"]) for r in map(json.loads, handle)]
