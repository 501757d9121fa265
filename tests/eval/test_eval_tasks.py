"""Task specs: demo held-out examples, JSON-lines files, perplexity texts, and clear errors."""

from __future__ import annotations

import json

import pytest

from ar2dlm.data.synthetic import split_corpus
from ar2dlm.errors import UserError
from ar2dlm.eval.tasks import (
    DEMO_EVAL_EXAMPLES,
    DEMO_TRAIN_EXAMPLES,
    load_task,
    load_tasks,
    load_texts,
    parse_demo_options,
)


def test_demo_is_the_held_out_split():
    train, held_out = split_corpus(DEMO_TRAIN_EXAMPLES, 10, 7)
    examples = load_task("demo:10", seed=7)
    assert examples == held_out
    assert not {e.prompt for e in examples} & {e.prompt for e in train}
    assert all(e.prompt.endswith(" =") and e.answer.startswith(" ") for e in examples)


def test_demo_options_limit_and_prefix_stability():
    assert parse_demo_options("", seed=3) == {"n": DEMO_EVAL_EXAMPLES, "train": DEMO_TRAIN_EXAMPLES, "seed": 3}
    assert parse_demo_options("n=5,train=10,seed=1", seed=3) == {"n": 5, "train": 10, "seed": 1}
    five = load_task("demo:n=5,train=50,seed=1", seed=3)
    assert five == split_corpus(50, 5, 1)[1]
    assert load_task("demo:n=8,train=50,seed=1", seed=3)[:5] == five
    assert load_task("demo:n=8,train=50,seed=1", seed=3, limit=5) == five
    assert len(load_tasks(["demo:3", "demo:2"], seed=0)) == 5


def test_demo_default_holds_out_against_what_the_demo_recipe_trains_on():
    from ar2dlm.config import compose_stage

    demo = compose_stage("run", ["recipe=demo"], require_complete=False)
    train, _ = split_corpus(demo.demo.train_examples, 0, demo.seed)
    seen = {example.prompt for example in train}
    # 3000 prompts: held out against 2,000 training examples only, five of them are among the demo's 20,000
    held_out = load_task("demo:3000", seed=demo.seed)
    assert len(held_out) == 3000 and not [e.prompt for e in held_out if e.prompt in seen]


def test_demo_recipe_evaluates_at_least_500_unseen_prompts_and_eval_defaults_to_them():
    from ar2dlm.config import compose_stage

    demo = compose_stage("run", ["recipe=demo"], require_complete=False)
    assert demo.demo.eval_examples >= 500 and demo.demo.eval_examples == DEMO_EVAL_EXAMPLES
    assert demo.demo.train_examples == DEMO_TRAIN_EXAMPLES
    train, held_out = split_corpus(demo.demo.train_examples, demo.demo.eval_examples, demo.seed)
    prompts = [example.prompt for example in held_out]
    assert len(prompts) == len(set(prompts)) == demo.demo.eval_examples
    assert not set(prompts) & {example.prompt for example in train}
    assert load_task("demo", seed=demo.seed) == held_out  # `ar2dlm eval tasks=[demo]` scores the run's prompts
    assert {example.task for example in held_out} == {"copy", "reverse", "sort", "add", "recall"}
    assert held_out[:100] == split_corpus(demo.demo.train_examples, 100, demo.seed)[1]  # the old 100 come first


def test_jsonl_task(tmp_path):
    path = tmp_path / "arith.jsonl"
    records = [{"prompt": "1 + 1 =", "answer": " 2"}, {"prompt": "2 + 2 =", "answer": "4", "task": "add"}]
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n\n")
    examples = load_task(f"jsonl:{path}", seed=0)
    assert [(e.task, e.prompt, e.answer) for e in examples] == [("arith", "1 + 1 =", " 2"), ("add", "2 + 2 =", "4")]
    assert len(load_task(f"jsonl:{path}", seed=0, limit=1)) == 1


def test_perplexity_texts(tmp_path):
    text = tmp_path / "held.txt"
    text.write_text("first line\n\nsecond line\n")
    assert load_texts(f"text:{text}") == ["first line", "second line"]
    jsonl = tmp_path / "held.jsonl"
    jsonl.write_text(json.dumps({"text": "a b"}) + "\n" + json.dumps({"prompt": "c =", "answer": " d"}) + "\n")
    assert load_texts(f"jsonl:{jsonl}") == ["a b", "c = d"]


@pytest.mark.parametrize("spec, message", [
    ("", "empty task spec"),
    ("gsm8k", "unknown task spec"),
    ("demo:abc", "not an integer"),
    ("demo:0", "n >= 1"),
    ("demo:n=3,size=4", "bad demo task option"),
    ("jsonl:", "needs a path"),
    ("jsonl:/nonexistent/file.jsonl", "does not exist"),
])
def test_bad_task_specs(spec, message):
    with pytest.raises(UserError, match=message):
        load_task(spec, seed=0)


@pytest.mark.parametrize("lines, message", [
    (["{not json"], r":1: not valid JSON"),
    (['{"prompt": "a"}'], r":1: field 'answer' is missing"),
    (['{"prompt": "a", "answer": "b"}', "[1, 2]"], r":2: expected a JSON object"),
    (['{"prompt": "", "answer": "b"}'], "empty prompt"),
    ([], "has no records"),
])
def test_bad_jsonl_files(tmp_path, lines, message):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines))
    with pytest.raises(UserError, match=message):
        load_task(f"jsonl:{path}", seed=0)


def test_bad_task_lists_and_texts(tmp_path):
    with pytest.raises(UserError, match="tasks is empty"):
        load_tasks([], seed=0)
    with pytest.raises(UserError, match="limit=0"):
        load_tasks(["demo"], seed=0, limit=0)
    with pytest.raises(UserError, match="bad perplexity_texts"):
        load_texts("held.txt")
    with pytest.raises(UserError, match="needs a string 'text'"):
        path = tmp_path / "t.jsonl"
        path.write_text('{"title": "x"}\n')
        load_texts(f"jsonl:{path}")
