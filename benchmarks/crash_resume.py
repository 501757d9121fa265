"""Kill `ar2dlm train` at random moments (kill -9, or a signal) and resume it until it finishes; check that
every loss row equals the uninterrupted run's.

    python benchmarks/crash_resume.py [--kills 10 --steps 40 --save-interval 5 --keep-last 2
                                       --signal KILL --seed 0 --workdir DIR]

A tiny Qwen3 is built and converted in a temporary folder; the reference run trains it without
interruption. Then one run is started with resume=true again and again: each start is killed after a
random moment (a fifth of them in start-up; the rest once it trains, after a random step still to
come (within two save intervals of the checkpoint it resumed from) plus up to one and a half steps'
time, so they land in steps and in saves) until `--kills` kills have been made, and the last start runs to the end. Printed: how many starts
resumed, how many finished or were killed, whether each start's exit code was the expected one, and
how many rows of metrics.jsonl differ from the reference (bitwise on the loss).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TEXTS = ["the quick brown fox jumps over the lazy dog", "0 1 2 3 4 5 6 7 8 9 + - = reverse sort copy"] * 10


def build_converted(folder: Path) -> tuple[Path, Path]:
    """(converted checkpoint, corpus) for a tiny random Qwen3."""
    from ar2dlm.conversion.convert import convert
    from ar2dlm.data.synthetic import examples, write_jsonl
    from ar2dlm.distributed import ParallelLayout, init_distributed
    from ar2dlm.model.hf_factory import make_hf_model, train_tokenizer

    init_distributed(ParallelLayout())
    tokenizer = train_tokenizer(TEXTS, vocab_size=300, extra_special_tokens=["<|fim_pad|>"])
    source = make_hf_model("Qwen3ForCausalLM", folder / "source", vocab_size=len(tokenizer) + 4,
                           tie_word_embeddings=True, tokenizer=tokenizer)
    convert(source, folder / "converted")
    return folder / "converted", write_jsonl(folder / "corpus.jsonl", list(examples(400, seed=0)))


def train_command(args, converted: Path, corpus: Path, output: Path) -> list[str]:
    return [sys.executable, "-m", "ar2dlm.cli", "train", f"init={converted}", f"output={output}", "recipe=tiny",
            f"data.sources=[{{path: {corpus}}}]", "data.seq_length=32", f"train.steps={args.steps}",
            f"checkpoint.save_interval={args.save_interval}", f"checkpoint.keep_last={args.keep_last}",
            "optim.lr=3e-3", "optim.schedule=cosine", "optim.min_lr=1e-4", "optim.warmup_steps=1", "resume=true"]


def last_step(output: Path) -> int:
    """The step of metrics.jsonl's last whole row (0: none)."""
    path = output / "metrics.jsonl"
    lines = path.read_bytes().splitlines() if path.exists() else []
    for line in reversed(lines):
        try:
            return int(json.loads(line)["step"])
        except (ValueError, KeyError):
            continue
    return 0


def newest_saved_step(output: Path) -> int:
    steps = [int(p.name.removeprefix("step_")) for p in (output / "checkpoints").glob("step_*")]
    return max(steps, default=0)


def wait_until_training(process: subprocess.Popen, output: Path, since: float) -> None:
    """Wait until this start has written metrics.jsonl (its truncation or its first row) or has ended."""
    path = output / "metrics.jsonl"
    while process.poll() is None and not (path.exists() and path.stat().st_mtime > since):
        time.sleep(0.02)


def wait_for_step(process: subprocess.Popen, output: Path, step: int) -> None:
    while process.poll() is None and last_step(output) < step:
        time.sleep(0.02)


def timed_reference(args, converted: Path, corpus: Path, output: Path, env: dict) -> tuple[float, float]:
    """Run the uninterrupted reference; returns (seconds to its first metrics row, total seconds)."""
    started, since = time.perf_counter(), time.time()
    process = subprocess.Popen(train_command(args, converted, corpus, output), env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    wait_until_training(process, output, since)
    startup = time.perf_counter() - started
    code = process.wait()
    end_job(process)
    if code != 0:
        raise SystemExit("the reference run failed")
    return startup, time.perf_counter() - started


def end_job(process: subprocess.Popen) -> None:
    """Kill what the run left behind (megatron's checkpoint writer keeps a multiprocessing manager alive)."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def losses(output: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    steps = [row["step"] for row in rows]
    if steps != sorted(set(steps)):
        raise SystemExit(f"metrics.jsonl has duplicate or unordered steps: {steps}")
    return {row["step"]: row["loss"] for row in rows}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--save-interval", type=int, default=5)
    parser.add_argument("--keep-last", type=int, default=2)
    parser.add_argument("--signal", default="KILL", choices=["KILL", "TERM", "USR1", "INT"])
    parser.add_argument("--startup-fraction", type=float, default=0.2,
                        help="share of kills aimed at start-up (before the first step) instead of training")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    signum = signal.Signals[f"SIG{args.signal}"]
    expected_exits = {-signum, 128 + signum}  # killed by it (before the handler is installed), or stopped on it
    env = {**os.environ, "CI": "true"}  # no progress bars

    with tempfile.TemporaryDirectory() as tmp:
        work = args.workdir or Path(tmp)
        converted, corpus = build_converted(work)
        startup, wall = timed_reference(args, converted, corpus, work / "reference", env)
        reference = losses(work / "reference")

        output, kills, starts, resumes, bad_exits, log = work / "crashed", 0, 0, 0, [], []
        while True:
            starts += 1
            stderr_path, since, resumed = work / f"start_{starts}.err", time.time(), newest_saved_step(output)
            resumes += resumed > 0
            with stderr_path.open("w") as stderr_file:
                process = subprocess.Popen(train_command(args, converted, corpus, output), env=env,
                                           stdout=subprocess.DEVNULL, stderr=stderr_file, start_new_session=True)
            if kills < args.kills:
                if rng.random() < args.startup_fraction:
                    delay = rng.uniform(0.0, startup)
                else:  # once the run trains: in a step, a validation or a save
                    wait_until_training(process, output, since)
                    target = min(resumed + rng.randint(1, 2 * args.save_interval), args.steps - 1)
                    wait_for_step(process, output, target)
                    delay = rng.uniform(0.0, 1.5 * (wall - startup) / args.steps)  # within a step or its save
                try:
                    process.wait(timeout=delay)
                except subprocess.TimeoutExpired:
                    os.killpg(process.pid, signum)  # the whole job, as Slurm signals every process of a step
                    kills += 1
            code = process.wait()
            end_job(process)
            stderr = stderr_path.read_text()
            log.append((starts, code))
            if code == 0:
                break
            if code not in expected_exits:
                bad_exits.append((starts, code, stderr.strip().splitlines()[-1:] or [""]))
                if len(bad_exits) > 3:
                    break
        recorded = losses(output) if (output / "metrics.jsonl").exists() else {}
        mismatches = sum(recorded.get(step) != loss for step, loss in reference.items())

    print(f"crash_resume: {args.kills} x SIG{args.signal} over a {args.steps}-step run "
          f"(save every {args.save_interval}, keep {args.keep_last}, reference {wall:.1f}s of which start-up "
          f"{startup:.1f}s, seed {args.seed})")
    print(f"  starts: {starts}; killed while running: {kills}; resumed from a checkpoint: {resumes}; "
          f"finished: {int(log[-1][1] == 0)}")
    print(f"  unexpected exit codes: {len(bad_exits)}" + "".join(f"\n    start {s}: exit {c}: {m[0]}"
                                                              for s, c, m in bad_exits))
    print(f"  loss rows equal to the uninterrupted run: {len(reference) - mismatches}/{len(reference)} "
          f"(mismatches {mismatches})")
    return 0 if not bad_exits and not mismatches and log[-1][1] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
