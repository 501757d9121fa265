"""The training levers' keys (docs/design.md §2.7): defaults that keep today's training, one clear error each."""

import pytest

from ar2dlm.config import ConfigError, compose_stage, required_keys

TRAIN = [f"{key}=x" for key in required_keys("train")]


def test_defaults_leave_the_levers_off():
    diffusion = compose_stage("train", TRAIN).diffusion
    assert diffusion.loss_normalization == "shared"
    assert diffusion.complementary_masking is False
    assert diffusion.random_block_prob == 0.0 and list(diffusion.random_block_sizes) == []
    assert diffusion.decode_block_size is None


@pytest.mark.parametrize("overrides, message", [
    (["diffusion.loss_normalization=mean"], "diffusion.loss_normalization='mean' is not one of: shared, per_term"),
    (["diffusion.random_block_prob=1.5"], "diffusion.random_block_prob=1.5 must be in [0.0, 1.0]"),
    (["diffusion.random_block_prob=-0.1"], "diffusion.random_block_prob=-0.1 must be in [0.0, 1.0]"),
    (["diffusion.random_block_sizes=[4,12]"], "each must divide diffusion.block_size=32 (offending: [12])"),
    (["diffusion.random_block_sizes=[0]"], "each must divide diffusion.block_size=32 (offending: [0])"),
    (["diffusion.decode_block_size=0"], "diffusion.decode_block_size=0 must be >= 1"),
    (["train.objective=ar", "diffusion.complementary_masking=true"],
     "diffusion.complementary_masking needs a diffusion loss"),
    (["train.objective=ar", "diffusion.random_block_prob=0.5"], "diffusion.random_block_prob > 0 needs a diffusion"),
])
def test_bad_lever_values_are_refused_with_one_message(overrides, message):
    with pytest.raises(ConfigError) as error:
        compose_stage("train", TRAIN + overrides)
    assert message in str(error.value)
    assert "\n" not in str(error.value)


def test_good_lever_values_compose():
    cfg = compose_stage("train", TRAIN + ["diffusion.block_size=64", "diffusion.decode_block_size=32",
                                          "diffusion.random_block_prob=0.25", "diffusion.random_block_sizes=[16,32]",
                                          "diffusion.complementary_masking=true",
                                          "diffusion.loss_normalization=per_term", "data.seq_length=128"])
    assert cfg.diffusion.decode_block_size == 32 and list(cfg.diffusion.random_block_sizes) == [16, 32]


def test_the_drafter_stages_random_block_share_is_a_probability():
    cfg = compose_stage("run", ["recipe=demo", "output=x"])
    assert cfg.drafter_stage.random_block_prob == 0.0 and cfg.diffusion.random_block_prob == 1.0
    assert compose_stage("run", ["output=x", "init=x"]).drafter_stage.random_block_prob is None  # the joint's
    with pytest.raises(ConfigError, match=r"drafter_stage.random_block_prob=1.5 must be in \[0.0, 1.0\]"):
        compose_stage("run", ["recipe=demo", "output=x", "drafter_stage.random_block_prob=1.5"])
