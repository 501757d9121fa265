"""The drafter LoRA in the runtime: found next to the weights, seen by draft tokens only, the same adapter as
PEFT's, and self-speculation still AR's tokens with it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from ar2dlm.conversion.hf_source import SUPPORTED_ARCHITECTURES

NO_EOS: list[int] = []


def write_adapter(folder: Path, model, *, rank: int = 4, alpha: float = 16.0, seed: int = 0, zero: bool = False,
                  modules: tuple[str, ...] = ("self_attn.o_proj",), out_features: int | None = None) -> None:
    """A PEFT LoRA folder ``linear_spec_lora/`` with random A and B on ``modules`` of every layer."""
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for index, layer in enumerate(model.model.layers):
        for name in modules:
            linear = layer.get_submodule(name)
            key = f"base_model.model.model.layers.{index}.{name}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(rank, linear.in_features, generator=generator) * 0.5
            up = torch.randn(out_features or linear.out_features, rank, generator=generator) * 0.5
            tensors[f"{key}.lora_B.weight"] = up * 0 if zero else up
    adapter = folder / "linear_spec_lora"
    adapter.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(adapter / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": alpha, "target_modules": [m.split(".")[-1] for m in modules],
              "lora_dropout": 0.0, "bias": "none", "task_type": "CAUSAL_LM", "base_model_name_or_path": None}
    (adapter / "adapter_config.json").write_text(json.dumps(config))


@pytest.fixture(scope="module")
def with_adapter(runtime_exports, tmp_path_factory):
    """Factory: (architecture, **write_adapter options) -> a copy of the tiny export with a drafter, loaded."""
    from transformers import AutoModelForCausalLM

    def make(architecture: str, **options):
        folder = tmp_path_factory.mktemp("drafter") / architecture
        shutil.copytree(runtime_exports[architecture], folder)
        plain = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
        write_adapter(folder, plain, **options)
        return AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, attn_implementation="sdpa").eval()

    return make


def _logits(model, ids, gate=None):
    """A plain forward, with the drafter switched on for the tokens of ``gate``."""
    with torch.no_grad():
        if gate is None:
            return model(ids).logits
        with model._drafter(True).drafting(gate):
            return model(ids).logits


def test_a_zero_adapter_drafts_like_the_base_model(with_adapter, load_runtime, prompt_batch):
    model = with_adapter("LlamaForCausalLM", zero=True)
    base = load_runtime("LlamaForCausalLM")
    ids, mask = prompt_batch
    everywhere = torch.ones_like(ids, dtype=torch.bool)
    assert torch.equal(_logits(model, ids, everywhere), _logits(base, ids))
    for method in ("linear_spec_generate", "quadratic_spec_generate"):
        with_drafter = getattr(model, method)(ids, 10, block_length=4, attention_mask=mask, eos_token_id=NO_EOS,
                                              return_stats=True)
        without = getattr(base, method)(ids, 10, block_length=4, attention_mask=mask, eos_token_id=NO_EOS,
                                        return_stats=True)
        assert torch.equal(with_drafter[0], without[0]) and vars(with_drafter[1]) == vars(without[1])  # two module copies


def test_only_marked_tokens_see_the_adapter_and_it_is_peft_s(with_adapter, runtime_exports):
    """Switched on everywhere it equals PEFT's LoRA on the same folder; switched on for the last tokens only, a
    causal forward leaves every earlier position unchanged and changes every marked one."""
    import peft
    import transformers

    model = with_adapter("Qwen3ForCausalLM", seed=3)
    folder = Path(model.name_or_path)
    ids = torch.randint(10, 250, (2, 9), generator=torch.Generator().manual_seed(0))
    everywhere = torch.ones_like(ids, dtype=torch.bool)
    reference = peft.PeftModel.from_pretrained(transformers.Qwen3ForCausalLM.from_pretrained(folder), folder,
                                               subfolder="linear_spec_lora").eval()
    with torch.no_grad():
        expected = reference(ids).logits
    assert (_logits(model, ids, everywhere) - expected).abs().max() < 1e-4
    base = _logits(model, ids)
    assert (expected - base).abs().max() > 1e-2  # the adapter does change what it touches
    tail = torch.zeros_like(everywhere)
    tail[:, 6:] = True
    gated = _logits(model, ids, tail)
    assert torch.equal(gated[:, :6], base[:, :6]) and (gated[:, 6:] - base[:, 6:]).abs().amax(-1).min() > 1e-3


@pytest.mark.parametrize("arch", SUPPORTED_ARCHITECTURES)
def test_self_speculation_with_a_drafter_is_still_ar(arch, with_adapter, prompt_batch):
    model = with_adapter(arch, seed=1)
    ids, mask = prompt_batch
    ar, _ = model.ar_generate(ids, 12, attention_mask=mask, eos_token_id=NO_EOS)
    for method in ("linear_spec_generate", "quadratic_spec_generate"):
        drafted, stats = getattr(model, method)(ids, 12, block_length=4, attention_mask=mask, eos_token_id=NO_EOS,
                                                return_stats=True)
        plain, plain_stats = getattr(model, method)(ids, 12, block_length=4, attention_mask=mask,
                                                    eos_token_id=NO_EOS, return_stats=True, use_drafter=False)
        assert torch.equal(drafted, ar) and torch.equal(plain, ar), method
        assert stats.drafted_by_offset and plain_stats.drafted_by_offset


def test_draft_passes_see_the_adapter_and_verify_passes_do_not(with_adapter):
    """Per forward of linear self-speculation, the o_proj output of the first layer is the base output plus the
    adapter's delta exactly on the draft pass's tokens."""
    model = with_adapter("LlamaForCausalLM", seed=2)
    model._drafter(None)  # load the adapter first: its hook runs before the recording one
    o_proj = model.model.layers[0].self_attn.o_proj
    seen = []
    handle = o_proj.register_forward_hook(lambda _m, args, out: seen.append((args[0].clone(), out.clone())))
    try:
        _, stats = model.linear_spec_generate(torch.tensor([[17, 42, 99]]), 7, block_length=4, eos_token_id=NO_EOS,
                                              return_stats=True)
    finally:
        handle.remove()
    changed = [not torch.allclose(output, torch.nn.functional.linear(inputs, o_proj.weight), atol=1e-6)
               for inputs, output in seen]
    assert len(changed) == stats.nfe
    assert sum(changed) == stats.nfe - 1 - stats.cycles >= 1  # the draft passes: NFE = 1 + cycles + drafts


@pytest.mark.parametrize("options, message", [
    ({"out_features": 5}, "do not fit"),
    ({"modules": ("self_attn.rotary_missing",)}, "not a linear layer"),
])
def test_an_adapter_of_another_model_is_one_clear_error(options, message, runtime_exports, tmp_path):
    from transformers import AutoModelForCausalLM

    folder = tmp_path / "export"
    shutil.copytree(runtime_exports["LlamaForCausalLM"], folder)
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    if options.get("modules") == ("self_attn.rotary_missing",):
        write_adapter(folder, model)
        path = folder / "linear_spec_lora" / "adapter_model.safetensors"
        from safetensors.torch import load_file, save_file

        tensors = {k.replace("o_proj", "rotary_missing"): v for k, v in load_file(str(path)).items()}
        save_file(tensors, str(path))
    else:
        write_adapter(folder, model, **options)
    with pytest.raises(ValueError, match=message):
        model.linear_spec_generate(torch.tensor([[17, 42]]), 4, block_length=4)


def test_use_drafter_true_without_an_adapter_is_refused(load_runtime):
    model = load_runtime("LlamaForCausalLM")
    with pytest.raises(ValueError, match="no drafter"):
        model.linear_spec_generate(torch.tensor([[17, 42]]), 4, block_length=4, use_drafter=True)
    with pytest.raises(ValueError, match="use_drafter"):
        model.quadratic_spec_generate(torch.tensor([[17, 42]]), 4, block_length=4, use_drafter="yes")


@pytest.mark.parametrize("method", ["linear_spec_generate", "quadratic_spec_generate"])
def test_both_modes_draft_with_the_adapter(method, with_adapter, prompt_batch):
    """The drafts that reach verification differ with and without the adapter (a mode that never switched it on
    would still be lossless, so the equality tests above cannot tell)."""
    model = with_adapter("LlamaForCausalLM", seed=4)
    ids, mask = prompt_batch
    decoder_inputs = {}
    for use in (True, False):
        seen = []
        handle = model.get_decoder().register_forward_pre_hook(
            lambda _m, _a, kwargs, seen=seen: seen.append(kwargs["input_ids"].clone()), with_kwargs=True)
        try:
            getattr(model, method)(ids, 10, block_length=4, attention_mask=mask, eos_token_id=NO_EOS, use_drafter=use)
        finally:
            handle.remove()
        decoder_inputs[use] = seen
    assert any(a.shape != b.shape or not torch.equal(a, b)
               for a, b in zip(decoder_inputs[True], decoder_inputs[False], strict=False))
