"""Evaluation examples (prompt, exact answer, task name) from a task spec, and held-out texts.

Task specs (``ar2dlm eval tasks=[...]``):

- ``demo``: held-out examples of the demo corpus (:func:`ar2dlm.data.synthetic.split_corpus`): prompts
  that never occur among the ``train`` training examples drawn with the same seed. ``demo:N`` takes N
  examples; ``'demo:n=N,train=T,seed=S'`` (quoted on the command line) sets every option. Defaults:
  n = 500, train = 20,000 (what ``ar2dlm run recipe=demo`` evaluates and trains on; held out against it, the prompts
  are also unseen by a run on fewer examples of the same seed), seed = the ``seed`` argument.
- ``jsonl:PATH``: one JSON object per line with string fields ``prompt`` and ``answer`` and an optional
  ``task`` (default: the file's stem).
- ``lm_eval:NAME``: an lm-evaluation-harness task, run by :mod:`ar2dlm.eval.harness`, not here.

Texts for perplexity (``perplexity_texts``): ``jsonl:PATH`` (field ``text``, else prompt + answer) or
``text:PATH`` (one text per non-empty line).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ar2dlm.config.schema import DemoCorpusConfig
from ar2dlm.data.sources import parse_json_object
from ar2dlm.data.synthetic import Example, split_corpus
from ar2dlm.errors import UserError

DEMO_EVAL_EXAMPLES = 500  # what `ar2dlm run recipe=demo` evaluates (demo.eval_examples)
DEMO_TRAIN_EXAMPLES = DemoCorpusConfig.train_examples
_DEMO_KEYS = ("n", "train", "seed")


def parse_demo_options(options: str, seed: int) -> dict[str, int]:
    """``""`` | ``"N"`` | ``"n=N,train=T,seed=S"`` -> {n, train, seed} (UserError when malformed)."""
    values = {"n": DEMO_EVAL_EXAMPLES, "train": DEMO_TRAIN_EXAMPLES, "seed": seed}
    if not options:
        return values
    items = options.split(",")
    if len(items) == 1 and "=" not in items[0]:
        items = [f"n={items[0]}"]
    for item in items:
        key, _, text = item.partition("=")
        key = key.strip()
        if key not in _DEMO_KEYS or not text:
            raise UserError(f"bad demo task option {item!r}: use demo, demo:N or 'demo:n=N,train=T,seed=S'")
        try:
            values[key] = int(text)
        except ValueError:
            raise UserError(f"demo task option {key}={text!r} is not an integer") from None
    if values["n"] < 1 or values["train"] < 0:
        raise UserError(f"demo task needs n >= 1 and train >= 0, got n={values['n']} train={values['train']}")
    return values


def demo_examples(n: int, train: int, seed: int) -> list[Example]:
    """The first ``n`` held-out examples of the demo corpus split (train count ``train``, ``seed``)."""
    _, held_out = split_corpus(train, n, seed)
    if len(held_out) < n:
        raise UserError(f"the demo corpus has only {len(held_out)} held-out examples for n={n} (seed {seed})")
    return held_out


def _read_json_lines(path: Path) -> list[tuple[int, dict]]:
    if not path.is_file():
        raise UserError(f"{path} does not exist or is not a file")
    records = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            records.append((number, parse_json_object(line, f"{path}:{number}")))
    if not records:
        raise UserError(f"{path} has no records")
    return records


def jsonl_examples(path: Path) -> list[Example]:
    """Examples from a JSON-lines file with ``prompt``, ``answer`` and optional ``task`` fields."""
    examples = []
    for number, record in _read_json_lines(path):
        for key in ("prompt", "answer"):
            if not isinstance(record.get(key), str):
                raise UserError(f"{path}:{number}: field {key!r} is missing or not a string")
        if not record["prompt"]:
            raise UserError(f"{path}:{number}: empty prompt")
        task = record.get("task", path.stem)
        examples.append(Example(str(task), record["prompt"], record["answer"]))
    return examples


def _split_spec(spec: str) -> tuple[str, str]:
    if not isinstance(spec, str) or not spec.strip():
        raise UserError(f"empty task spec {spec!r}: use demo, demo:N or jsonl:PATH")
    kind, _, rest = spec.strip().partition(":")
    return kind, rest


def load_task(spec: str, *, seed: int, limit: int | None = None) -> list[Example]:
    """The examples of one task spec (the first ``limit`` of them when given)."""
    kind, rest = _split_spec(spec)
    if kind == "demo":
        options = parse_demo_options(rest, seed)
        if limit is not None:
            options["n"] = min(options["n"], limit)
        return demo_examples(**options)
    if kind == "jsonl":
        if not rest:
            raise UserError("task spec 'jsonl:' needs a path: jsonl:PATH")
        examples = jsonl_examples(Path(rest).expanduser())
        return examples if limit is None else examples[:limit]
    raise UserError(f"unknown task spec {spec!r}: use demo, demo:N, 'demo:n=N,train=T,seed=S', jsonl:PATH "
                    "or lm_eval:TASK")


def check_limit(limit: int | None) -> None:
    if limit is not None and limit < 1:
        raise UserError(f"limit={limit} must be >= 1 (or null for all examples)")


def load_tasks(specs: Sequence[str], *, seed: int, limit: int | None = None) -> list[Example]:
    """The examples of every spec, in order (UserError when there are none or ``limit`` < 1)."""
    check_limit(limit)
    if not specs:
        raise UserError("tasks is empty: give at least one task, e.g. tasks=[demo]")
    examples: list[Example] = []
    for spec in specs:
        examples.extend(load_task(spec, seed=seed, limit=limit))
    return examples


def load_texts(spec: str) -> list[str]:
    """Held-out texts for perplexity from ``jsonl:PATH`` or ``text:PATH``."""
    kind, rest = _split_spec(spec)
    path = Path(rest).expanduser()
    if kind == "text" and rest:
        if not path.is_file():
            raise UserError(f"{path} does not exist or is not a file")
        texts = [line.rstrip("\n") for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    elif kind == "jsonl" and rest:
        texts = []
        for number, record in _read_json_lines(path):
            text = record.get("text")
            if text is None and isinstance(record.get("prompt"), str) and isinstance(record.get("answer"), str):
                text = record["prompt"] + record["answer"]
            if not isinstance(text, str) or not text:
                raise UserError(f"{path}:{number}: needs a string 'text' field (or 'prompt' and 'answer')")
            texts.append(text)
    else:
        raise UserError(f"bad perplexity_texts {spec!r}: use jsonl:PATH or text:PATH")
    if not texts:
        raise UserError(f"{path} has no texts")
    return texts
