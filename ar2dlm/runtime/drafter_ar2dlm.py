"""The self-speculation drafter: a LoRA adapter (PEFT folder ``linear_spec_lora/`` of the export) that only
draft tokens see (torch + transformers, whose safetensors reads the weights; ``peft`` is not needed).

The adapter adds ``scale * B(A(x))`` to the output of each adapted linear layer, token by token, for the
tokens a decoding call marks as draft tokens (:meth:`DraftAdapter.drafting`). Every other token (prompt,
verified text) is computed by the unchanged model, so what verification accepts, and so the output, is AR's.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import torch

ADAPTER_FOLDER = "linear_spec_lora"
PEFT_PREFIX = "base_model.model."
A_SUFFIX, B_SUFFIX = ".lora_A.weight", ".lora_B.weight"


class DraftAdapter:
    """LoRA weights hooked onto a model's linear layers, active only for the tokens of :meth:`drafting`."""

    def __init__(self, model, weights: dict[str, tuple[torch.Tensor, torch.Tensor]], scale: float, source: str):
        self.scale = scale
        self.source = source
        self.gate: torch.Tensor | None = None  # [B, q] bool while drafting, else None
        self.everywhere = False  # while drafting: every token of the forward is a draft token (no gating needed)
        self.handles = []
        modules = dict(model.named_modules())
        for name, (down, up) in weights.items():
            module = modules.get(name)
            if not isinstance(module, torch.nn.Linear):
                raise ValueError(f"{source}: the adapter targets {name!r}, which is not a linear layer of this "
                                 f"{type(model).__name__}: its base does not match this model")
            if down.shape[1] != module.in_features or up.shape[0] != module.out_features or down.shape[0] != up.shape[1]:
                raise ValueError(f"{source}: adapter shapes A {tuple(down.shape)}, B {tuple(up.shape)} do not fit "
                                 f"{name} ({module.in_features} -> {module.out_features}): its base does not match "
                                 f"this model")
            down = down.to(module.weight.device, module.weight.dtype)
            up = up.to(module.weight.device, module.weight.dtype)
            self.handles.append(module.register_forward_hook(self._hook(down, up)))

    def _hook(self, down: torch.Tensor, up: torch.Tensor):
        def add_delta(_module, args, output):
            if self.gate is None:
                return output
            delta = torch.nn.functional.linear(torch.nn.functional.linear(args[0], down), up) * self.scale
            if self.everywhere:
                return output + delta
            return output + delta * self.gate[..., None].to(output.dtype)

        return add_delta

    @contextmanager
    def drafting(self, gate: torch.Tensor):
        """Within the block, the tokens of the next forward with ``gate`` [B, q] True see the adapter."""
        self.gate, self.everywhere = gate, bool(gate.all())
        try:
            yield
        finally:
            self.gate, self.everywhere = None, False

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []


def read_adapter(folder: Path) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], float]:
    """The (A, B) weights of a PEFT LoRA folder by HF module name, and its scale alpha / r (rsLoRA: / sqrt r)."""
    from safetensors.torch import load_file

    config = json.loads((folder / "adapter_config.json").read_text())
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for key, value in tensors.items():
        if not key.endswith(A_SUFFIX):
            continue
        name = key[: -len(A_SUFFIX)]
        if (name + B_SUFFIX) not in tensors:
            raise ValueError(f"{folder}: {key} has no matching {name + B_SUFFIX}")
        weights[name.removeprefix(PEFT_PREFIX)] = (value, tensors[name + B_SUFFIX])
    if not weights:
        raise ValueError(f"{folder}/adapter_model.safetensors holds no LoRA weights (*{A_SUFFIX})")
    rank, alpha = int(config["r"]), float(config.get("lora_alpha", config["r"]))
    scale = alpha / rank ** 0.5 if config.get("use_rslora") else alpha / rank
    return weights, scale


def find_adapter_folder(model) -> Path | None:
    """``linear_spec_lora/`` next to the model's weights, when the model was loaded from a local folder."""
    path = getattr(model, "name_or_path", None) or getattr(model.config, "_name_or_path", None)
    if not path:
        return None
    folder = Path(path) / ADAPTER_FOLDER
    return folder if (folder / "adapter_config.json").is_file() else None
