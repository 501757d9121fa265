"""Parallel layouts on CPU (gloo, 2 processes through launch/torchrun.sh) give the single-process losses."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ar2dlm.conversion.convert import convert
from ar2dlm.data.synthetic import examples, write_jsonl

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHON": sys.executable}


@pytest.fixture(params=[("LlamaForCausalLM", False)], ids=["llama"])
def setup(request, make_tiny_hf, tmp_path, megatron_ready):
    architecture, tied = request.param
    convert(make_tiny_hf(architecture, tied=tied, num_layers=2), tmp_path / "converted")
    corpus = write_jsonl(tmp_path / "corpus.jsonl", list(examples(200, seed=0)))
    common = [f"init={tmp_path / 'converted'}", "recipe=tiny", f"data.sources=[{{path:{corpus}}}]",
              "data.seq_length=32", "diffusion.block_size=8", "train.global_batch_size=4",
              "optim.schedule=constant", "optim.warmup_steps=0", "optim.lr=3e-3"]

    def run(nproc: int, name: str, *overrides: str) -> list[dict]:
        output = tmp_path / name
        command = ([str(ROOT / "launch" / "torchrun.sh"), str(nproc)] if nproc > 1
                   else [sys.executable, "-m", "ar2dlm.cli"])
        result = subprocess.run([*command, "train", *common, f"output={output}", *overrides],
                                capture_output=True, text=True, timeout=600, cwd=ROOT, env=ENV)
        assert result.returncode == 0, result.stderr[-4000:]
        return [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]

    return run


def _assert_same_curve(a: list[dict], b: list[dict]) -> None:
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for x, y in zip(a, b, strict=True):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-5, abs=1e-6)
        assert x["grad_norm"] == pytest.approx(y["grad_norm"], rel=1e-4)


def test_data_parallel_2_equals_1(setup):
    one = setup(1, "dp1", "train.steps=4", "train.micro_batch_size=1", "checkpoint.save_interval=0")
    two = setup(2, "dp2", "train.steps=4", "train.micro_batch_size=1", "checkpoint.save_interval=0")
    _assert_same_curve(one, two)


@pytest.mark.multiprocess
def test_tensor_parallel_2_equals_1(setup):
    one = setup(1, "tp1", "train.steps=4", "train.micro_batch_size=2", "checkpoint.save_interval=0")
    two = setup(2, "tp2", "train.steps=4", "train.micro_batch_size=2", "parallel.tensor=2",
                "checkpoint.save_interval=0")
    _assert_same_curve(one, two)


@pytest.mark.multiprocess
@pytest.mark.parametrize("layout", [["parallel.tensor=2", "train.micro_batch_size=2"], ["train.micro_batch_size=1"]],
                         ids=["tp2", "dp2"])
def test_checkpoint_from_two_processes_resumes_in_one(setup, layout):
    reference = setup(1, "reference", "train.steps=4", "train.micro_batch_size=2", "checkpoint.save_interval=0")
    setup(2, "run", "train.steps=2", "checkpoint.save_interval=2", *layout)
    resumed = setup(1, "run", "train.steps=4", "train.micro_batch_size=2", "resume=true")
    _assert_same_curve(resumed[2:], reference[2:])


@pytest.mark.parametrize("setup", [("Qwen3ForCausalLM", True)], indirect=True, ids=["qwen3-tied"])
def test_pipeline_parallel_2_equals_1(setup):
    """Two stages, 1F1B over 2 micro-batches; the tied embedding's gradient is shared by both stages."""
    one = setup(1, "pp1", "train.steps=4", "train.micro_batch_size=2", "checkpoint.save_interval=0")
    two = setup(2, "pp2", "train.steps=4", "train.micro_batch_size=2", "parallel.pipeline=2",
                "checkpoint.save_interval=0")
    _assert_same_curve(one, two)


@pytest.mark.multiprocess
@pytest.mark.parametrize("setup", [("Qwen3ForCausalLM", False)], indirect=True, ids=["qwen3"])
def test_tensor_parallel_2_equals_1_with_qk_norms(setup):
    """q/k norm weights see only the local heads; their gradients must be summed over tensor ranks."""
    one = setup(1, "tp1", "train.steps=4", "train.micro_batch_size=2", "checkpoint.save_interval=0")
    two = setup(2, "tp2", "train.steps=4", "train.micro_batch_size=2", "parallel.tensor=2",
                "checkpoint.save_interval=0")
    _assert_same_curve(one, two)


@pytest.mark.parametrize("objective", ["joint", pytest.param("ar", marks=pytest.mark.multiprocess)])
def test_context_parallel_2_equals_1(setup, objective):
    """Each rank holds a quarter and three quarters of the sequence and gathers keys/values for attention."""
    one = setup(1, "cp1", "train.steps=3", "train.micro_batch_size=2", "checkpoint.save_interval=0",
                f"train.objective={objective}")
    two = setup(2, "cp2", "train.steps=3", "train.micro_batch_size=2", "parallel.context=2",
                "checkpoint.save_interval=0", f"train.objective={objective}")
    _assert_same_curve(one, two)


@pytest.mark.multiprocess
@pytest.mark.parametrize("setup", [("Qwen3ForCausalLM", True)], indirect=True, ids=["qwen3-tied"])
@pytest.mark.parametrize("layout", [["parallel.tensor=2", "parallel.context=2"],
                                    ["parallel.pipeline=2", "parallel.context=2"],
                                    ["parallel.pipeline=2", "train.micro_batch_size=1"]],
                         ids=["tp2-cp2", "pp2-cp2", "pp2-dp2"])
def test_four_process_layouts_equal_one_process(setup, layout):
    one = setup(1, "one", "train.steps=3", "train.micro_batch_size=2", "checkpoint.save_interval=0")
    four = setup(4, "four", "train.steps=3", "train.micro_batch_size=2", "checkpoint.save_interval=0", *layout)
    _assert_same_curve(one, four)
