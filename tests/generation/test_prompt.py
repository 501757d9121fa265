"""Prompts reach `ar2dlm generate` exactly as typed: prompt=TEXT (no Hydra parsing), prompt_file=PATH or stdin."""

from __future__ import annotations

import io

import pytest

from ar2dlm.cli import main
from ar2dlm.config import compose_stage

ORDINARY_PROMPTS = [
    "Hello, my name is",  # a comma: Hydra read it as a sweep ("Ambiguous value")
    "It's raining",  # an apostrophe: a lexer error
    'She said "stop" = [1, 2] {a: b}',  # quotes, "=", brackets, braces
    "cost: ${price} \\${x} \\",  # what OmegaConf would take for interpolations and escapes
    " leading and trailing spaces ",
]


@pytest.mark.parametrize("prompt", ORDINARY_PROMPTS)
def test_prompt_is_taken_verbatim(prompt):
    cfg = compose_stage("generate", ["model=/m", f"prompt={prompt}"])
    assert cfg.prompt == prompt


def test_the_last_prompt_wins_and_other_keys_still_parse():
    cfg = compose_stage("generate", ["model=/m", "prompt=first", "prompt=second, third", "max_new_tokens=5"])
    assert cfg.prompt == "second, third" and cfg.max_new_tokens == 5


@pytest.mark.parametrize("args, message", [
    (["prompt="], "prompt is empty"),
    ([], "no prompt: give prompt=TEXT"),
    (["prompt=x", "prompt_file=-"], "not both"),
])
def test_missing_or_empty_prompt_is_one_line_and_exit_2(args, message, tmp_path, capsys):
    assert main(["generate", f"model={tmp_path / 'model'}", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err


@pytest.fixture
def export_dir(make_export):
    return make_export("LlamaForCausalLM", name="prompt-export", max_position_embeddings=64)


def generate(export_dir, capsys, *args) -> str:
    assert main(["generate", f"model={export_dir}", "device=cpu", "max_new_tokens=4", "mode=ar", *args]) == 0
    return capsys.readouterr().out


def test_prompt_file_and_stdin_give_what_prompt_gives(export_dir, tmp_path, capsys, monkeypatch):
    text = "It's a test, isn't it"
    expected = generate(export_dir, capsys, f"prompt={text}").splitlines()[0]
    path = tmp_path / "prompt.txt"
    path.write_text(text + "\n")  # the file's final line break is not part of the prompt
    assert generate(export_dir, capsys, f"prompt_file={path}").splitlines()[0] == expected
    monkeypatch.setattr("sys.stdin", io.StringIO(text + "\n"))
    assert generate(export_dir, capsys, "prompt_file=-").splitlines()[0] == expected


@pytest.mark.parametrize("content, message", [
    (None, "does not exist"),
    (b"", "is empty"),
    (b"\n", "is empty"),
    (b"\xff\xfe bad", "is not UTF-8 text"),
])
def test_bad_prompt_files_are_one_line_and_exit_2(content, message, tmp_path, capsys):
    path = tmp_path / "prompt.txt"
    if content is not None:
        path.write_bytes(content)
    assert main(["generate", f"model={tmp_path / 'model'}", f"prompt_file={path}"]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
