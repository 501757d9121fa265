"""Conversion builds the Megatron model without initialising it and fills every parameter from the source."""

import pytest
from torch.utils._python_dispatch import TorchDispatchMode

from ar2dlm.conversion.convert import convert
from ar2dlm.errors import UserError

RANDOM_FILLS = {"aten::normal_", "aten::uniform_", "aten::random_", "aten::bernoulli_", "aten::exponential_",
                "aten::randn", "aten::rand", "aten::randint", "aten::normal"}


class RandomFills(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func._schema.name in RANDOM_FILLS:
            self.calls.append(func._schema.name)
        return func(*args, **(kwargs or {}))


def test_conversion_initialises_no_parameter_randomly(make_tiny_hf, tmp_path, megatron_ready):
    source = make_tiny_hf("Qwen3ForCausalLM")
    with RandomFills() as fills:
        convert(source, tmp_path / "converted")
    assert fills.calls == []


def test_a_parameter_the_bridge_leaves_unfilled_is_an_error(make_tiny_hf, tmp_path, megatron_ready, monkeypatch):
    def fill_all_but_the_final_norm(bridge, chunks, skip_vocab=False):
        for name, parameter in chunks[0].named_parameters():
            if name != "decoder.final_layernorm.weight":
                parameter.data.fill_(0.5)

    monkeypatch.setattr("ar2dlm.conversion.bridge.load_weights", fill_all_but_the_final_norm)
    with pytest.raises(UserError, match=r"filled no value from the source into decoder\.final_layernorm\.weight:"):
        convert(make_tiny_hf("LlamaForCausalLM"), tmp_path / "converted")
    assert not (tmp_path / "converted").exists()
