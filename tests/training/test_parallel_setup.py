import pytest
from omegaconf import OmegaConf

from ar2dlm.config import compose_stage
from ar2dlm.errors import UserError
from ar2dlm.training import parallel_setup
from ar2dlm.training.parallel_setup import configure_provider


class _Provider:
    """Stands in for a megatron-bridge provider: records the attributes the trainer sets."""


def _cfg(*overrides):
    return compose_stage("train", ["init=a", "output=b", *overrides], require_complete=False)


def test_layout_and_recompute_reach_the_model_config():
    provider = configure_provider(_Provider(), _cfg("train.recompute=selective"))
    assert (provider.tensor_model_parallel_size, provider.pipeline_model_parallel_size,
            provider.context_parallel_size) == (1, 1, 1)
    assert provider.recompute_granularity == "selective" and provider.recompute_modules == ["core_attn"]
    assert provider.calculate_per_token_loss is True
    full = configure_provider(_Provider(), _cfg("train.recompute=full"))
    assert (full.recompute_granularity, full.recompute_method, full.recompute_num_layers) == ("full", "uniform", 1)


def test_fp8_is_refused_without_a_gpu(monkeypatch):
    monkeypatch.setattr(parallel_setup, "cuda_available", lambda: False)
    cfg = OmegaConf.merge(_cfg(), {"train": {"fp8": "hybrid", "precision": "bf16"}})
    with pytest.raises(UserError, match="train.fp8=hybrid needs a CUDA GPU with Transformer Engine"):
        configure_provider(_Provider(), cfg)


@pytest.mark.parametrize("fp8, recipe", [("hybrid", "delayed"), ("e4m3", "tensorwise"), ("e4m3", "mxfp8")])
def test_fp8_settings_reach_the_model_config_on_a_gpu(monkeypatch, fp8, recipe):
    monkeypatch.setattr(parallel_setup, "cuda_available", lambda: True)
    cfg = OmegaConf.merge(_cfg(), {"train": {"fp8": fp8, "fp8_recipe": recipe, "precision": "bf16"}})
    provider = configure_provider(_Provider(), cfg)
    assert (provider.fp8, provider.fp8_recipe, provider.fp8_param) == (fp8, recipe, False)


def test_sequence_parallel_is_refused_without_a_gpu(monkeypatch):
    monkeypatch.setattr(parallel_setup, "cuda_available", lambda: False)
    cfg = OmegaConf.merge(_cfg(), {"parallel": {"tensor": 2, "sequence_parallel": True}})
    with pytest.raises(UserError, match="sequence_parallel needs a GPU"):
        configure_provider(_Provider(), cfg)
