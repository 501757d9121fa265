"""`train.objective=drafter` through the training loop: frozen base, adapter checkpoints, resume, bad input."""

import json
import shutil

import pytest
import torch

from ar2dlm.config.compose import ConfigError
from ar2dlm.errors import UserError
from ar2dlm.model.checkpoint import METADATA_FILE
from ar2dlm.model.lora import METADATA_KEY
from ar2dlm.model.manifest import write_manifest
from ar2dlm.training.loop import Trainer

DRAFTER = ("train.objective=drafter", "drafter.rank=4", "drafter.alpha=16", "drafter.top_k=16", "optim.lr=1e-2",
           "optim.weight_decay=0")


def _params(trainer):
    return {name: p.detach().clone() for name, p in trainer.unwrapped_model[0].named_parameters()}


def test_a_drafter_step_changes_only_the_adapters(run_setup):
    cfg, output = run_setup
    trainer = Trainer(cfg(*DRAFTER, "train.steps=3", "checkpoint.save_interval=0"))
    before = _params(trainer)
    assert all((".adapter." in name) == p.requires_grad
               for name, p in trainer.unwrapped_model[0].named_parameters())
    history = trainer.fit()
    after = _params(trainer)
    for name, value in before.items():
        if ".adapter." in name:
            assert not torch.equal(after[name], value), name  # B leaves zero, A moves once B is not zero
        else:
            assert torch.equal(after[name], value), name  # bitwise: the verifier never changes
    assert all(h["loss"] > 0 and h["grad_norm"] > 0 for h in history)
    saved = json.loads((output / "checkpoints" / "step_0000003" / METADATA_FILE).read_text())
    assert saved["extra"][METADATA_KEY] == {"rank": 4, "alpha": 16.0, "target_modules": ["linear_proj"]}


def test_a_drafter_run_keeps_what_its_base_was_trained_for(run_setup, tmp_path):
    """The base's decoding block and training block pass through a drafter run that drafts another block size:
    the drafter trains no base weight, so it must not rewrite what the export decodes with."""
    cfg, output = run_setup
    init = tmp_path / "joint"
    shutil.copytree(cfg().init, init)
    metadata = json.loads((init / METADATA_FILE).read_text())
    metadata.update(block_size=4, extra={**metadata["extra"], "train_block_size": 8})
    (init / METADATA_FILE).write_text(json.dumps(metadata))
    write_manifest(init)
    Trainer(cfg(*DRAFTER, f"init={init}", "diffusion.block_size=16", "train.steps=1",
                "checkpoint.save_interval=1")).fit()
    saved = json.loads((output / "checkpoints" / "step_0000001" / METADATA_FILE).read_text())
    assert (saved["block_size"], saved["extra"]["train_block_size"]) == (4, 8)


def test_drafter_resume_reproduces_the_uninterrupted_losses(run_setup, tmp_path, kill_at):
    cfg, output = run_setup
    uninterrupted = Trainer(cfg(*DRAFTER, "train.steps=4", "checkpoint.save_interval=0",
                                f"output={tmp_path / 'reference'}")).fit()
    kill_at(3)
    with pytest.raises(KeyboardInterrupt):
        Trainer(cfg(*DRAFTER, "train.steps=4", "checkpoint.save_interval=2")).fit()
    kill_at(-1)
    resumed = Trainer(cfg(*DRAFTER, "train.steps=4", "checkpoint.save_interval=2", "resume=true"))
    assert resumed.step == 2
    adapters = {n: p for n, p in _params(resumed).items() if ".adapter.linear_out" in n}
    assert adapters and all(p.any() for p in adapters.values())  # the adapters came back from the checkpoint
    history = resumed.fit()
    assert [round(h["loss"], 10) for h in history] == [round(h["loss"], 10) for h in uninterrupted[2:]]


def test_a_drafter_checkpoint_initialises_a_new_drafter_run_with_its_adapter(run_setup, tmp_path):
    cfg, output = run_setup
    Trainer(cfg(*DRAFTER, "train.steps=2", "checkpoint.save_interval=2")).fit()
    checkpoint = output / "checkpoints" / "step_0000002"
    trained = {n: p for n, p in _params(Trainer(cfg(*DRAFTER, f"init={checkpoint}",
                                                    f"output={tmp_path / 'second'}"))).items()}
    assert all(p.any() for n, p in trained.items() if ".adapter.linear_out" in n)
    with pytest.raises(UserError, match="holds a drafter adapter with .* set drafter.rank"):
        Trainer(cfg(*DRAFTER, "drafter.rank=2", f"init={checkpoint}", f"output={tmp_path / 'third'}"))


def test_a_checkpoint_without_a_mask_token_is_refused(run_setup, tmp_path):
    cfg, _ = run_setup
    init = tmp_path / "no-mask"
    shutil.copytree(cfg().init, init)
    metadata = json.loads((init / METADATA_FILE).read_text())
    metadata["mask_token_id"] = None
    (init / METADATA_FILE).write_text(json.dumps(metadata))
    with pytest.raises(UserError, match="needs a checkpoint with a mask token, and .* has none"):
        Trainer(cfg(*DRAFTER, f"init={init}"))


@pytest.mark.parametrize("override, message", [
    ("drafter.target_modules=[o_projection]", "has no trainable target"),
    ("drafter.target_modules=[]", "has no trainable target"),
    ("diffusion.clean_pattern=block_causal", "needs diffusion.clean_pattern=causal"),
    ("drafter.kl_temperature=0", "drafter.kl_temperature=0.0 must be > 0"),
    ("drafter.ce_target=corpus", "drafter.ce_target='corpus' must be one of: data, verifier"),
    ("diffusion.complementary_masking=true", "has no noise: diffusion.complementary_masking does not apply"),
])
def test_bad_drafter_configs_are_one_message(run_setup, override, message):
    cfg, _ = run_setup
    with pytest.raises(ConfigError) as error:
        cfg(*DRAFTER, override)
    assert message in str(error.value)


def test_a_drafter_may_draft_blocks_of_random_sizes(run_setup):
    """What the demo's drafter stage does (it inherits the joint stage's random_block_prob): `train` accepts it."""
    cfg, _ = run_setup
    assert cfg(*DRAFTER, "diffusion.random_block_prob=1.0").diffusion.random_block_prob == 1.0


def test_a_pattern_matching_no_layer_is_refused(run_setup):
    cfg, _ = run_setup
    with pytest.raises(UserError, match="matched no linear layer"):
        Trainer(cfg(*DRAFTER, "drafter.target_modules=['*.layers.7.*.linear_proj']"))


@pytest.mark.parametrize("recompute", ["full", "selective"])
def test_activation_recompute_gives_the_same_drafter_steps(run_setup, tmp_path, recompute):
    """With every base weight frozen, recompute must still give the adapters their gradients."""
    cfg, _ = run_setup
    plain = Trainer(cfg(*DRAFTER, "train.steps=3", "checkpoint.save_interval=0",
                        f"output={tmp_path / 'plain'}")).fit()
    recomputed = Trainer(cfg(*DRAFTER, "train.steps=3", "checkpoint.save_interval=0", f"train.recompute={recompute}",
                             f"output={tmp_path / recompute}")).fit()
    for a, b in zip(plain, recomputed, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6) and a["grad_norm"] == pytest.approx(b["grad_norm"],
                                                                                                   rel=1e-5)
    assert plain[0]["grad_norm"] > 0 and plain[-1]["loss"] != plain[0]["loss"]


def test_a_joint_run_from_a_drafter_checkpoint_drops_the_adapter(run_setup, tmp_path):
    from ar2dlm.conversion.export import export
    from ar2dlm.conversion.lora_export import PEFT_DIR

    cfg, output = run_setup
    Trainer(cfg(*DRAFTER, "train.steps=2", "checkpoint.save_interval=2")).fit()
    Trainer(cfg("train.steps=1", f"init={output / 'checkpoints' / 'step_0000002'}",
                f"output={tmp_path / 'joint'}")).fit()
    joint = tmp_path / "joint" / "checkpoints" / "step_0000001"
    assert METADATA_KEY not in json.loads((joint / METADATA_FILE).read_text())["extra"]
    export(joint, tmp_path / "hf")
    assert not (tmp_path / "hf" / PEFT_DIR).exists()
