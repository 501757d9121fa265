"""convert and export never replace their input, even with overwrite=true, and check before any work."""

from __future__ import annotations

import pytest

from ar2dlm.cli import main
from ar2dlm.conversion.convert import convert
from ar2dlm.conversion.export import export
from ar2dlm.errors import UserError


def tree(folder):
    return sorted((str(p.relative_to(folder)), p.read_bytes() if p.is_file() else None) for p in folder.rglob("*"))


def test_convert_refuses_its_source_as_output(make_tiny_hf, capsys):
    source = make_tiny_hf("LlamaForCausalLM")
    before = tree(source)
    assert main(["convert", f"source={source}", f"output={source}", "overwrite=true"]) == 2
    err = capsys.readouterr().err
    assert "is the input" in err and len(err.strip().splitlines()) == 1
    assert tree(source) == before
    with pytest.raises(UserError, match="holds the input"):
        convert(source, source.parent, overwrite=True)
    assert tree(source) == before


def test_export_refuses_its_checkpoint_as_output(make_tiny_hf, tmp_path, megatron_ready, capsys):
    checkpoint = tmp_path / "converted"
    convert(make_tiny_hf("LlamaForCausalLM"), checkpoint)
    before = tree(checkpoint)
    assert main(["export", f"checkpoint={checkpoint}", f"output={checkpoint}", "overwrite=true"]) == 2
    assert "is the input" in capsys.readouterr().err
    with pytest.raises(UserError, match="is the input"):
        export(checkpoint, checkpoint, overwrite=True)
    assert tree(checkpoint) == before
