"""One rule for every stage's output: a new or empty folder, an existing one only with overwrite=true, and never
the input or a folder that holds it (overwrite or not). Stage-specific tests live next to each stage's tests."""

from __future__ import annotations

import pytest

from ar2dlm.cli import main
from ar2dlm.errors import UserError
from ar2dlm.fs import check_output_dir


def tree(folder):
    return sorted((str(p.relative_to(folder)), p.read_bytes() if p.is_file() else None) for p in folder.rglob("*"))


@pytest.mark.parametrize("output", ["model", ".", "model/../model", "model/"])
def test_output_that_is_or_holds_the_input_is_refused_even_with_overwrite(tmp_path, monkeypatch, output):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "model").mkdir()
    with pytest.raises(UserError, match="the input model: writing it would destroy the input"):
        check_output_dir(output, overwrite=True, inputs=["model"])


def test_output_beside_or_inside_the_input_is_allowed(tmp_path):
    (tmp_path / "model").mkdir()
    check_output_dir(tmp_path / "model-export", overwrite=False, inputs=[tmp_path / "model"])
    check_output_dir(tmp_path / "model" / "eval", overwrite=False, inputs=[tmp_path / "model"])


def test_the_input_reached_through_a_link_is_refused(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "model")
    with pytest.raises(UserError, match="is the input"):
        check_output_dir(tmp_path / "link", overwrite=True, inputs=[tmp_path / "model"])


def test_run_refuses_to_replace_its_source(make_tiny_hf, tmp_path, capsys):
    source = make_tiny_hf("LlamaForCausalLM")
    before = tree(source)
    assert main(["run", "recipe=demo", f"source={source}", f"output={source}", "overwrite=true"]) == 2
    assert "is the input" in capsys.readouterr().err
    assert tree(source) == before
    assert main(["run", "recipe=demo", f"source={source}", f"output={source.parent}", "overwrite=true"]) == 2
    assert "holds the input" in capsys.readouterr().err
    assert tree(source) == before
