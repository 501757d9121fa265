"""`ar2dlm train` writes into a new or empty folder or its own run folder, never into other content or its init."""

from __future__ import annotations

import pytest

from ar2dlm.cli import main
from ar2dlm.errors import UserError
from ar2dlm.training.output_lock import LOCK_FILE


def test_a_folder_with_other_content_is_refused_before_any_work(tmp_path, capsys, monkeypatch):
    output = tmp_path / "notes"
    output.mkdir()
    (output / "thesis.tex").write_text("mine")
    monkeypatch.setattr("ar2dlm.data.build.check_sources", lambda data: pytest.fail("reached the data check"),
                        raising=False)
    assert main(["train", f"init={tmp_path / 'init'}", f"output={output}"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == (f"ar2dlm train: error: output {output} is not empty and is not a training run (it has "
                           "no checkpoints/ and no metrics.jsonl): choose a new or empty folder")
    assert sorted(p.name for p in output.iterdir()) == ["thesis.tex"]  # not even the lock file


@pytest.mark.parametrize("content", [[], [LOCK_FILE], ["checkpoints/"], ["metrics.jsonl"]])
def test_empty_folders_and_runs_are_accepted(tmp_path, content):
    from ar2dlm.training.run_output import check_train_output

    output = tmp_path / "run"
    output.mkdir()
    for name in content:
        (output / name.rstrip("/")).mkdir() if name.endswith("/") else (output / name).write_text("")
    assert check_train_output(output, tmp_path / "init", resume=False) == output
    assert check_train_output(tmp_path / "new", tmp_path / "init", resume=False) == tmp_path / "new"


def test_output_that_is_or_holds_init_is_refused(tmp_path):
    from ar2dlm.training.run_output import check_train_output

    init = tmp_path / "converted"
    init.mkdir()
    (init / "ar2dlm.json").write_text("{}")
    with pytest.raises(UserError, match="is the input"):
        check_train_output(init, init, resume=True)
    with pytest.raises(UserError, match="holds the input"):
        check_train_output(tmp_path, init, resume=False)


def test_a_file_as_output_is_refused(tmp_path):
    from ar2dlm.training.run_output import check_train_output

    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="exists and is not a directory"):
        check_train_output(tmp_path / "file", tmp_path / "init", resume=False)
