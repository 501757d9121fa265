"""`ar2dlm plan`: the command line, bad input, and the published recipes."""

import json
import re

import pytest

from ar2dlm.cli import main
from ar2dlm.config import compose_stage, recipes_dir
from ar2dlm.planning.parameters import model_parameters
from ar2dlm.planning.report import make_plan
from ar2dlm.planning.shape import shape_from_description

PUBLISHED = sorted(p.stem for p in (recipes_dir() / "recipe").glob("*.yaml") if re.search(r"_(ar|joint|sft)$", p.stem))
# Parameter counts the model cards publish (safetensors totals), for the architectures the recipes describe.
PUBLISHED_PARAMETERS = {"llama3_2_3b": 3.21e9, "llama3_1_8b": 8.03e9, "mistral_7b": 7.25e9, "qwen2_5_7b": 7.62e9,
                        "qwen3_4b": 4.02e9, "qwen3_8b": 8.19e9, "qwen3_14b": 14.77e9}


def _plan(*overrides):
    return make_plan(compose_stage("plan", list(overrides)))


@pytest.mark.parametrize("model", sorted(PUBLISHED_PARAMETERS))
def test_recipe_model_descriptions_give_the_published_parameter_counts(model):
    shape = shape_from_description(compose_stage("plan", [f"recipe={model}_joint"]).model)
    assert model_parameters(shape) == pytest.approx(PUBLISHED_PARAMETERS[model], rel=0.005)


@pytest.mark.parametrize("name", PUBLISHED)
def test_every_published_recipe_fits_and_says_what_plan_reports(name):
    header = (recipes_dir() / "recipe" / f"{name}.yaml").read_text()
    said = re.search(r"fits, ([\d.]+) GB per GPU, ([\d.]+) s per step\n#\s+at MFU 0.4 \(on 8 GPUs: ([\d.]+) GB\)",
                     header)
    assert said, f"{name}.yaml: the header must say what `ar2dlm plan` reports"
    cluster, node = _plan(f"recipe={name}", "plan.gpus=64"), _plan(f"recipe={name}", "plan.gpus=8")
    assert cluster.fits and node.fits
    reported = (f"{cluster.memory.total / 1e9:.1f}", f"{cluster.throughput.seconds_per_step:.1f}",
                f"{node.memory.total / 1e9:.1f}")
    assert said.groups() == reported


def test_plan_of_qwen3_8b_joint_fits_and_doubles_the_ar_flops(capsys):
    assert main(["plan", "recipe=qwen3_8b_joint"]) == 0
    text = capsys.readouterr().out
    assert "fits 80 GB GPUs" in text and "joint = 2.00 x AR" in text
    assert main(["plan", "recipe=qwen3_8b_joint", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    memory = plan["memory"]
    parts = ("parameters", "gradients", "optimizer", "fp8_weight_copies", "activations", "mask")
    assert memory["total"] == sum(memory[part] for part in parts) and memory["fits"]
    assert memory["optimizer_distributed"] * plan["run"]["data"] == pytest.approx(memory["optimizer_replicated"], 1e-6)
    assert plan["run"]["positions"] == 2 * plan["run"]["seq_length"] == 8192
    assert plan["flops"]["seconds_per_step"] == pytest.approx(
        plan["flops"]["model"] / (plan["run"]["gpus"] * 989e12 * 0.4))


def test_a_plan_that_does_not_fit_says_so_and_exits_1(capsys):
    overrides = ["recipe=qwen3_14b_joint", "parallel.tensor=1", "train.recompute=none", "plan.gpus=8"]
    assert main(["plan", *overrides]) == 1
    assert "DOES NOT FIT" in capsys.readouterr().out
    assert main(["plan", *overrides, "plan.gpu_memory_gb=1000"]) == 0


def test_recompute_and_fp8_change_the_activations_as_they_should():
    plans = {recompute: _plan("recipe=qwen3_8b_joint", f"train.recompute={recompute}") for recompute in
             ("none", "selective", "full")}
    activations = {recompute: plan.memory.activations.peak for recompute, plan in plans.items()}
    assert activations["full"] < activations["selective"] <= activations["none"]
    fp8 = _plan("recipe=qwen3_8b_joint", "train.recompute=none", "train.fp8=hybrid")
    assert fp8.memory.activations.layers < plans["none"].memory.activations.layers
    assert fp8.memory.states.fp8_weight_copies > 0
    assert plans["none"].flops.model == plans["full"].flops.model < plans["full"].flops.kernel


def test_the_dense_mask_is_what_flex_avoids():
    flex, dense = _plan("recipe=qwen3_8b_joint"), _plan("recipe=qwen3_8b_joint", "diffusion.attention_kernel=sdpa")
    assert flex.memory.mask.held < 1e6 < dense.memory.mask.held
    assert dense.flops.kernel > flex.flops.kernel and dense.flops.model == flex.flops.model


def test_pipeline_and_context_parallelism_split_the_model_and_the_sequence():
    base = _plan("recipe=qwen3_8b_joint", "plan.gpus=64", "train.recompute=none")
    piped = _plan("recipe=qwen3_8b_joint", "plan.gpus=64", "train.recompute=none", "parallel.pipeline=2")
    context = _plan("recipe=qwen3_8b_joint", "plan.gpus=64", "train.recompute=none", "parallel.context=2")
    assert piped.memory.parameters.numel < base.memory.parameters.numel and piped.communication.pipeline > 0
    assert piped.memory.activations.in_flight == 2
    assert context.run.local_tokens * 2 == base.run.local_tokens and context.communication.context > 0
    assert base.communication.pipeline == base.communication.context == 0


@pytest.mark.parametrize("overrides,message", [
    (["plan.gpus=6", "parallel.tensor=4"], "world size 6 is not divisible by parallel.tensor x parallel.pipeline"),
    (["plan.gpus=48"], "train.global_batch_size=512 is not a multiple of train.micro_batch_size x data-parallel"),
    (["parallel.tensor=3", "plan.gpus=3"], "impossible layout for Qwen/Qwen3-8B-Base: 32 attention heads do not "
                                           "split over parallel.tensor=3"),
    (["plan.gpu_memory_gb=0"], "plan.gpu_memory_gb=0.0 must be > 0"),
    (["plan.mfu=0"], "plan.mfu=0.0 must be in (0, 1]"),
    (["plan.mfu=1.5"], "plan.mfu=1.5 must be in (0, 1]"),
    (["plan.device=cpu", "train.fp8=hybrid"], "train.fp8=hybrid needs plan.device=gpu"),
])
def test_bad_input_is_one_clear_error(capsys, overrides, message):
    assert main(["plan", "recipe=qwen3_8b_joint", *overrides]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and message in captured.err and len(captured.err.strip().splitlines()) == 1


def test_no_model_to_plan_and_json_on_another_stage_are_refused(capsys):
    assert main(["plan", "recipe=tiny"]) == 2
    assert "no model to plan for" in capsys.readouterr().err
    assert main(["train", "recipe=tiny", "--json"]) == 2
    assert "unknown option '--json'" in capsys.readouterr().err


def test_fp8_is_planned_on_a_machine_without_gpu():
    assert _plan("recipe=qwen3_8b_joint", "train.fp8=hybrid").run.fp8


def test_an_init_checkpoint_is_planned_as_train_builds_it(run_setup):
    cfg, _ = run_setup
    plan = make_plan(cfg("plan.gpus=1", "plan.device=cpu", stage="plan"))
    assert plan.run.shape.source.startswith("the init checkpoint") and plan.run.shape.qk_norm
    described = make_plan(cfg("plan.gpus=1", "plan.device=cpu", "model.hidden_size=96", "model.num_layers=2",
                              "model.num_attention_heads=4", "model.num_key_value_heads=2", "model.ffn_hidden_size=128",
                              "model.vocab_size=304", stage="plan"))
    assert described.run.shape == plan.run.shape
    assert any("hidden_size 96 vs 64" in note for note in described.notes)


def test_a_drafter_run_is_planned_as_an_upper_bound_and_says_so():
    drafter = _plan("recipe=llama3_1_8b_joint", "train.objective=drafter")
    joint = _plan("recipe=llama3_1_8b_joint")
    assert drafter.memory.total == joint.memory.total
    assert any("upper bound" in note and "adapters only" in note for note in drafter.notes)
    assert not any("upper bound" in note for note in joint.notes)
