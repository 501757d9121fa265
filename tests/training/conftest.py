"""Fixtures of the training tests."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def wrapped_model(tiny_provider):
    """The tiny model configured as the trainer configures it (default train config), data-parallel wrapped."""
    from ar2dlm.config import compose_stage
    from ar2dlm.model.gpt import build_model
    from ar2dlm.training.data_parallel import wrap_data_parallel
    from ar2dlm.training.parallel_setup import configure_provider

    cfg = compose_stage("train", ["init=a", "output=b"], require_complete=False)
    return wrap_data_parallel(build_model(configure_provider(tiny_provider, cfg)), cfg)



@pytest.fixture
def kill_at(monkeypatch):
    """``kill_at(step)``: the next run dies (KeyboardInterrupt, like kill -9) when it reaches ``step``; ``kill_at(-1)``
    lets runs finish again."""
    from ar2dlm.training.loop import Trainer

    real_step = Trainer._train_step

    def arm(step_to_kill):
        def step(self, step):
            if step == step_to_kill:
                raise KeyboardInterrupt
            return real_step(self, step)

        monkeypatch.setattr(Trainer, "_train_step", step)

    yield arm
    monkeypatch.setattr(Trainer, "_train_step", real_step)


def cli_train_runner(tmp_path: Path, common: list[str]):
    """Function (nproc, name, *overrides) -> the metrics rows of `ar2dlm train` with ``common`` + overrides into
    tmp_path/name, in one process or through launch/torchrun.sh (gloo) for nproc > 1."""
    env = {**os.environ, "PYTHON": sys.executable}

    def run(nproc: int, name: str, *overrides: str) -> list[dict]:
        output = tmp_path / name
        command = ([str(ROOT / "launch" / "torchrun.sh"), str(nproc)] if nproc > 1
                   else [sys.executable, "-m", "ar2dlm.cli"])
        result = subprocess.run([*command, "train", *common, f"output={output}", *overrides],
                                capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
        assert result.returncode == 0, result.stderr[-4000:]
        return [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]

    return run
