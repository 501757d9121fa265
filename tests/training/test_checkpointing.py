"""Training checkpoints a cluster job can trust: requeued runs finish, damage is found, full disks, signals,
diverged weights and power loss are handled (issue 14's crash tests, in-process)."""

import errno
import json
import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
import torch

from ar2dlm.conversion.export import export
from ar2dlm.errors import UserError
from ar2dlm.model.manifest import DamagedCheckpointError
from ar2dlm.training import checkpointing
from ar2dlm.training.loop import Trainer, TrainingDivergedError
from ar2dlm.training.stop_signals import TrainingStopped

SCHEDULE = ("optim.schedule=cosine", "optim.min_lr=1e-4")  # the learning rate changes every step


def _losses(history):
    return [round(h["loss"], 12) for h in history]


def _recorded(output: Path, name="metrics.jsonl"):
    return [json.loads(line) for line in (output / name).read_text().splitlines()]


def _checkpoints(output: Path):
    return sorted(p.name for p in (output / "checkpoints").glob("step_*"))


def test_requeued_run_saves_past_pruning_and_matches_the_uninterrupted_run(run_setup, tmp_path, kill_at):
    """Three kills (a Slurm requeue loop); the second segment saves three times after its resume, which pruned
    the checkpoint it resumed from (the hf/ folder every save used to copy from there)."""
    cfg, output = run_setup
    common = ("train.steps=14", "checkpoint.save_interval=2", "checkpoint.keep_last=2", *SCHEDULE)
    reference = Trainer(cfg(*common, f"output={tmp_path / 'reference'}")).fit()

    kill_at(5)
    with pytest.raises(KeyboardInterrupt):
        Trainer(cfg(*common)).fit()
    resumed = []
    for kill in (11, 13, None):
        if kill is None:
            kill_at(-1)
            resumed += Trainer(cfg(*common, "resume=true")).fit()
        else:
            kill_at(kill)
            trainer = Trainer(cfg(*common, "resume=true"))
            with pytest.raises(KeyboardInterrupt):
                trainer.fit()
    assert _checkpoints(output) == ["step_0000012", "step_0000014"]
    assert [h["step"] for h in resumed] == [13, 14]
    recorded = _recorded(output)
    assert [r["step"] for r in recorded] == list(range(1, 15))
    assert [round(r["loss"], 12) for r in recorded] == _losses(reference)


@pytest.fixture
def two_checkpoints(run_setup, tmp_path):
    """A run with checkpoints at steps 2 and 4; ``damaged(fn)`` copies it and applies ``fn`` to step 4."""
    cfg, output = run_setup
    Trainer(cfg("train.steps=4", "checkpoint.save_interval=2")).fit()

    def damaged(apply, name):
        copy = tmp_path / name
        shutil.copytree(output, copy)
        apply(copy / "checkpoints" / "step_0000004")
        return copy

    return cfg, damaged


def _flip_bytes(path: Path, count: int = 16) -> None:
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + count] = bytes(b ^ 0xFF for b in data[middle:middle + count])
    path.write_bytes(bytes(data))


def _largest_weight_file(checkpoint: Path) -> Path:
    return max((checkpoint / "weights").glob("*.distcp"), key=lambda p: p.stat().st_size)


DAMAGE = {
    "missing trainer state": (lambda c: (c / "trainer_state.json").unlink(), "trainer_state.json is missing"),
    "broken trainer state": (lambda c: (c / "trainer_state.json").write_text('{"step": 4,'),
                             "trainer_state.json cannot be parsed"),
    "flipped weight bytes": (lambda c: _flip_bytes(_largest_weight_file(c)), r"content of weights/.*\.distcp differs"),
    "truncated metadata": (lambda c: (c / "weights" / ".metadata").write_bytes(
        (c / "weights" / ".metadata").read_bytes()[:100]), r"weights/\.metadata has 100 bytes"),
    "missing manifest entry file": (lambda c: (c / "hf" / "config.json").unlink(), "hf/config.json is missing"),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_newest_checkpoint_is_one_clear_error_and_is_kept(two_checkpoints, damage):
    cfg, damaged = two_checkpoints
    apply, message = DAMAGE[damage]
    output = damaged(apply, damage.replace(" ", "_"))
    with pytest.raises(DamagedCheckpointError, match=message) as raised:
        Trainer(cfg(f"output={output}", "train.steps=6", "resume=true"))
    assert "step_0000004" in str(raised.value) and "resume from step_0000002" in str(raised.value)
    assert _checkpoints(output) == ["step_0000002", "step_0000004"]


def test_export_and_init_refuse_a_damaged_checkpoint(two_checkpoints, tmp_path):
    cfg, damaged = two_checkpoints
    output = damaged(lambda c: _flip_bytes(_largest_weight_file(c)), "flipped")
    checkpoint = output / "checkpoints" / "step_0000004"
    with pytest.raises(DamagedCheckpointError, match=r"content of weights/.*\.distcp differs"):
        export(checkpoint, tmp_path / "exported")
    assert not (tmp_path / "exported").exists()
    with pytest.raises(DamagedCheckpointError, match=r"content of weights/.*\.distcp differs"):
        Trainer(cfg(f"init={checkpoint}", f"output={tmp_path / 'from_damaged'}", "train.steps=6"))


def _no_space_save(state, directory, **kwargs):
    """dist_checkpointing.save on a full disk: part of a file, then torch's wrapped ENOSPC."""
    from torch.distributed.checkpoint.api import CheckpointException

    Path(directory, "__0_0.distcp").write_bytes(b"x" * 1000)
    raise CheckpointException("save failed", {0: (OSError(errno.ENOSPC, "No space left on device"), None)})


def test_a_full_disk_is_named_leaves_no_staging_and_resume_repairs_metrics(run_setup, monkeypatch):
    from megatron.core import dist_checkpointing

    cfg, output = run_setup
    Trainer(cfg("train.steps=2", "checkpoint.save_interval=2")).fit()
    monkeypatch.setattr(dist_checkpointing, "save", _no_space_save)
    with pytest.raises(UserError, match="no space left on device: the checkpoint .*step_0000004 needs about"):
        Trainer(cfg("train.steps=6", "checkpoint.save_interval=2", "resume=true")).fit()
    monkeypatch.undo()
    assert not list((output / "checkpoints").glob(".*partial"))
    assert (output / "checkpoints" / "latest").read_text().strip() == "step_0000002"
    with (output / "metrics.jsonl").open("a") as handle:
        handle.write('{"step": 5, "lo')  # a line torn by the full disk
    history = Trainer(cfg("train.steps=4", "checkpoint.save_interval=2", "resume=true")).fit()
    assert [h["step"] for h in history] == [3, 4]
    assert [r["step"] for r in _recorded(output)] == [1, 2, 3, 4]


def _mount_small_tmpfs(directory: Path, size: int) -> bool:
    directory.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(directory)],
                             capture_output=True).returncode == 0
    return mounted


def test_a_small_filesystem_refuses_the_save_that_does_not_fit(run_setup, tmp_path, monkeypatch):
    """A real small filesystem (tmpfs, where this machine may mount one; else a disk_usage that reports it)."""
    cfg, probe = run_setup
    Trainer(cfg("train.steps=1", "checkpoint.save_interval=1", f"output={tmp_path / 'probe'}")).fit()
    size = sum(p.stat().st_size for p in (tmp_path / "probe" / "checkpoints").rglob("*") if p.is_file())
    disk = tmp_path / "disk"
    mounted = _mount_small_tmpfs(disk, int(size * 1.6) + 65536)
    if not mounted:
        real_usage = shutil.disk_usage
        monkeypatch.setattr(checkpointing.shutil, "disk_usage",
                            lambda p: real_usage(p)._replace(free=int(size * 0.6)) if Path(p).is_relative_to(disk)
                            else real_usage(p))
    try:
        output = disk / "run"
        with pytest.raises(UserError, match="no space left on device"):
            Trainer(cfg(f"output={output}", "train.steps=4", "checkpoint.save_interval=2")).fit()
        assert _checkpoints(output) == ([] if not mounted else ["step_0000002"])
        assert not list((output / "checkpoints").glob(".*partial"))
    finally:
        if mounted:
            subprocess.run(["umount", str(disk)], check=True)


def _signal_during(monkeypatch, target, attribute, signum, times=1):
    real = getattr(target, attribute)

    def wrapped(*args, **kwargs):
        for _ in range(times):
            os.kill(os.getpid(), signum)
        return real(*args, **kwargs)

    monkeypatch.setattr(target, attribute, wrapped)
    return real


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1, signal.SIGINT])
def test_a_stop_signal_mid_step_finishes_the_step_saves_and_resumes_exactly(run_setup, tmp_path, monkeypatch,
                                                                           signum):
    cfg, output = run_setup
    common = ("train.steps=5", "checkpoint.save_interval=0", *SCHEDULE)
    reference = Trainer(cfg(*common, f"output={tmp_path / 'reference'}")).fit()
    real_step = Trainer._train_step

    def signalled_at_three(self, step):
        if step == 3:
            os.kill(os.getpid(), signum)
        return real_step(self, step)

    monkeypatch.setattr(Trainer, "_train_step", signalled_at_three)
    handler_before = signal.getsignal(signum)
    with pytest.raises(TrainingStopped, match=f"stopped by {signal.Signals(signum).name} after step 3") as raised:
        Trainer(cfg(*common)).fit()
    assert raised.value.exit_code == 128 + signum
    assert signal.getsignal(signum) == handler_before and _checkpoints(output) == ["step_0000003"]
    monkeypatch.setattr(Trainer, "_train_step", real_step)
    resumed = Trainer(cfg(*common, "resume=true")).fit()
    assert _losses(resumed) == _losses(reference[3:])


def test_sigterm_during_a_save_lets_it_complete(run_setup, monkeypatch):
    from megatron.core import dist_checkpointing

    cfg, output = run_setup
    _signal_during(monkeypatch, dist_checkpointing, "save", signal.SIGTERM)
    with pytest.raises(TrainingStopped, match="after step 2"):
        Trainer(cfg("train.steps=6", "checkpoint.save_interval=2")).fit()
    monkeypatch.undo()
    assert _checkpoints(output) == ["step_0000002"] and not list((output / "checkpoints").glob(".*partial"))
    assert Trainer(cfg("train.steps=6", "resume=true")).step == 2  # verifies against the manifest


def test_a_second_sigint_interrupts_the_save_and_the_next_start_cleans_up(run_setup, monkeypatch):
    from megatron.core import dist_checkpointing

    cfg, output = run_setup
    Trainer(cfg("train.steps=2", "checkpoint.save_interval=2")).fit()
    _signal_during(monkeypatch, dist_checkpointing, "save", signal.SIGINT, times=2)
    monkeypatch.setattr(checkpointing.shutil, "rmtree", lambda *a, **k: None)  # as if killed before cleanup
    with pytest.raises(KeyboardInterrupt):
        Trainer(cfg("train.steps=6", "checkpoint.save_interval=2", "resume=true")).fit()
    monkeypatch.undo()
    assert list((output / "checkpoints").glob(".*partial"))
    trainer = Trainer(cfg("train.steps=6", "checkpoint.save_interval=2", "resume=true"))
    assert trainer.step == 2 and not list((output / "checkpoints").glob(".*partial"))


def test_diverged_weights_are_never_saved_and_the_error_names_the_last_finite_checkpoint(run_setup, monkeypatch):
    cfg, output = run_setup
    real_step = Trainer._train_step

    def diverging(self, step):
        metrics = real_step(self, step)
        if step == 3:
            with torch.no_grad():
                next(self.unwrapped_model[0].parameters()).view(-1)[0] = float("inf")
        return metrics

    monkeypatch.setattr(Trainer, "_train_step", diverging)
    with pytest.raises(TrainingDivergedError, match="weights are not finite after step 3.*step_0000002") as raised:
        Trainer(cfg("train.steps=6", "checkpoint.save_interval=1")).fit()
    assert raised.value.exit_code == 3
    assert _checkpoints(output) == ["step_0000001", "step_0000002"]
    assert (output / "checkpoints" / "latest").read_text().strip() == "step_0000002"


def test_every_file_is_flushed_before_the_renames_that_commit_a_checkpoint(run_setup, monkeypatch):
    cfg, output = run_setup
    events = []
    real_fsync, real_rename = os.fsync, Path.rename

    def recording_fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def recording_rename(self, target):
        events.append(("rename", str(self), str(target)))
        return real_rename(self, target)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    monkeypatch.setattr(Path, "rename", recording_rename)
    Trainer(cfg("train.steps=1", "checkpoint.save_interval=1")).fit()
    monkeypatch.undo()
    commit = next(i for i, e in enumerate(events) if e[0] == "rename" and e[2].endswith("step_0000001"))
    flushed_before = {e[1] for e in events[:commit] if e[0] == "fsync"}
    output = Path(os.path.realpath(output))
    final = output / "checkpoints" / "step_0000001"
    staging = output / "checkpoints" / ".step_0000001.partial"
    expected = {str(staging / p.relative_to(final)) for p in final.rglob("*")} | {str(staging)}
    assert expected <= flushed_before
    assert str(output / "checkpoints") in {e[1] for e in events[commit:] if e[0] == "fsync"}  # the rename itself


def test_resume_restores_the_random_state_the_run_had_at_its_checkpoint(run_setup):
    cfg, _ = run_setup
    Trainer(cfg("train.steps=2", "checkpoint.save_interval=2")).fit()
    expected = torch.rand(8)  # what the run would have drawn next
    torch.manual_seed(12345)
    Trainer(cfg("train.steps=4", "resume=true"))  # building the model draws from the generator too
    assert torch.equal(torch.rand(8), expected)


@pytest.mark.parametrize("keep_last", [1, 3])
def test_keep_last_keeps_exactly_the_newest_checkpoints_after_every_save(run_setup, monkeypatch, keep_last):
    cfg, output = run_setup
    after_each_save = []
    real_save = Trainer._save

    def recording_save(self):
        path = real_save(self)
        after_each_save.append((_checkpoints(output), (output / "checkpoints" / "latest").read_text().strip()))
        return path

    monkeypatch.setattr(Trainer, "_save", recording_save)
    Trainer(cfg("train.steps=5", "checkpoint.save_interval=1", f"checkpoint.keep_last={keep_last}")).fit()
    assert len(after_each_save) == 5
    for saves, (kept, latest) in enumerate(after_each_save, 1):
        names = [f"step_{step:07d}" for step in range(1, saves + 1)]
        assert kept == names[-keep_last:] and latest == names[-1]


def test_checkpoints_and_latest_appear_only_by_rename_and_a_failed_save_leaves_the_last_one(run_setup, monkeypatch):
    """Each checkpoint is written under a staging name (its final name does not exist yet) and renamed; ``latest``
    is replaced by a rename, never rewritten in place; a save that fails before its rename leaves no trace."""
    cfg, output = run_setup
    root = output / "checkpoints"
    written, latest_replaced = [], []
    real_manifest, real_replace = checkpointing.write_manifest, os.replace

    def manifest_failing_at_step_3(folder, **kwargs):
        folder = Path(folder)
        final = root / folder.name.removeprefix(".").removesuffix(".partial")
        written.append((folder.name, final.exists(), (folder / "trainer_state.json").is_file()))
        if final.name == "step_0000003":
            raise OSError(errno.EIO, "Input/output error")
        return real_manifest(folder, **kwargs)

    def recording_replace(source, target):
        if Path(target).name == "latest":
            latest_replaced.append((Path(source).read_text().strip(),
                                    Path(target).read_text().strip() if Path(target).exists() else None))
        return real_replace(source, target)

    monkeypatch.setattr(checkpointing, "write_manifest", manifest_failing_at_step_3)
    monkeypatch.setattr(os, "replace", recording_replace)
    with pytest.raises(OSError, match="Input/output error"):
        Trainer(cfg("train.steps=4", "checkpoint.save_interval=1")).fit()
    monkeypatch.undo()
    assert written == [(f".step_000000{step}.partial", False, True) for step in (1, 2, 3)]
    assert latest_replaced == [("step_0000001", None), ("step_0000002", "step_0000001")]
    assert _checkpoints(output) == ["step_0000001", "step_0000002"] and not list(root.glob(".*partial"))
    assert (root / "latest").read_text().strip() == "step_0000002"


def _start_train(tmp_path: Path, output: Path, *overrides) -> subprocess.Popen:
    import sys

    command = [sys.executable, "-m", "ar2dlm.cli", "train", f"init={tmp_path / 'converted'}", f"output={output}",
               "recipe=tiny", f"data.sources=[{{path: {tmp_path / 'corpus.jsonl'}}}]", "data.seq_length=32",
               "train.steps=200", "checkpoint.save_interval=2", *overrides]
    return subprocess.Popen(command, env={**os.environ, "CI": "true"}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def _wait_for_rows(process: subprocess.Popen, output: Path, count: int) -> None:
    import time

    deadline = time.monotonic() + 240
    metrics = output / "metrics.jsonl"
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= count):
        assert process.poll() is None, process.communicate()[1][-2000:]
        assert time.monotonic() < deadline, "the run made no progress"
        time.sleep(0.1)


def test_a_real_job_stops_cleanly_on_sigterm_to_all_its_processes_and_leaves_nothing_behind_a_kill(run_setup,
                                                                                                  tmp_path):
    """SIGTERM to the whole process group (as Slurm sends it) used to kill megatron's checkpoint-writer
    manager process, so the stop save broke and the run exited 0; a kill -9 of the trainer left it behind."""
    import time

    import psutil

    _, output = run_setup
    process = _start_train(tmp_path, output)
    _wait_for_rows(process, output, 5)  # past the first save, so the writer's manager runs
    os.killpg(process.pid, signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM, stderr[-2000:]
    assert "stopped by SIGTERM after step" in stderr.strip().splitlines()[-1]
    assert checkpointing.resume_checkpoint(output) is not None

    process = _start_train(tmp_path, output, "resume=true")
    steps = len((output / "metrics.jsonl").read_text().splitlines())
    _wait_for_rows(process, output, steps + 3)
    process.kill()
    process.wait()
    time.sleep(2)  # anything the trainer started (a forked checkpoint writer, a manager) would still be there
    left = [p for p in psutil.process_iter(["cmdline"]) if str(output) in " ".join(p.info["cmdline"] or [])]
    assert not left, [p.info["cmdline"][:4] for p in left]
