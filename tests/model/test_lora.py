"""The drafter's LoRA adapters on megatron-core layers (ar2dlm/model/lora.py)."""

import pytest
import torch

from ar2dlm.errors import UserError
from ar2dlm.model.core_attention import AttentionLayout
from ar2dlm.model.gpt import build_model
from ar2dlm.model.lora import (
    LoraSettings,
    adapter_mode,
    adapter_tensors,
    adapters,
    add_lora,
    remove_adapters,
    set_adapter_mode,
    trainable_parameters,
)

LENGTH = 8


def _logits(model, ids, layout="causal"):
    with torch.no_grad():
        return model(ids, None, AttentionLayout(layout, LENGTH if layout != "causal" else ids.shape[1],
                                                block_size=4, kernel="sdpa"))


def _ids(batch=2, length=LENGTH, seed=0):
    return torch.randint(0, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


def _randomise_b(chunks, seed=1):
    generator = torch.Generator().manual_seed(seed)
    for (_, _), (_, b) in adapter_tensors(chunks).items():
        with torch.no_grad():
            b.copy_(torch.randn(b.shape, generator=generator) * 0.5)


def test_zero_init_adapter_leaves_the_logits_unchanged(tiny_provider):
    torch.manual_seed(0)
    chunks = build_model(tiny_provider)
    model = chunks[0].eval()
    ids = _ids()
    before = _logits(model, ids)
    add_lora(chunks, LoraSettings(rank=4, alpha=8))
    assert torch.equal(_logits(model, ids), before)
    _randomise_b(chunks)
    assert (_logits(model, ids) - before).abs().max() > 1e-3  # a trained adapter changes them
    with adapter_mode(chunks, "off"):
        assert torch.equal(_logits(model, ids), before)
    assert (_logits(model, ids) - before).abs().max() > 1e-3  # the mode is restored on exit


def test_only_adapters_are_trainable_and_shaped_like_peft(tiny_provider):
    chunks = add_lora(build_model(tiny_provider), LoraSettings(rank=4, alpha=8, target_modules=("linear_proj",)))
    names = [name for name, _ in trainable_parameters(chunks)]
    assert names == [f"decoder.layers.{i}.self_attention.linear_proj.adapter.{part}.weight"
                     for i in range(2) for part in ("linear_in", "linear_out")]
    tensors = adapter_tensors(chunks)
    assert sorted(tensors) == [(1, "linear_proj"), (2, "linear_proj")]
    a, b = tensors[(1, "linear_proj")]
    assert a.shape == (4, 64) and b.shape == (64, 4) and not b.any() and a.abs().max() <= 64 ** -0.5


def test_adapter_is_w_plus_scaled_b_a(tiny_provider):
    """An adapter on linear_proj computes what the base model computes with W + B @ A * alpha / rank."""
    torch.manual_seed(0)
    base = build_model(tiny_provider)
    state = {k: v.clone() for k, v in base[0].state_dict().items() if torch.is_tensor(v)}
    adapted = add_lora(base, LoraSettings(rank=4, alpha=12))
    _randomise_b(adapted)
    ids = _ids()
    with_adapter = _logits(adapted[0].eval(), ids)
    tensors = adapter_tensors(adapted)
    torch.manual_seed(0)
    merged = build_model(tiny_provider)[0].eval()
    merged.load_state_dict(state, strict=False)
    with torch.no_grad():
        for index, layer in enumerate(merged.decoder.layers):
            a, b = tensors[(index + 1, "linear_proj")]
            layer.self_attention.linear_proj.weight += b @ a * (12 / 4)
    torch.testing.assert_close(_logits(merged, ids), with_adapter, rtol=0, atol=1e-5)


@pytest.mark.parametrize("targets", [("linear_proj",), ("linear_qkv", "linear_fc1", "linear_fc2")])
def test_noisy_stream_mode_keeps_the_clean_stream_adapter_free(tiny_provider, targets):
    torch.manual_seed(0)
    chunks = add_lora(build_model(tiny_provider), LoraSettings(rank=4, alpha=8, target_modules=targets))
    _randomise_b(chunks)
    model = chunks[0].eval()
    doubled = torch.cat([_ids(seed=3), _ids(seed=4)], dim=1)
    with adapter_mode(chunks, "off"):
        off = _logits(model, doubled, "doubled_causal")
    on = _logits(model, doubled, "doubled_causal")
    set_adapter_mode(chunks, "noisy_stream")
    stream = _logits(model, doubled, "doubled_causal")
    assert torch.equal(stream[:, LENGTH:], off[:, LENGTH:])  # the clean stream is the adapter-free causal pass
    assert (stream[:, :LENGTH] - off[:, :LENGTH]).abs().max() > 1e-3  # the noisy stream sees the adapter
    assert (stream[:, :LENGTH] - on[:, :LENGTH]).abs().max() > 1e-4  # ... over an adapter-free clean context


def _whole_sequence_noisy_stream(self, x, *args, **kwargs):
    """The noisy_stream mode as plain autograd sees it: the base on the whole sequence, the adapter on the first
    half (the reference the split forward must equal)."""
    output, bias, layernorm_output = self.base_linear_forward(x, *args, **kwargs)
    half = output.shape[0] // 2
    noisy = self.adapter(layernorm_output[:half].contiguous()).reshape(output[:half].shape)
    return torch.cat([output[:half] + noisy, output[half:]]), bias


def test_noisy_stream_gradients_equal_those_of_the_whole_sequence_graph(tiny_provider, monkeypatch):
    """The split forward runs the clean half outside autograd; the adapters' gradients are the same."""
    doubled = torch.cat([_ids(seed=5), _ids(seed=6)], dim=1)

    def adapter_gradients():
        torch.manual_seed(0)
        chunks = add_lora(build_model(tiny_provider), LoraSettings(rank=4, alpha=8, target_modules=(
            "linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")))
        _randomise_b(chunks)
        set_adapter_mode(chunks, "noisy_stream")
        logits = chunks[0](doubled, None, AttentionLayout("doubled_causal", LENGTH, block_size=4, kernel="sdpa"))
        (logits[:, :LENGTH].float().square().mean() + logits[:, LENGTH:].float().mean()).backward()
        return logits.detach(), [p.grad.clone() for _, p in trainable_parameters(chunks)]

    split_logits, split = adapter_gradients()
    wrapper_class = type(next(adapters_of(tiny_provider)))
    monkeypatch.setattr(wrapper_class, "_noisy_stream_forward", _whole_sequence_noisy_stream)
    whole_logits, whole = adapter_gradients()
    torch.testing.assert_close(split_logits, whole_logits, rtol=0, atol=1e-6)
    assert len(split) == 16 and all(g.abs().max() > 0 for g in split)
    for split_grad, whole_grad in zip(split, whole, strict=True):
        torch.testing.assert_close(split_grad, whole_grad, rtol=1e-5, atol=1e-7)


def adapters_of(tiny_provider):
    from ar2dlm.model.lora import adapters

    chunks = add_lora(build_model(tiny_provider), LoraSettings(rank=2, alpha=2))
    return (wrapper for _, _, wrapper in adapters(chunks[0]))


def test_other_targets_and_removal(tiny_provider):
    torch.manual_seed(0)
    chunks = build_model(tiny_provider)
    ids = _ids()
    before = _logits(chunks[0].eval(), ids)
    add_lora(chunks, LoraSettings(rank=4, alpha=8, target_modules=("linear_qkv", "linear_fc1", "linear_fc2")))
    assert sorted({target for _, target in adapter_tensors(chunks)}) == ["linear_fc1", "linear_fc2", "linear_qkv"]
    _randomise_b(chunks)
    assert (_logits(chunks[0], ids) - before).abs().max() > 1e-3
    remove_adapters(chunks)
    assert adapter_tensors(chunks) == {}
    assert torch.equal(_logits(chunks[0], ids), before)


@pytest.mark.parametrize("targets, message", [
    (("o_projection",), "give one or more of"),
    ((), "give one or more of"),
    (("*.layers.9.*.linear_proj",), "matched no linear layer"),
    (("*.layers.0.*.linear_proj", "linear_fc1"), r"puts linear_proj adapters in layers 0 but not in 1"),
])
def test_no_trainable_target_is_one_clear_error(tiny_provider, targets, message):
    with pytest.raises(UserError, match=message):
        add_lora(build_model(tiny_provider), LoraSettings(rank=4, alpha=8, target_modules=targets))


def test_adapter_weights_round_trip_through_a_distributed_checkpoint(tiny_provider, tmp_path):
    from ar2dlm.model.checkpoint import load_weights, save_weights

    torch.manual_seed(0)
    chunks = add_lora(build_model(tiny_provider), LoraSettings(rank=4, alpha=8))
    _randomise_b(chunks)
    save_weights(chunks, tmp_path / "weights")
    torch.manual_seed(5)
    fresh = add_lora(build_model(tiny_provider), LoraSettings(rank=4, alpha=8, seed=99))
    load_weights(fresh, tmp_path / "weights")
    for key, (a, b) in adapter_tensors(chunks).items():
        assert torch.equal(adapter_tensors(fresh)[key][0], a) and torch.equal(adapter_tensors(fresh)[key][1], b)
    ids = _ids()
    assert torch.equal(_logits(fresh[0].eval(), ids), _logits(chunks[0].eval(), ids))


def test_a_pattern_matching_a_target_in_every_layer_is_accepted(tiny_provider):
    chunks = add_lora(build_model(tiny_provider), LoraSettings(rank=4, alpha=8, target_modules=("*.linear_fc*",)))
    assert sorted((layer, target) for layer, target, _ in adapters(chunks[0])) == [
        (1, "linear_fc1"), (1, "linear_fc2"), (2, "linear_fc1"), (2, "linear_fc2")]
