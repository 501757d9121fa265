"""`ar2dlm eval`'s output folder: refused before any decoding when it is a file, holds a report (unless
overwrite=true) or is the model; replaced whole with overwrite=true."""

from __future__ import annotations

import json

import pytest

from ar2dlm.cli import main


def eval_args(model, output, *extra):
    return ["eval", f"model={model}", f"output={output}", "tasks=[demo:2]", "modes=[ar]", "max_new_tokens=4",
            "perplexity=false", "device=cpu", *extra]


@pytest.fixture
def no_decoding(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("decoded although the output was refused")

    monkeypatch.setattr("ar2dlm.eval.run.evaluate_model", fail)


def test_a_file_as_output_is_refused_before_decoding(tiny_export, tmp_path, capsys, no_decoding):
    output = tmp_path / "report.txt"
    output.write_text("mine")
    assert main(eval_args(tiny_export, output)) == 2
    assert capsys.readouterr().err.strip() == f"ar2dlm eval: error: output {output} exists and is not a directory"
    assert output.read_text() == "mine"


def test_the_model_folder_as_output_is_refused(tiny_export, capsys, no_decoding):
    assert main(eval_args(tiny_export, tiny_export, "overwrite=true")) == 2
    assert "is the input" in capsys.readouterr().err


def test_an_existing_report_is_kept_unless_overwrite(tiny_export, tmp_path, capsys):
    output = tmp_path / "eval"
    assert main(eval_args(tiny_export, output)) == 0
    first = json.loads((output / "report.json").read_text())
    (output / "notes.txt").write_text("mine")
    assert main(eval_args(tiny_export, output, "seed=7")) == 2
    assert "exists and is not empty (pass overwrite=true" in capsys.readouterr().err
    assert json.loads((output / "report.json").read_text()) == first
    assert main(eval_args(tiny_export, output, "seed=7", "overwrite=true")) == 0
    assert json.loads((output / "report.json").read_text())["settings"]["seed"] == 7
    assert not (output / "notes.txt").exists()  # the folder is replaced whole, not mixed
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".eval.")]
