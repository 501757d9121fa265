"""Parallel layouts on CPU (gloo, 2 processes through launch/torchrun.sh) give the single-process losses."""

import pytest

from ar2dlm.conversion.convert import convert
from ar2dlm.data.synthetic import examples, write_jsonl

from .conftest import cli_train_runner


@pytest.fixture(params=[("LlamaForCausalLM", False)], ids=["llama"])  # (architecture, tied embeddings)
def setup(request, make_tiny_hf, tmp_path, megatron_ready):
    architecture, tied = request.param
    convert(make_tiny_hf(architecture, tied=tied, num_layers=2), tmp_path / "converted")
    corpus = write_jsonl(tmp_path / "corpus.jsonl", list(examples(200, seed=0)))
    common = [f"init={tmp_path / 'converted'}", "recipe=tiny", f"data.sources=[{{path:{corpus}}}]",
              "data.seq_length=32", "diffusion.block_size=8", "train.global_batch_size=4",
              "optim.schedule=constant", "optim.warmup_steps=0", "optim.lr=3e-3"]

    return cli_train_runner(tmp_path, common)


def _assert_same_curve(a: list[dict], b: list[dict]) -> None:
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for x, y in zip(a, b, strict=True):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-5, abs=1e-6)
        assert x["grad_norm"] == pytest.approx(y["grad_norm"], rel=1e-4)


LLAMA, QWEN3, QWEN3_TIED = ("LlamaForCausalLM", False), ("Qwen3ForCausalLM", False), ("Qwen3ForCausalLM", True)
MULTIPROCESS = pytest.mark.multiprocess


@pytest.mark.parametrize("setup, nproc, layout", [
    pytest.param(LLAMA, 2, ["train.micro_batch_size=1"], id="dp2"),
    pytest.param(LLAMA, 2, ["parallel.tensor=2"], id="tp2", marks=MULTIPROCESS),
    # q/k norm weights see only the local heads: their gradients are summed over tensor ranks
    pytest.param(QWEN3, 2, ["parallel.tensor=2"], id="tp2-qk-norms", marks=MULTIPROCESS),
    # 1F1B over 2 micro-batches; the tied embedding's gradient is shared by the first and last stage
    pytest.param(QWEN3_TIED, 2, ["parallel.pipeline=2"], id="pp2-tied"),
    # each rank holds two of four chunks of both streams and gathers keys/values for attention
    pytest.param(LLAMA, 2, ["parallel.context=2"], id="cp2"),
    pytest.param(QWEN3_TIED, 4, ["parallel.tensor=2", "parallel.context=2"], id="tp2-cp2", marks=MULTIPROCESS),
    pytest.param(QWEN3_TIED, 4, ["parallel.pipeline=2", "parallel.context=2"], id="pp2-cp2", marks=MULTIPROCESS),
    pytest.param(QWEN3_TIED, 4, ["parallel.pipeline=2", "train.micro_batch_size=1"], id="pp2-dp2",
                 marks=MULTIPROCESS),
], indirect=["setup"])
@pytest.mark.parametrize("objective", ["joint", pytest.param("ar", marks=MULTIPROCESS)])
def test_parallel_layout_gives_the_single_process_curve(setup, nproc, layout, objective):
    common = ["train.steps=3", "train.micro_batch_size=2", "checkpoint.save_interval=0", f"train.objective={objective}"]
    one = setup(1, "one", *common)
    many = setup(nproc, "many", *common, *layout)
    _assert_same_curve(one, many)


@pytest.mark.multiprocess
@pytest.mark.parametrize("layout", [["parallel.tensor=2", "train.micro_batch_size=2"], ["train.micro_batch_size=1"],
                                    ["parallel.pipeline=2", "train.micro_batch_size=2"],
                                    ["parallel.context=2", "train.micro_batch_size=2"]],
                         ids=["tp2", "dp2", "pp2", "cp2"])
def test_checkpoint_from_two_processes_resumes_in_one(setup, layout):
    reference = setup(1, "reference", "train.steps=4", "train.micro_batch_size=2", "checkpoint.save_interval=0")
    setup(2, "run", "train.steps=2", "checkpoint.save_interval=2", *layout)
    resumed = setup(1, "run", "train.steps=4", "train.micro_batch_size=2", "resume=true")
    _assert_same_curve(resumed[2:], reference[2:])


LEVERS = ["diffusion.complementary_masking=true", "diffusion.random_block_prob=0.5", "diffusion.noise_schedule=position",
          "diffusion.loss_normalization=per_term"]


@pytest.mark.parametrize("setup, layout", [
    pytest.param(LLAMA, ["train.micro_batch_size=1"], id="dp2"),
    pytest.param(LLAMA, ["parallel.context=2"], id="cp2", marks=MULTIPROCESS),
], indirect=["setup"])
def test_the_training_levers_give_the_single_process_curve(setup, layout):
    """docs/design.md §2.7: complementary pairs and drawn block sizes depend only on (seed, sample, step), and the
    per-term counts are summed over data- and context-parallel ranks before dividing."""
    common = ["train.steps=3", "train.micro_batch_size=2", "checkpoint.save_interval=0", *LEVERS]
    one = setup(1, "one", *common)
    many = setup(2, "many", *common, *layout)
    _assert_same_curve(one, many)
    assert [r["block_size"] for r in one] == [r["block_size"] for r in many]
