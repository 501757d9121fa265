"""`ar2dlm data continue`: the export's own greedy AR continuations, written as JSONL that trains as it is."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ar2dlm.cli import main
from ar2dlm.config.schema import DataSourceConfig
from ar2dlm.data.continuations import write_continuations
from ar2dlm.data.sources import ReadStats, iter_records
from ar2dlm.errors import UserError
from ar2dlm.generation.loading import load_export
from ar2dlm.runtime.modeling_ar2dlm import eos_token_ids

# different lengths, so that a batch of them is left-padded
PROMPTS = ["the quick brown fox jumps over the lazy dog", "0 1 2", "reverse sort copy 4 5 6 7 = 8", "the lazy"]
NEW = 6


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory, export_tiny, tiny_tokenizer) -> Path:
    return export_tiny("LlamaForCausalLM", tmp_path_factory.mktemp("continue") / "export", tiny_tokenizer,
                       max_position_embeddings=32)


@pytest.fixture(scope="module")
def loaded(export_dir):
    return load_export(export_dir, torch.device("cpu"))


@pytest.fixture
def prompts_file(tmp_path):
    def write(prompts: list[str], name: str = "prompts.jsonl") -> Path:
        path = tmp_path / name
        path.write_text("".join(json.dumps({"prompt": p, "id": i}) + "\n" for i, p in enumerate(prompts)))
        return path

    return write


def continue_cli(export_dir, source: Path, output: Path, *extra: str) -> int:
    return main(["data", "continue", f"model={export_dir}", f"source.path={source}", "source.text_field=prompt",
                 f"output={output}", f"max_new_tokens={NEW}", "batch_size=3", "device=cpu", *extra])


def read_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def alone(model, tokenizer, prompt: str) -> str:
    """The prompt's greedy continuation from a direct, unbatched ``ar_generate`` call."""
    ids = tokenizer(prompt)["input_ids"]
    sequences, stats = model.ar_generate(torch.tensor([ids]), max_new_tokens=NEW, return_stats=True)
    new = sequences[0, len(ids):len(ids) + stats.new_tokens[0]].tolist()
    new = new[:-1] if new and new[-1] in set(eos_token_ids(model)) else new
    return tokenizer.decode(new, skip_special_tokens=True)


def test_continuations_are_the_models_own_greedy_tokens(export_dir, loaded, prompts_file, tmp_path, capsys):
    tokenizer, model = loaded
    output = tmp_path / "out" / "continuations.jsonl"
    assert continue_cli(export_dir, prompts_file(PROMPTS), output) == 0
    rows = read_lines(output)
    expected = [alone(model, tokenizer, prompt) for prompt in PROMPTS]
    assert any(expected), "the tiny model must continue some prompt for this test to mean anything"
    assert [row["prompt"] for row in rows] == PROMPTS
    assert [row["continuation"] for row in rows] == expected
    assert [row["text"] for row in rows] == [p + c for p, c in zip(PROMPTS, expected, strict=True)]
    summary = capsys.readouterr().out.strip().splitlines()[-1]
    assert summary.startswith(f"continued {len(PROMPTS)} prompts, ") and summary.endswith(f"-> {output}")
    assert [p.name for p in output.parent.iterdir()] == ["continuations.jsonl"]  # no partial file left


def test_the_output_trains_as_a_text_source(export_dir, prompts_file, tmp_path):
    output = tmp_path / "continuations.jsonl"
    assert continue_cli(export_dir, prompts_file(PROMPTS), output) == 0
    records = list(iter_records(DataSourceConfig(path=str(output)), sft=False, strict=True, stats=ReadStats()))
    assert [r.value for r in records] == [row["text"] for row in read_lines(output)]
    assert all(r.value.startswith(p) for r, p in zip(records, PROMPTS, strict=True))


def test_limit_takes_the_first_prompts(export_dir, prompts_file, tmp_path):
    output = tmp_path / "continuations.jsonl"
    assert continue_cli(export_dir, prompts_file(PROMPTS), output, "limit=2") == 0
    assert [row["prompt"] for row in read_lines(output)] == PROMPTS[:2]


def test_an_existing_output_is_refused_and_left_unchanged(export_dir, prompts_file, tmp_path, capsys):
    output = tmp_path / "continuations.jsonl"
    output.write_bytes(b"precious\n")
    assert continue_cli(export_dir, prompts_file(PROMPTS), output) == 2
    assert "exists (pass overwrite=true" in capsys.readouterr().err
    assert output.read_bytes() == b"precious\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["continuations.jsonl", "prompts.jsonl"]
    assert continue_cli(export_dir, prompts_file(PROMPTS), output, "overwrite=true", "limit=1") == 0
    assert [row["prompt"] for row in read_lines(output)] == PROMPTS[:1]


def test_the_source_itself_is_never_the_output(export_dir, prompts_file, capsys):
    source = prompts_file(PROMPTS)
    before = source.read_bytes()
    assert continue_cli(export_dir, source, source, "overwrite=true") == 2
    assert "would destroy the input" in capsys.readouterr().err
    assert source.read_bytes() == before


def test_an_empty_source_is_one_error_with_nothing_written(export_dir, prompts_file, tmp_path, capsys):
    output = tmp_path / "continuations.jsonl"
    assert continue_cli(export_dir, prompts_file([]), output) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "has no prompts" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prompts.jsonl"]


def test_a_prompt_too_long_for_the_context_is_one_error_with_nothing_written(export_dir, prompts_file, tmp_path,
                                                                            capsys):
    output = tmp_path / "continuations.jsonl"
    long_prompt = " ".join(["the quick brown fox"] * 10)  # > 32 - NEW tokens
    assert continue_cli(export_dir, prompts_file(["the lazy dog", long_prompt]), output) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "exceeds the context window (32)" in err and "the quick brown fox" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prompts.jsonl"]


def test_a_failure_while_decoding_leaves_no_partial_file(loaded, tmp_path, monkeypatch):
    tokenizer, model = loaded
    output = tmp_path / "continuations.jsonl"
    output.write_text("old\n")
    calls = []

    def fail_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise UserError("stop")
        return original(*args, **kwargs)

    import ar2dlm.data.continuations as continuations

    original = continuations.decode_batch
    monkeypatch.setattr(continuations, "decode_batch", fail_second)
    with pytest.raises(UserError, match="stop"):
        write_continuations(model, tokenizer, PROMPTS, output, max_new_tokens=NEW, batch_size=2, context=32)
    assert output.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["continuations.jsonl"]
