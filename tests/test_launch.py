"""The launch scripts: valid bash, the Slurm script's command line rendered with fake Slurm variables, its
requeue-on-signal path with a fake srun/scontrol, and gpu_smoke.sh refusing to run without CUDA."""

import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch"
SBATCH = LAUNCH / "slurm.sbatch"
SCRIPTS = sorted(LAUNCH.glob("*.sh")) + [SBATCH]
OVERRIDES = ["recipe=qwen3_8b_joint", "init=/ckpt/qwen3-8b", "output=/runs/joint",
             "data.sources=[{path: /data/my corpus, kind: indexed}]"]


def _path_without(program: str) -> str:
    """$PATH minus the folders that hold ``program`` (so that e.g. a real scontrol is not found)."""
    folders = os.environ.get("PATH", "/usr/bin:/bin").split(os.pathsep)
    return os.pathsep.join(f for f in folders if f and not (Path(f) / program).exists())


def _slurm_env(**extra: str) -> dict:
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("SLURM_", "MASTER_", "CONTAINER_", "GPUS_PER_NODE", "SRUN_", "PYTHON"))}
    env.update(PATH=_path_without("scontrol"), SLURM_JOB_ID="4242", SLURM_NNODES="2",
               SLURM_JOB_NUM_NODES="2", SLURM_JOB_NODELIST="gpu-a,gpu-b", SLURM_GPUS_ON_NODE="8", DRY_RUN="1")
    env.update(extra)
    return env


def _render(*args: str, **env: str) -> list[str]:
    result = subprocess.run(["bash", str(SBATCH), *args], capture_output=True, text=True, timeout=60,
                            env=_slurm_env(**env), cwd=ROOT)
    assert result.returncode == 0, result.stderr
    return shlex.split(result.stdout)


def _split(command: list[str]) -> tuple[list[str], list[str], list[str]]:
    """(srun part, torchrun options, ar2dlm arguments) of a rendered command line."""
    run = command.index("torch.distributed.run")
    cli = command.index("ar2dlm.cli")
    return command[:run - 2], command[run + 1:cli - 1], command[cli + 1:]


def _options(words: list[str]) -> dict[str, str]:
    pairs = {}
    for index, word in enumerate(words):
        if word.startswith("--"):
            key, _, value = word.partition("=")
            pairs[key] = value or (words[index + 1] if index + 1 < len(words) else "")
    return pairs


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_scripts_are_valid_bash(script):
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr


def test_sbatch_header_has_the_usual_knobs():
    header = [line for line in SBATCH.read_text().splitlines() if line.startswith("#SBATCH")]
    text = "\n".join(header)
    for knob in ("--nodes=", "--ntasks-per-node=1", "--gpus-per-node=8", "--cpus-per-task=", "--time=",
                 "--requeue", "--signal=B:USR1@", "--output=", "--error="):
        assert knob in text, knob


def test_two_nodes_of_eight_gpus_with_a_fake_scontrol(tmp_path):
    fake = tmp_path / "bin" / "scontrol"
    fake.parent.mkdir()
    fake.write_text('#!/bin/sh\n[ "$1 $2" = "show hostnames" ] && printf "node007\\nnode008\\n"\n')
    fake.chmod(0o755)
    command = _render("train", *OVERRIDES, PATH=f"{fake.parent}{os.pathsep}{_path_without('scontrol')}",
                      SLURM_JOB_NODELIST="node[007-008]", SLURM_CPUS_PER_TASK="32")
    srun, torchrun, cli = _split(command)
    assert srun[0] == "srun"
    assert {"--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=32"} <= set(srun)
    assert not any(word.startswith("--container") for word in srun)
    options = _options(torchrun)
    assert options["--nnodes"] == "2" and options["--nproc-per-node"] == "8"
    assert options["--rdzv-backend"] == "c10d"
    assert options["--rdzv-endpoint"] == "node007:29500"
    assert options["--rdzv-id"] == "4242"
    assert cli == ["train", *OVERRIDES, "resume=true"]  # forwarded untouched, then resume=true


def test_without_scontrol_the_first_host_of_the_list_is_used():
    _, torchrun, _ = _split(_render("train", "init=a", "output=b"))
    assert _options(torchrun)["--rdzv-endpoint"] == "gpu-a:29500"
    _, torchrun, _ = _split(_render("train", "init=a", "output=b", SLURM_JOB_NODELIST="gpu[003-004,009],x1"))
    assert _options(torchrun)["--rdzv-endpoint"] == "gpu003:29500"


def test_preset_master_addr_port_and_gpus_per_node():
    _, torchrun, _ = _split(_render("train", "init=a", "output=b", MASTER_ADDR="10.0.0.5", MASTER_PORT="31337",
                                    SLURM_GPUS_ON_NODE="", SLURM_GPUS_PER_NODE="h100:4"))
    options = _options(torchrun)
    assert options["--rdzv-endpoint"] == "10.0.0.5:31337" and options["--nproc-per-node"] == "4"


def test_resume_is_not_doubled_and_only_added_for_train():
    assert _split(_render("train", "init=a", "output=b", "resume=false"))[2] == [
        "train", "init=a", "output=b", "resume=false"]
    assert _split(_render("export", "checkpoint=c", "output=d"))[2] == ["export", "checkpoint=c", "output=d"]


def test_container_options_only_when_an_image_is_set():
    srun, _, _ = _split(_render("train", "init=a", "output=b", CONTAINER_IMAGE="nvcr.io/x/y:1",
                                                  CONTAINER_MOUNTS="/lustre:/lustre"))
    options = _options(srun)
    assert options["--container-image"] == "nvcr.io/x/y:1" and options["--container-mounts"] == "/lustre:/lustre"
    command = _render("train", "init=a", "output=b", CONTAINER_IMAGE="nvcr.io/x/y:1")
    assert command[command.index("torch.distributed.run") - 2] == "python"  # the container's interpreter


@pytest.mark.parametrize("args, env, message", [
    ([], {}, "usage:"),
    (["train", "init=a"], {"SLURM_JOB_NODELIST": ""}, "SLURM_JOB_NODELIST is not set"),
])
def test_bad_invocations_exit_2_with_a_message(args, env, message):
    result = subprocess.run(["bash", str(SBATCH), *args], capture_output=True, text=True, timeout=60,
                            env=_slurm_env(**env), cwd=ROOT)
    assert result.returncode == 2 and message in result.stderr


def test_usr1_requeues_the_job_and_srun_status_is_returned(tmp_path):
    """Slurm's B:USR1 before the time limit: the script calls `scontrol requeue $SLURM_JOB_ID`."""
    bin_dir, log = tmp_path / "bin", tmp_path / "log"
    bin_dir.mkdir()
    log.mkdir()
    (bin_dir / "srun").write_text(
        '#!/bin/bash\nprintf "%s\\n" "$@" > "$FAKE_LOG/srun_args"\n'
        'for _ in $(seq 200); do [ -f "$FAKE_LOG/requeued" ] && exit 7; sleep 0.1; done\nexit 1\n')
    (bin_dir / "scontrol").write_text(
        '#!/bin/bash\ncase "$1" in show) printf "node1\\nnode2\\n" ;; requeue) echo "$@" > "$FAKE_LOG/requeued" ;;'
        ' esac\n')
    for program in ("srun", "scontrol"):
        (bin_dir / program).chmod(0o755)
    env = _slurm_env(PATH=f"{bin_dir}{os.pathsep}{_path_without('scontrol')}", FAKE_LOG=str(log), DRY_RUN="0")
    process = subprocess.Popen(["bash", str(SBATCH), "train", "init=a", "output=b"], env=env, cwd=ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while not (log / "srun_args").is_file() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert (log / "srun_args").is_file(), "the fake srun was not started"
        process.send_signal(signal.SIGUSR1)
        _, stderr = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 7, stderr  # srun's exit status
    assert (log / "requeued").read_text().split() == ["requeue", "4242"]
    assert "requeueing job 4242" in stderr
    launched = (log / "srun_args").read_text().splitlines()
    assert launched[0] == "--nodes=2" and launched[-5:] == ["ar2dlm.cli", "train", "init=a", "output=b", "resume=true"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_gpu_smoke_refuses_to_run_without_cuda(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path / "out"), "WORK": str(tmp_path / "work")}
    result = subprocess.run(["bash", str(LAUNCH / "gpu_smoke.sh")], capture_output=True, text=True, timeout=120,
                            env=env, cwd=tmp_path)
    assert result.returncode == 2
    assert "no CUDA GPU" in result.stderr and "torch.cuda.is_available() is False" in result.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / "work").exists()  # nothing was run
