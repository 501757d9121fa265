"""The drafter objective under parallel layouts (gloo, 2 processes through launch/torchrun.sh) gives the
single-process curve: the adapters are sharded like their base layers and initialised from the full matrix."""

import pytest

from ar2dlm.conversion.convert import convert
from ar2dlm.data.synthetic import examples, write_jsonl

from .conftest import cli_train_runner


@pytest.fixture
def drafter_run(make_tiny_hf, tmp_path, megatron_ready):
    convert(make_tiny_hf("Qwen3ForCausalLM", tied=False, num_layers=2), tmp_path / "converted")
    corpus = write_jsonl(tmp_path / "corpus.jsonl", list(examples(200, seed=0)))
    common = [f"init={tmp_path / 'converted'}", "recipe=tiny", f"data.sources=[{{path:{corpus}}}]",
              "data.seq_length=32", "diffusion.block_size=8", "train.global_batch_size=4", "train.micro_batch_size=2",
              "optim.schedule=constant", "optim.warmup_steps=0", "optim.lr=1e-2", "train.steps=3",
              "checkpoint.save_interval=0", "train.objective=drafter", "drafter.rank=4", "drafter.alpha=16",
              "drafter.top_k=16"]

    return cli_train_runner(tmp_path, common)


@pytest.mark.multiprocess
@pytest.mark.parametrize("layout", [["parallel.tensor=2"], ["parallel.pipeline=2"], ["train.micro_batch_size=1"]],
                         ids=["tp2", "pp2", "dp2"])
@pytest.mark.parametrize("targets", ["[linear_proj]", "[linear_qkv,linear_fc1,linear_fc2]"], ids=["o_proj", "others"])
def test_drafter_layout_gives_the_single_process_curve(drafter_run, layout, targets):
    one = drafter_run(1, "one", f"drafter.target_modules={targets}")
    many = drafter_run(2, "many", f"drafter.target_modules={targets}", *layout)
    assert [r["step"] for r in one] == [r["step"] for r in many] == [1, 2, 3]
    for x, y in zip(one, many, strict=True):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-5, abs=1e-6)
        assert x["grad_norm"] == pytest.approx(y["grad_norm"], rel=1e-4)
        assert x["ar_loss"] == pytest.approx(y["ar_loss"], rel=1e-5, abs=1e-6)
    assert one[-1]["loss"] != one[0]["loss"]  # the adapters train


@pytest.mark.multiprocess
def test_length_weighting_gives_the_single_process_curve_when_rows_are_split(drafter_run):
    """drafter.length_weighting scales weights per row, so splitting a step's rows over data-parallel ranks and
    micro-batches leaves the loss and gradients unchanged (a per-micro-batch normalisation would not)."""
    weighting = "drafter.length_weighting=true"
    one = drafter_run(1, "one", weighting)
    many = drafter_run(2, "many", weighting, "train.micro_batch_size=1")
    unweighted = drafter_run(1, "plain")
    for x, y in zip(one, many, strict=True):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-5, abs=1e-6)
        assert x["grad_norm"] == pytest.approx(y["grad_norm"], rel=1e-4)
    assert one[0]["loss"] != pytest.approx(unweighted[0]["loss"], rel=1e-4)  # the weighting is on
