"""The drafter adapter of an export: a PEFT LoRA folder ``linear_spec_lora/`` next to the HF weights.

    HF_DIR/linear_spec_lora/adapter_config.json        PEFT LoraConfig (peft_type LORA, r, lora_alpha, targets)
    HF_DIR/linear_spec_lora/adapter_model.safetensors  base_model.model.model.layers.N.self_attn.o_proj.lora_A.weight
                                                       [r, in] and ...lora_B.weight [out, r], N from 0

so that ``peft.PeftModel.from_pretrained(model, HF_DIR, subfolder="linear_spec_lora")`` applies it, as for NVIDIA's
Nemotron-Labs-Diffusion releases, and a runtime without peft can add ``(x @ A.T) @ B.T * lora_alpha / r`` to the
module's output in draft passes only (docs/design.md §4.7). megatron-core's ``linear_proj`` is HF's ``o_proj`` and
``linear_fc2`` its ``down_proj``; the fused ``linear_qkv`` and ``linear_fc1`` become one adapter per HF projection
with the same A and the rows of B that belong to it (B A restricted to q_proj's rows is B_q A), split as
megatron-bridge splits the fused weights.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from torch import Tensor

from ar2dlm.errors import UserError
from ar2dlm.model.lora import LoraSettings, adapter_tensors, add_lora, checkpoint_lora, remove_adapters

PEFT_DIR = "linear_spec_lora"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
HF_MODULES = {"linear_proj": ("self_attn.o_proj",), "linear_fc2": ("mlp.down_proj",),  # megatron-core -> HF
              "linear_qkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
              "linear_fc1": ("mlp.gate_proj", "mlp.up_proj")}  # fc1 of a gated MLP: [gate ; up]

Adapters = dict[tuple[int, str], tuple[Tensor, Tensor]]  # {(layer, module): (A [r, in], B [out, r])}


def load_model_and_adapter(directory: Path, *, checksums: bool = True):
    """(base model chunks, the adapter as HF modules {(HF layer from 0, HF module): (A, B)} or None, its settings or
    None) of a checkpoint; the chunks are the plain base model either way (what the export's safetensors hold)."""
    from ar2dlm.model.checkpoint import WEIGHTS_DIR, load_model, load_weights, read_metadata

    settings = checkpoint_lora(read_metadata(directory))
    if settings is None:
        chunks, _, _ = load_model(directory, checksums=checksums)
        return chunks, None, None
    chunks, _, _ = load_model(directory, checksums=checksums, weights=False)
    add_lora(chunks, settings)
    load_weights(chunks, directory / WEIGHTS_DIR)
    tensors = hf_adapters(adapter_tensors(chunks), chunks[0].config)
    return remove_adapters(chunks), tensors, settings


def hf_adapters(tensors: Adapters, config) -> Adapters:
    """megatron-core adapters {(global layer from 1, target): (A, B)} as HF ones {(layer from 0, module): (A, B)};
    ``config``: the megatron model's TransformerConfig (heads and groups of the fused QKV layout)."""
    from megatron.bridge.models.conversion.param_mapping import split_qkv_weights

    out = {}
    for (layer, target), (a, b) in tensors.items():
        if target not in HF_MODULES:
            raise UserError(f"the drafter adapter targets {target}, which export cannot write as PEFT (it writes "
                            f"{', '.join(HF_MODULES)})")
        if target == "linear_qkv":
            rows = split_qkv_weights(config, b)
        elif target == "linear_fc1" and getattr(config, "gated_linear_unit", False):
            rows = b.chunk(2, dim=0)
        else:
            rows = (b,)
        modules = HF_MODULES[target] if len(rows) > 1 else HF_MODULES[target][-1:]
        for module, part in zip(modules, rows, strict=True):
            out[(layer - 1, module)] = (a.detach().clone(), part.detach().clone())
    return out


def hf_module_shapes(hf_config) -> dict[str, tuple[int, int]]:
    """(in, out) features of the HF projections an adapter may target, from the exported model's config."""
    hidden, ffn = hf_config.hidden_size, hf_config.intermediate_size
    head_dim = getattr(hf_config, "head_dim", None) or hidden // hf_config.num_attention_heads
    queries = hf_config.num_attention_heads * head_dim
    keys = (getattr(hf_config, "num_key_value_heads", None) or hf_config.num_attention_heads) * head_dim
    return {"self_attn.o_proj": (queries, hidden), "self_attn.q_proj": (hidden, queries),
            "self_attn.k_proj": (hidden, keys), "self_attn.v_proj": (hidden, keys), "mlp.down_proj": (ffn, hidden),
            "mlp.gate_proj": (hidden, ffn), "mlp.up_proj": (hidden, ffn)}


def peft_state(tensors: Adapters, settings: LoraSettings, hf_config) -> dict[str, Tensor]:
    """PEFT tensor names -> tensors of HF adapters, checked against the exported model (layers, shapes, rank)."""
    shapes, layers = hf_module_shapes(hf_config), hf_config.num_hidden_layers
    state = {}
    for (layer, module), (a, b) in sorted(tensors.items()):
        in_features, out_features = shapes[module]
        if not 0 <= layer < layers:
            raise UserError(f"the drafter adapter has layer {layer}, the exported model {layers} layers")
        if tuple(a.shape) != (settings.rank, in_features) or tuple(b.shape) != (out_features, settings.rank):
            raise UserError(f"the drafter adapter of layer {layer} {module} has A {tuple(a.shape)} and B "
                            f"{tuple(b.shape)}; the exported model (hidden size {hf_config.hidden_size}) needs A "
                            f"({settings.rank}, {in_features}) and B ({out_features}, {settings.rank})")
        prefix = f"base_model.model.model.layers.{layer}.{module}"
        state[f"{prefix}.lora_A.weight"] = a.detach().cpu().contiguous()
        state[f"{prefix}.lora_B.weight"] = b.detach().cpu().contiguous()
    if not state:
        raise UserError("the checkpoint records a drafter adapter but holds no adapter tensors")
    return state


def adapter_config(tensors: Adapters, settings: LoraSettings, hf_config) -> dict:
    """PEFT's LoraConfig as JSON: every layer adapted -> target_modules by name (["o_proj"]), else a regex."""
    modules = sorted({module for _, module in tensors})
    everywhere = all((layer, module) in tensors for module in modules for layer in range(hf_config.num_hidden_layers))
    if everywhere:
        targets: list[str] | str = [module.rsplit(".", 1)[-1] for module in modules]
    else:
        names = sorted(re.escape(f"model.layers.{layer}.{module}") for layer, module in tensors)
        targets = "^(" + "|".join(names) + ")$"
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": None, "revision": None,
        "r": settings.rank, "lora_alpha": settings.alpha, "lora_dropout": 0.0, "target_modules": targets,
        "bias": "none", "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True,
        "use_rslora": False, "use_dora": False, "modules_to_save": None, "layers_to_transform": None,
        "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {},
        "ar2dlm": {"role": "self-speculation drafter: apply in draft passes only",
                   "megatron_target_modules": list(settings.target_modules)},
    }


def write_peft_adapter(hf_dir: Path, tensors: Adapters, settings: LoraSettings, hf_config, dtype: torch.dtype) -> Path:
    """Write ``hf_dir/linear_spec_lora/`` for the exported model of ``hf_config``; returns the folder."""
    from safetensors.torch import save_file

    state = {name: tensor.to(dtype) for name, tensor in peft_state(tensors, settings, hf_config).items()}
    folder = hf_dir / PEFT_DIR
    folder.mkdir(parents=True, exist_ok=True)
    save_file(state, str(folder / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    (folder / ADAPTER_CONFIG).write_text(json.dumps(adapter_config(tensors, settings, hf_config), indent=2) + "\n")
    return folder


def read_peft_adapter(hf_dir: Path) -> tuple[Adapters, float]:
    """({(HF layer index from 0, HF module e.g. "self_attn.o_proj"): (A [r, in], B [out, r])}, alpha / r) of an
    export's ``linear_spec_lora/``: what a runtime without peft adds to the module's output in draft passes,
    ``(x @ A.T) @ B.T * scale``."""
    from safetensors.torch import load_file

    folder = Path(hf_dir) / PEFT_DIR
    config = json.loads((folder / ADAPTER_CONFIG).read_text())
    tensors: dict[tuple[int, str], list] = {}
    for name, tensor in load_file(str(folder / ADAPTER_WEIGHTS)).items():
        module, part = name.removeprefix("base_model.model.model.layers.").rsplit(".lora_", 1)
        layer, module = module.split(".", 1)
        tensors.setdefault((int(layer), module), [None, None])["AB".index(part[0])] = tensor
    return {key: (a, b) for key, (a, b) in tensors.items()}, config["lora_alpha"] / config["r"]
