"""GPU checks: the Transformer Engine layer spec, a joint bf16 step, FP8 settings.

Marked ``gpu``: deselected by the default suite, run with ``pytest -m gpu`` (launch/gpu_smoke.sh does), and
skipped by tests/conftest.py on a machine without CUDA.
"""

import math

import pytest
import torch

from ar2dlm.config import compose_stage
from ar2dlm.conversion.convert import convert
from ar2dlm.data.synthetic import examples, write_jsonl
from ar2dlm.model.checkpoint import load_model
from ar2dlm.training.loop import Trainer
from ar2dlm.training.parallel_setup import configure_provider

pytestmark = pytest.mark.gpu


def _fp8_capable() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)


@pytest.fixture
def train_cfg(make_tiny_hf, tmp_path, megatron_ready):
    """compose(name, *overrides): a one-step bf16 joint run of a tiny converted Qwen3 on the demo corpus."""
    convert(make_tiny_hf("Qwen3ForCausalLM"), tmp_path / "converted")
    corpus = write_jsonl(tmp_path / "corpus.jsonl", list(examples(200, seed=0)))

    def compose(name: str, *overrides: str):
        return compose_stage("train", [
            f"init={tmp_path / 'converted'}", f"output={tmp_path / name}", "recipe=tiny",
            f"data.sources=[{{path: {corpus}}}]", "data.seq_length=64", "diffusion.block_size=16",
            "train.objective=joint", "train.steps=1", "train.global_batch_size=4", "train.micro_batch_size=2",
            "train.precision=bf16", "optim.warmup_steps=0", "checkpoint.save_interval=0", *overrides,
        ])

    return compose


def _assert_finite_step(history: list[dict]) -> dict:
    assert len(history) == 1
    step = history[0]
    for key in ("loss", "ar_loss", "dlm_loss", "grad_norm", "tokens_per_s"):
        assert math.isfinite(step[key]) and step[key] > 0, (key, step)
    return step


def test_transformer_engine_spec_on_cuda_and_one_joint_bf16_step(train_cfg):
    from ar2dlm.model.gpt import use_transformer_engine

    assert use_transformer_engine()
    trainer = Trainer(train_cfg("bf16"))
    modules = [module for chunk in trainer.model for module in chunk.modules()]
    assert any(type(m).__name__.startswith("TE") for m in modules), "no Transformer Engine layer in the model"
    parameters = [p for chunk in trainer.model for p in chunk.parameters()]
    assert all(p.is_cuda for p in parameters)
    bf16_elements = sum(p.numel() for p in parameters if p.dtype == torch.bfloat16)
    assert bf16_elements > 0.9 * sum(p.numel() for p in parameters)  # norms may stay in fp32
    _assert_finite_step(trainer.fit())


def test_fp8_settings_reach_the_model_on_a_gpu(train_cfg):
    cfg = train_cfg("fp8", "train.fp8=hybrid", "train.fp8_recipe=delayed")  # validation accepts FP8 on a GPU
    chunks, _, _ = load_model(cfg.init, params_dtype=torch.bfloat16, seq_length=cfg.data.seq_length,
                              configure=lambda provider: configure_provider(provider, cfg))
    config = chunks[0].config
    assert (config.fp8, config.fp8_recipe, config.fp8_param) == ("hybrid", "delayed", False)


@pytest.mark.skipif(not _fp8_capable(), reason="FP8 needs compute capability 8.9 or newer (Ada, Hopper, ...)")
def test_one_joint_fp8_step_is_close_to_bf16(train_cfg):
    bf16 = _assert_finite_step(Trainer(train_cfg("bf16")).fit())
    fp8 = _assert_finite_step(Trainer(train_cfg("fp8", "train.fp8=hybrid", "train.fp8_recipe=delayed")).fit())
    assert fp8["loss"] == pytest.approx(bf16["loss"], rel=0.05)


def test_one_drafter_bf16_step_with_the_split_forward(train_cfg):
    """The drafter on Transformer Engine layers: megatron-bridge's LoRA on TE linears, the split forward's clean
    pass (flex attention) and draft pass (SDPA over the clean keys and the plan's draft keys) in bf16."""
    from ar2dlm.model.draft_pass import DrafterTransformerBlock

    trainer = Trainer(train_cfg("drafter", "train.objective=drafter", "drafter.rank=4", "drafter.alpha=16"))
    assert any(isinstance(m, DrafterTransformerBlock) for chunk in trainer.model for m in chunk.modules())
    _assert_finite_step(trainer.fit())
