"""Metric rows: whole lines only, cut back on a failed write, truncated to the resumed step."""

import errno
import json
import os

import pytest

from ar2dlm.errors import UserError
from ar2dlm.training import metrics_file
from ar2dlm.training.metrics_file import append_record, truncate_after_step


def _steps(path):
    return [json.loads(line)["step"] for line in path.read_text().splitlines()]


def test_rows_after_the_resumed_step_and_a_torn_line_are_dropped(tmp_path):
    path = tmp_path / "metrics.jsonl"
    for step in (1, 2, 3, 4, 5):
        append_record(path, {"step": step, "loss": 1.0 / step})
    with path.open("a") as handle:
        handle.write('{"step": 6, "lo')
    truncate_after_step(path, 3)
    assert _steps(path) == [1, 2, 3]
    append_record(path, {"step": 4, "loss": 0.2})
    assert _steps(path) == [1, 2, 3, 4]


def test_truncating_a_missing_file_or_to_a_later_step_changes_nothing(tmp_path):
    truncate_after_step(tmp_path / "absent.jsonl", 3)
    assert not (tmp_path / "absent.jsonl").exists()
    path = tmp_path / "metrics.jsonl"
    append_record(path, {"step": 1})
    before = path.stat().st_mtime_ns
    truncate_after_step(path, 9)
    assert path.stat().st_mtime_ns == before and _steps(path) == [1]


def test_a_write_that_fails_on_a_full_disk_is_cut_back_and_named(tmp_path, monkeypatch):
    path = tmp_path / "metrics.jsonl"
    append_record(path, {"step": 1})
    real_write = os.write

    def half_then_full(fd, data):
        real_write(fd, data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(metrics_file.os, "write", half_then_full)
    with pytest.raises(UserError, match="no space left on device: cannot append .* to .*metrics.jsonl"):
        append_record(path, {"step": 2, "loss": 0.5})
    monkeypatch.undo()
    assert path.read_text() == '{"step": 1}\n'
