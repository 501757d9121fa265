import pytest
from omegaconf import OmegaConf
from omegaconf.errors import ReadonlyConfigError

from ar2dlm.config import ConfigError, compose_stage, recipes_dir, required_keys, stage_keys
from ar2dlm.config.schema import STAGE_SCHEMAS

REQUIRED = {stage: [f"{key}=x" for key in required_keys(stage)] for stage in STAGE_SCHEMAS}
REQUIRED["generate"].append("prompt=x")  # prompt=TEXT or prompt_file=PATH: one of the two


@pytest.mark.parametrize("stage", list(STAGE_SCHEMAS))
def test_every_stage_composes_with_its_required_keys(stage):
    cfg = compose_stage(stage, REQUIRED[stage])
    assert not OmegaConf.missing_keys(cfg)
    assert cfg.logging.level == "INFO"


def test_defaults_come_from_the_schema_and_overrides_apply():
    cfg = compose_stage("train", REQUIRED["train"] + ["train.steps=7", "train.objective=diffusion",
                                                      "diffusion.clean_pattern=block_causal"])
    assert cfg.train.steps == 7
    assert cfg.diffusion.clean_pattern == "block_causal"
    assert cfg.diffusion.dlm_loss_weight == 0.3 and cfg.diffusion.ar_loss_weight == 1.0
    assert cfg.optim.beta2 == 0.95 and cfg.optim.weight_decay == 0.1


@pytest.mark.parametrize("stage", ["train", "run"])
def test_the_old_spelling_of_no_clean_stream_is_accepted_with_one_warning(stage, caplog):
    overrides = REQUIRED[stage] + ["train.objective=diffusion", "diffusion.clean_pattern=bidirectional"]
    with caplog.at_level("WARNING", logger="ar2dlm"):
        cfg = compose_stage(stage, overrides)
    assert cfg.diffusion.clean_pattern == "none"
    assert caplog.messages == ["diffusion.clean_pattern=bidirectional is deprecated: it is now spelled "
                               "diffusion.clean_pattern=none"]
    with pytest.raises(ConfigError, match="clean_pattern=none .* needs train.objective=diffusion"):
        compose_stage(stage, REQUIRED[stage] + ["train.objective=joint", "diffusion.clean_pattern=bidirectional"])


def test_named_recipe_is_applied_and_overrides_win():
    cfg = compose_stage("train", REQUIRED["train"] + ["recipe=tiny", "train.steps=9"])
    assert cfg.data.seq_length == 64
    assert cfg.train.steps == 9


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["bogus=1"], "unknown key 'bogus'"),
        (["train.bogus=1"], "unknown key 'train.bogus'"),
        (["train.steps=abc"], "bad value for 'train.steps'"),
        (["data.seq_length=100"], "not a multiple of diffusion.block_size=32"),
        (["train.objective=magic"], "train.objective='magic' is not one of: ar, joint, diffusion"),
        (["train.global_batch_size=7"], "not a multiple of train.micro_batch_size"),
        (["optim.lr=0"], "optim.lr > 0"),
        (["recipe=nope"], "Could not find 'recipe/nope'; available recipes: demo, "),
        (["parallel.sequence_parallel=true"], "needs parallel.tensor > 1"),
        (["diffusion.eps=0.9"], "diffusion.eps=0.9 must be in"),
        (["not-an-override"], "key=value"),
    ],
)
def test_bad_train_configs_are_refused_with_one_message(overrides, message):
    with pytest.raises(ConfigError, match=None) as error:
        compose_stage("train", REQUIRED["train"] + overrides)
    assert message in str(error.value)
    assert "\n" not in str(error.value)


def test_world_size_must_divide_by_the_model_parallel_size(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(ConfigError, match="world size 4 is not divisible by .* = 3"):
        compose_stage("train", REQUIRED["train"] + ["parallel.tensor=3"])
    cfg = compose_stage("train", REQUIRED["train"] + ["parallel.tensor=2", "train.global_batch_size=8"])
    assert cfg.parallel.tensor == 2


def test_fp8_is_refused_without_a_gpu():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(ConfigError, match="needs a CUDA GPU with Transformer Engine"):
        compose_stage("train", REQUIRED["train"] + ["train.fp8=hybrid", "train.precision=bf16"])


def test_missing_required_keys_are_named():
    with pytest.raises(ConfigError, match="missing required key.*init, output"):
        compose_stage("train", [])


def test_recipe_for_another_stage_is_explained():
    with pytest.raises(ConfigError, match="recipe 'tiny' sets 'train', which this stage does not have"):
        compose_stage("convert", REQUIRED["convert"] + ["recipe=tiny"])


@pytest.mark.parametrize(
    "stage, overrides, message",
    [
        ("generate", ["threshold=1.5"], "threshold=1.5 must be in [0.0, 1.0]"),
        ("generate", ["max_new_tokens=0"], "max_new_tokens=0 must be >= 1"),
        ("generate", ["mode=beam"], "mode='beam' is not one of"),
        ("convert", ["mask_token_id=-3"], "mask_token_id=-3 must be >= 0"),
        ("eval", ["modes=[ar,beam]"], "modes: 'beam' is not one of"),
        ("generate", ["sub_block_length=0"], "sub_block_length=0 must be >= 1"),
        ("eval", ["confidence=entropy"], "confidence='entropy' is not one of: probability, position"),
        ("eval", ["position_decay=0"], "position_decay=0.0 must be in (0, 1]"),
    ],
)
def test_other_stages_validate_values(stage, overrides, message):
    with pytest.raises(ConfigError) as error:
        compose_stage(stage, REQUIRED[stage] + overrides)
    assert message in str(error.value)


def test_composed_config_is_read_only():
    cfg = compose_stage("train", REQUIRED["train"])
    with pytest.raises(ReadonlyConfigError):
        cfg.train.steps = 3


def test_stage_keys_list_every_leaf_with_its_default():
    keys = dict(stage_keys("train"))
    assert keys["train.steps"] == 100
    assert keys["diffusion.block_size"] == 32
    assert keys["init"] == "???"


def test_recipes_dir_holds_a_config_per_stage():
    for stage in STAGE_SCHEMAS:
        assert (recipes_dir() / f"{stage}.yaml").is_file()


def test_context_parallel_needs_two_chunks_per_rank(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(ConfigError, match=r"data.seq_length=36 must be a multiple of 2 x parallel.context = 8"):
        compose_stage("train", REQUIRED["train"] + ["data.seq_length=36", "diffusion.block_size=4",
                                                    "parallel.context=4", "train.global_batch_size=4",
                                                    "train.micro_batch_size=1"])
