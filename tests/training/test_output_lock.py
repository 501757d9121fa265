"""One writer per output folder: a second `ar2dlm train` on a folder in use exits 2 with one line and writes
nothing; a dead holder's lock is reclaimed with a message; the lock is released when the run ends."""

import errno
import fcntl
import json
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from ar2dlm.cli import main
from ar2dlm.conversion.convert import convert
from ar2dlm.data.synthetic import examples, write_jsonl
from ar2dlm.errors import UserError
from ar2dlm.log import logger
from ar2dlm.training import loop
from ar2dlm.training.output_lock import LOCK_FILE, output_lock

# holds the lock of argv[1] until killed (or for argv[2] seconds); exits 2 if it cannot take it
HOLDER = """
import sys, time
from ar2dlm.errors import UserError
from ar2dlm.training.output_lock import output_lock
try:
    with output_lock(sys.argv[1]):
        print("locked", flush=True)
        time.sleep(float(sys.argv[2]))
except UserError as error:
    print(error, flush=True)
    sys.exit(2)
"""


def _holder_command(output: Path, seconds: float) -> dict:
    return {"args": [sys.executable, "-c", HOLDER, str(output), str(seconds)], "text": True,
            "env": {k: v for k, v in os.environ.items() if k != "RANK"}}  # a rank-0 process


def _holder(output: Path, seconds: float = 120) -> subprocess.Popen:
    process = subprocess.Popen(**_holder_command(output, seconds), stdout=subprocess.PIPE)
    assert process.stdout.readline().strip() == "locked"
    return process


def _kill(process: subprocess.Popen) -> None:
    process.kill()
    process.wait()


def _tree(folder: Path) -> dict:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


@pytest.fixture
def train_args(make_tiny_hf, tmp_path, megatron_ready):
    source = make_tiny_hf("Qwen3ForCausalLM", tied=True)
    convert(source, tmp_path / "converted")
    corpus = write_jsonl(tmp_path / "corpus.jsonl", list(examples(40, seed=0)))
    return ["train", f"init={tmp_path / 'converted'}", "recipe=tiny", f"data.sources=[{{path: {corpus}}}]",
            "data.seq_length=32", "diffusion.block_size=8", "train.global_batch_size=2",
            "train.micro_batch_size=2", "train.steps=1", "logging.level=WARNING"]


@pytest.fixture
def ar2dlm_logs(caplog):
    logger.addHandler(caplog.handler)
    with caplog.at_level(logging.WARNING, logger="ar2dlm"):
        yield caplog
    logger.removeHandler(caplog.handler)


def test_second_run_exits_2_with_one_line_and_writes_nothing(train_args, tmp_path, capsys):
    output = tmp_path / "run"
    holder = _holder(output)
    try:
        before = _tree(output)
        assert main([*train_args, f"output={output}"]) == 2
        after = _tree(output)
    finally:
        _kill(holder)
    error = capsys.readouterr().err.strip()
    assert "\n" not in error
    assert error.startswith(f"ar2dlm train: error: output {output} is in use by another run "
                            f"(pid {holder.pid} on ")
    assert "choose another output" in error
    assert after == before and list(before) == [LOCK_FILE]


def test_lock_is_held_during_the_run_and_released_after_it(train_args, tmp_path, monkeypatch, ar2dlm_logs):
    output = tmp_path / "run"
    real_fit, seen = loop.Trainer.fit, {}

    def fit_while_probing(self):
        probe = subprocess.run(**_holder_command(output, 0), capture_output=True)
        seen["probe"] = probe.returncode, probe.stdout
        return real_fit(self)

    monkeypatch.setattr(loop.Trainer, "fit", fit_while_probing)
    assert main([*train_args, f"output={output}"]) == 0
    code, message = seen["probe"]
    assert code == 2 and f"is in use by another run (pid {os.getpid()} on " in message
    assert not (output / LOCK_FILE).exists() and (output / "checkpoints").is_dir()
    assert "reclaimed" not in ar2dlm_logs.text
    _kill(_holder(output))  # another process can take it now


def test_lock_of_a_killed_holder_is_reclaimed_with_a_message(tmp_path, ar2dlm_logs):
    output = tmp_path / "run"
    holder = _holder(output)
    _kill(holder)  # kill -9: its lock file stays, naming it
    assert json.loads((output / LOCK_FILE).read_text())["pid"] == holder.pid
    with output_lock(output):
        assert json.loads((output / LOCK_FILE).read_text())["pid"] == os.getpid()
    reclaimed = f"{output}: reclaimed the lock of a run that is no longer running (pid {holder.pid} on "
    assert reclaimed in ar2dlm_logs.text
    assert not (output / LOCK_FILE).exists()


def test_nested_use_in_one_process_does_not_deadlock(tmp_path):
    with output_lock(tmp_path / "run"):
        with output_lock(tmp_path / "run"):
            assert (tmp_path / "run" / LOCK_FILE).exists()
        assert (tmp_path / "run" / LOCK_FILE).exists()
    assert not (tmp_path / "run").exists()  # the lock created the folder and leaves none behind


def test_other_ranks_take_no_lock(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    with output_lock(tmp_path / "run"):
        assert not (tmp_path / "run").exists()


def test_without_flock_the_lock_file_is_the_lock(tmp_path, monkeypatch, ar2dlm_logs):
    def no_flock(fd, operation):
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    output = tmp_path / "run"
    with output_lock(output):
        assert json.loads((output / LOCK_FILE).read_text())["pid"] == os.getpid()
    assert not output.exists()
    assert "does not support flock (ENOSYS)" in ar2dlm_logs.text

    output.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    live = {"host": socket.gethostname(), "pid": os.getppid(), "started": "earlier"}
    (output / LOCK_FILE).write_text(json.dumps({**live, "pid": dead.pid}))
    with output_lock(output):
        pass
    assert f"reclaimed the lock of a run that is no longer running (pid {dead.pid} on " in ar2dlm_logs.text

    (output / LOCK_FILE).write_text(json.dumps(live))
    message = rf"in use by another run \(pid {os.getppid()} on .*; if that run is gone, remove {output}/"
    with pytest.raises(UserError, match=message):
        with output_lock(output):
            pass
    assert json.loads((output / LOCK_FILE).read_text()) == live


def test_a_second_run_on_an_output_in_use_stops_before_deleting_anything(tmp_path, capsys):
    """`ar2dlm run overwrite=true` empties its output only once it holds the lock."""
    output = tmp_path / "demo"
    output.mkdir()
    (output / "report.md").write_text("an earlier run's report\n")
    holder = _holder(output)
    try:
        before = _tree(output)
        assert main(["run", "recipe=demo", f"output={output}", "overwrite=true"]) == 2
        assert "in use" in capsys.readouterr().err
        assert _tree(output) == before
    finally:
        _kill(holder)
