"""Export of a drafter checkpoint: the base model as before plus a PEFT LoRA folder (ar2dlm/conversion/lora_export.py)."""

import json

import pytest
import torch
from safetensors.torch import load_file

from ar2dlm.conversion.export import export
from ar2dlm.conversion.lora_export import PEFT_DIR, load_model_and_adapter, peft_state, read_peft_adapter
from ar2dlm.errors import UserError
from ar2dlm.model.checkpoint import WEIGHTS_DIR, load_model, load_weights
from ar2dlm.model.core_attention import AttentionLayout
from ar2dlm.model.lora import LoraSettings, add_lora
from ar2dlm.training.loop import Trainer

DRAFTER = ("train.objective=drafter", "drafter.rank=4", "drafter.alpha=16", "drafter.top_k=16", "optim.lr=2e-2",
           "optim.weight_decay=0", "train.steps=2", "checkpoint.save_interval=2")
IDS = torch.randint(0, 200, (2, 12), generator=torch.Generator().manual_seed(0))


def _train(run_setup, *overrides):
    cfg, output = run_setup
    Trainer(cfg(*DRAFTER, *overrides)).fit()
    return output / "checkpoints" / "step_0000002", cfg().init


def _peft_logits(hf_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        base = AutoModelForCausalLM.from_pretrained(hf_dir).eval()
        base_logits = base(IDS).logits
        return PeftModel.from_pretrained(base, hf_dir, subfolder=PEFT_DIR).eval()(IDS).logits, base_logits


def test_exported_adapter_through_peft_is_w_plus_scaled_b_a(run_setup, tmp_path):
    from transformers import AutoModelForCausalLM

    checkpoint, init = _train(run_setup)
    export(checkpoint, tmp_path / "hf")
    folder = tmp_path / "hf" / PEFT_DIR
    config = json.loads((folder / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"], config["target_modules"]) == ("LORA", 4, 16.0,
                                                                                                  ["o_proj"])
    names = sorted(load_file(folder / "adapter_model.safetensors"))
    assert names == sorted(f"base_model.model.model.layers.{i}.self_attn.o_proj.lora_{m}.weight"
                           for i in range(2) for m in "AB")

    peft_logits, base_logits = _peft_logits(tmp_path / "hf")
    _, tensors, settings = load_model_and_adapter(checkpoint, checksums=False)
    with torch.no_grad():
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
        for (layer, module), (a, b) in tensors.items():
            assert module == "self_attn.o_proj"
            merged.model.layers[layer].self_attn.o_proj.weight += b.float() @ a.float() * (16.0 / 4)
        merged_logits = merged(IDS).logits
    torch.testing.assert_close(peft_logits, merged_logits, rtol=0, atol=1e-5)
    assert (peft_logits - base_logits).abs().max() > 1e-4  # the trained adapter does something
    read, scale = read_peft_adapter(tmp_path / "hf")
    assert scale == 4.0 and sorted(read) == sorted(tensors)
    assert all(torch.equal(read[key][i], tensors[key][i]) for key in tensors for i in (0, 1))

    # the base weights of the export are the init's: the drafter never changed them
    export(init, tmp_path / "init-hf")
    assert not (tmp_path / "init-hf" / PEFT_DIR).exists()
    exported, original = load_file(tmp_path / "hf" / "model.safetensors"), load_file(
        tmp_path / "init-hf" / "model.safetensors")
    assert exported.keys() == original.keys() and all(torch.equal(exported[k], original[k]) for k in exported)


def test_fused_targets_through_peft_give_the_megatron_drafters_logits(run_setup, tmp_path):
    """Adapters on linear_qkv / linear_fc1 (fused in megatron-core) and linear_fc2: the HF model with the exported
    PEFT adapter computes what the megatron-core model with its adapters on computes."""
    targets = ("linear_qkv", "linear_fc1", "linear_fc2")
    checkpoint, _ = _train(run_setup, f"drafter.target_modules=[{','.join(targets)}]")
    export(checkpoint, tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / PEFT_DIR / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == ["down_proj", "gate_proj", "k_proj", "q_proj", "up_proj", "v_proj"]
    peft_logits, base_logits = _peft_logits(tmp_path / "hf")
    chunks, _, _ = load_model(checkpoint, weights=False, checksums=False)
    add_lora(chunks, LoraSettings(rank=4, alpha=16, target_modules=targets))
    load_weights(chunks, checkpoint / WEIGHTS_DIR)
    with torch.no_grad():
        megatron_logits = chunks[0].eval()(IDS, None, AttentionLayout("causal", IDS.shape[1]))
    assert (megatron_logits[..., :base_logits.shape[-1]] - base_logits).abs().max() > 1e-4
    torch.testing.assert_close(peft_logits, megatron_logits[..., :peft_logits.shape[-1]], rtol=0, atol=1e-4)


def _config(**changes):
    from types import SimpleNamespace

    values = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16, intermediate_size=128,
                  num_hidden_layers=2)
    return SimpleNamespace(**{**values, **changes})


def test_an_adapter_that_does_not_fit_the_model_is_one_clear_error():
    settings = LoraSettings(rank=4, alpha=8)
    tensors = {(0, "self_attn.o_proj"): (torch.zeros(4, 64), torch.zeros(64, 4)),
               (1, "self_attn.o_proj"): (torch.zeros(4, 64), torch.zeros(64, 4)),
               (1, "self_attn.k_proj"): (torch.zeros(4, 64), torch.zeros(32, 4))}
    assert len(peft_state(tensors, settings, _config())) == 6
    with pytest.raises(UserError, match=r"layer 0 self_attn.o_proj has A \(4, 64\).*hidden size 96"):
        peft_state(tensors, settings, _config(hidden_size=96, head_dim=24))
    with pytest.raises(UserError, match="has layer 1, the exported model 1 layers"):
        peft_state(tensors, settings, _config(num_hidden_layers=1))
    with pytest.raises(UserError, match=r"layer 1 self_attn.k_proj has A \(4, 64\) and B \(32, 4\)"):
        peft_state(tensors, settings, _config(num_key_value_heads=4))


def test_the_runtime_drafts_what_the_drafter_trained_on(run_setup, tmp_path):
    """Training and inference see one draft: for every block a drafter step scores (blocks at random phases, as
    inference starts a draft wherever the last cycle stopped), the megatron-core split forward's draft logits equal
    the exported runtime's draft pass over that block after a causal prefill of the document's tokens before it."""
    from transformers import AutoModelForCausalLM

    from ar2dlm.data.loader import Batch
    from ar2dlm.model.checkpoint import read_metadata
    from ar2dlm.runtime.decoding_ar2dlm import KVState, prefill
    from ar2dlm.training.drafter import DrafterLossConfig
    from ar2dlm.training.drafter_model import load_drafter_model
    from ar2dlm.training.forward import ObjectiveSettings, model_inputs, prepare_batch
    from ar2dlm.training.loss import objective_weights
    from ar2dlm.training.noise import NoiseConfig, in_block_positions

    targets = ("linear_proj", "linear_fc1")
    checkpoint, _ = _train(run_setup, f"drafter.target_modules=[{','.join(targets)}]")
    export(checkpoint, tmp_path / "hf")
    runtime = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", trust_remote_code=True,
                                                   attn_implementation="sdpa").eval()
    mask_id = read_metadata(checkpoint).mask_token_id
    settings = ObjectiveSettings(objective_weights("drafter"), NoiseConfig(mask_token_id=mask_id, block_size=8),
                                 "causal", "sdpa", seed=3, pad_id=0, drafter=DrafterLossConfig(top_k=16))
    documents = torch.tensor([[0] * 11 + [1] * 21, [0] * 32])
    loss_mask = torch.ones(2, 32, dtype=torch.bool)
    loss_mask[0, :5], loss_mask[0, 11:18], loss_mask[1, :9] = False, False, False  # prompts
    batch = Batch(torch.randint(1, 200, (2, 32), generator=torch.Generator().manual_seed(4)), loss_mask, documents,
                  torch.tensor([3, 8]))
    prepared = prepare_batch(batch, step=2, settings=settings)
    chunks = load_drafter_model(checkpoint, LoraSettings(rank=4, alpha=16, target_modules=targets), resuming=False)
    ids, _, layout = model_inputs(prepared, torch.device("cpu"))
    with torch.no_grad():
        trained = chunks[0].eval()(ids, None, layout)[:, :32, :runtime.config.vocab_size]
    blocks, scored = prepared.layout.draft_plan.blocks, prepared.noise.masked
    starts = (in_block_positions(blocks) == 0).nonzero().tolist()
    compared, unaligned = 0, 0
    for row, start in starts:
        end = start + 1
        while end < 32 and blocks[row, end] == blocks[row, start]:
            end += 1
        document_start = int((documents[row] == documents[row, start]).nonzero()[0])
        if not scored[row, start:end].any() or start == document_start:
            continue
        state = KVState(runtime, 1, True, runtime._drafter(True))
        prefill(state, batch.input_ids[row:row + 1, document_start:start], torch.ones(1, start - document_start))
        draft = ids[row:row + 1, start:end]
        with torch.no_grad():
            drafted = state.forward(draft, bidirectional=True, keep=False,
                                    drafting=torch.ones_like(draft, dtype=torch.bool))[0]
        read = scored[row, start:end]
        torch.testing.assert_close(drafted[read], trained[row, start:end][read], rtol=0, atol=2e-4)
        compared += 1
        unaligned += (start - document_start) % 8 != 0
    assert compared >= 4 and unaligned >= 2
