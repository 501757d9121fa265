"""A real training step on a tiny model, and its plan: what the planning tests compare."""

from dataclasses import dataclass

import pytest
import torch

# Big enough that activations outweigh the model (as at scale), small enough for a CPU second: Qwen3-style
# q/k norms and a head width that is not hidden / heads.
TINY_SHAPE = dict(hidden_size=128, intermediate_size=384, num_attention_heads=4, num_key_value_heads=2, head_dim=32)
STEP = ("data.seq_length=256", "diffusion.block_size=8", "train.global_batch_size=4", "train.micro_batch_size=2")


@dataclass
class PlannedStep:
    """A Trainer built by the real training code, one step's prepared micro-batches, and the plan of its config."""

    trainer: object
    batches: list
    plan: object

    def forward_backward(self, micro_batches: int | None = None) -> None:
        """The forward and backward passes of the step's first ``micro_batches`` (all: None), as the trainer runs
        them (gradients accumulate)."""
        from ar2dlm.training.schedule import forward_backward

        batches = self.batches[:micro_batches]
        tokens = torch.stack([batch.loss_tokens for batch in self.batches]).sum()
        forward_backward(self.trainer.model, batches, self.trainer.settings, tokens)


@pytest.fixture
def planned_step(make_run_setup):
    """``planned_step(*overrides, architecture=..., tied=..., **hf_config)``: a Trainer for the tiny config with
    those overrides, and the CPU plan of the same config."""
    from ar2dlm.planning.report import make_plan
    from ar2dlm.training.loop import Trainer

    def make(*overrides, architecture: str = "Qwen3ForCausalLM", tied: bool = False, **hf_config) -> PlannedStep:
        cfg, _ = make_run_setup(architecture, tied=tied, **{**TINY_SHAPE, **hf_config})
        trainer = Trainer(cfg(*STEP, *overrides))
        batches = [trainer._prepare(batch, 1) for batch in trainer.loader.next_step()]
        plan = make_plan(cfg(*STEP, *overrides, "plan.device=cpu", "plan.gpus=1", stage="plan"))
        return PlannedStep(trainer, batches, plan)

    return make


@pytest.fixture(autouse=True)
def no_launch_world_size(monkeypatch):
    """plan.gpus defaults to the launch's WORLD_SIZE: plans here must not depend on the shell they run in."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)


@pytest.fixture
def bridge_model(megatron_ready):
    """``bridge_model(plan)``: the fields megatron-bridge's memory and FLOP estimators read from a GPT provider,
    for the planned model and layout (no padding of the vocabulary, as the recipes' models build)."""
    from types import SimpleNamespace

    import torch.nn.functional as F

    def make(plan) -> SimpleNamespace:
        s, run = plan.run.shape, plan.run
        return SimpleNamespace(
            num_layers=s.num_layers, hidden_size=s.hidden_size, num_attention_heads=s.num_attention_heads,
            num_query_groups=s.num_key_value_heads, kv_channels=s.head_dim, ffn_hidden_size=s.ffn_hidden_size,
            vocab_size=s.vocab_size, make_vocab_size_divisible_by=1, should_pad_vocab=False,
            share_embeddings_and_output_weights=s.tied_embeddings, gated_linear_unit=True, activation_func=F.silu,
            tensor_model_parallel_size=run.tensor, pipeline_model_parallel_size=run.pipeline,
            seq_length=run.positions, num_moe_experts=None, mtp_num_layers=None, moe_ffn_hidden_size=None,
            moe_shared_expert_intermediate_size=None, multi_latent_attention=False)

    return make
