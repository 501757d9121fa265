"""Fixtures of the training tests."""

import pytest

from ar2dlm.config import compose_stage
from ar2dlm.conversion.convert import convert
from ar2dlm.data.synthetic import examples, write_jsonl


@pytest.fixture
def wrapped_model(tiny_provider):
    """The tiny model configured as the trainer configures it (default train config), data-parallel wrapped."""
    from ar2dlm.config import compose_stage
    from ar2dlm.model.gpt import build_model
    from ar2dlm.training.data_parallel import wrap_data_parallel
    from ar2dlm.training.parallel_setup import configure_provider

    cfg = compose_stage("train", ["init=a", "output=b"], require_complete=False)
    return wrap_data_parallel(build_model(configure_provider(tiny_provider, cfg)), cfg)


@pytest.fixture
def run_setup(make_tiny_hf, tmp_path, megatron_ready):
    """``cfg(*overrides)`` composes a tiny joint-training config on a converted Qwen3; returns (cfg, output)."""
    source = make_tiny_hf("Qwen3ForCausalLM", tied=True)
    convert(source, tmp_path / "converted")
    corpus = write_jsonl(tmp_path / "corpus.jsonl", list(examples(200, seed=0)))

    def cfg(*overrides):
        return compose_stage("train", [
            f"init={tmp_path / 'converted'}", f"output={tmp_path / 'run'}", "recipe=tiny",
            f"data.sources=[{{path: {corpus}}}]", "data.seq_length=32", "diffusion.block_size=8",
            "train.global_batch_size=4", "train.micro_batch_size=2", "optim.lr=3e-3", "optim.warmup_steps=1",
            *overrides,
        ])

    return cfg, tmp_path / "run"
