"""LoRA adapters on megatron-core linear layers: the self-speculation drafter's (docs/design.md §4.7).

The adapters are megatron-bridge's PEFT LoRA (``megatron.bridge.peft``): a ``ParallelLinearAdapter`` of two
megatron-core parallel linears per target, sharded like its base under tensor parallelism (for a row-parallel
base such as ``linear_proj``, A is split along its input dimension and B along its output, gathered; for a
column-parallel base, A along the rank and B along the output, as the base), with B initialised to zero so that
a new adapter leaves the model unchanged. Its wrapper keeps the base layer's checkpoint names and adds
``.adapter.linear_in.weight`` (A, [rank, in]) and ``.adapter.linear_out.weight`` (B, [out, rank]); the adapter
output is ``B(A(x)) * alpha / rank``, PEFT's scaling.

ar2dlm adds one thing, the wrapper ``DrafterLoRALinear``: a *mode* that says which tokens the adapter acts on.
``on`` (every token), ``off`` (none: the base model) and ``noisy_stream`` (only the first half of the sequence,
the noisy stream of the doubled ``[x_t ; x_0]`` input). With ``noisy_stream`` one forward of the doubled
sequence is exactly a draft pass with the adapter on that reads a clean causal prefix computed with the adapter
off, as the runtime's draft passes read a KV cache written by adapter-free passes. Drafter runs compute the same
logits with the cheaper split forward of :mod:`ar2dlm.model.draft_pass` (adapters ``on``, turned ``off`` for its
clean pass); ``noisy_stream`` is its reference.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ar2dlm.errors import UserError

KNOWN_TARGETS = ("linear_proj", "linear_qkv", "linear_fc1", "linear_fc2")
ADAPTER_MODES = ("on", "off", "noisy_stream")
METADATA_KEY = "drafter_lora"  # CheckpointMetadata.extra[METADATA_KEY]: the adapter a checkpoint holds


@dataclass(frozen=True)
class LoraSettings:
    """Shape of the adapters: rank, PEFT-style alpha (scale alpha / rank) and the targeted megatron linears."""

    rank: int = 16
    alpha: float = 64.0
    target_modules: tuple[str, ...] = ("linear_proj",)
    seed: int = field(default=1234, compare=False)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def to_dict(self) -> dict:
        return {"rank": self.rank, "alpha": self.alpha, "target_modules": list(self.target_modules)}

    @classmethod
    def from_dict(cls, raw: dict, seed: int = 1234) -> LoraSettings:
        return cls(rank=int(raw["rank"]), alpha=float(raw["alpha"]), target_modules=tuple(raw["target_modules"]),
                   seed=seed)


def checkpoint_lora(metadata) -> LoraSettings | None:
    """The adapter settings a checkpoint's metadata records (None: it holds no adapter)."""
    raw = (metadata.extra or {}).get(METADATA_KEY)
    return None if raw is None else LoraSettings.from_dict(raw)


def _adapter_classes():
    from ar2dlm.compat import import_megatron_bridge, transformer_engine_available

    import_megatron_bridge()
    import megatron.bridge.peft.utils as peft_utils
    from megatron.bridge.peft.lora import LoRA
    from megatron.bridge.peft.lora_layers import LoRALinear

    if not transformer_engine_available():
        # Without Transformer Engine, ar2dlm.compat's stand-in module makes megatron-bridge believe TE is there,
        # and its layer-type checks then call isinstance() on stand-ins; the local (megatron-core) layers need none.
        peft_utils.HAVE_TE = False
    return LoRA, LoRALinear


@functools.cache
def _drafter_classes():
    """(the LoRA transform, the adapter wrapper class), defined once megatron-bridge is imported."""
    LoRA, LoRALinear = _adapter_classes()

    class _DrafterLoRALinear(LoRALinear):
        """megatron-bridge's ``LoRALinear`` with a token mode (see the module docstring)."""

        mode = "on"

        def forward(self, x: Tensor, *args, **kwargs):
            if self.mode == "noisy_stream" and self._adapter_enabled:
                return self._noisy_stream_forward(x, *args, **kwargs)
            linear_output, bias, layernorm_output = self.base_linear_forward(x, *args, **kwargs)
            if self.mode == "off" or not self._adapter_enabled:
                return linear_output, bias
            return linear_output + self.adapter(layernorm_output.contiguous()).reshape(linear_output.shape), bias

        def _noisy_stream_forward(self, x: Tensor, *args, **kwargs):
            """megatron-core activations are [sequence, batch, hidden]: the noisy stream is the first half. The clean
            half runs outside autograd: it never reads the noisy stream nor an adapter and the base is frozen, so its
            backward would only compute gradients that reach no trainable parameter (about a third of a drafter
            step's backward)."""
            half = x.shape[0] // 2
            noisy, bias, layernorm_output = self.base_linear_forward(x[:half], *args, **kwargs)
            with torch.no_grad():
                clean, _, _ = self.base_linear_forward(x[half:], *args, **kwargs)
            noisy = noisy + self.adapter(layernorm_output.contiguous()).reshape(noisy.shape)
            return torch.cat([noisy, clean]), bias

        def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
            # state_dict() and sharded_state_dict() name the base layer's tensors as if it were not wrapped
            for key in [k for k in state_dict if k.startswith(prefix) and not k.startswith(f"{prefix}adapter.")
                        and not k.startswith(f"{prefix}to_wrap.")]:
                state_dict[f"{prefix}to_wrap.{key[len(prefix):]}"] = state_dict.pop(key)
            super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    class _Lora(LoRA):
        def transform(self, module, name=None, prefix=None):
            wrapped = super().transform(module, name, prefix)
            if type(wrapped) is LoRALinear:
                wrapped.__class__ = _DrafterLoRALinear
            return wrapped

    _DrafterLoRALinear.__name__ = _DrafterLoRALinear.__qualname__ = "DrafterLoRALinear"
    return _Lora, _DrafterLoRALinear


def adapters(model: torch.nn.Module) -> Iterator[tuple[int, str, torch.nn.Module]]:
    """(global layer number, target name, wrapper) of every adapter of a model chunk, in layer order."""
    from megatron.core.transformer.transformer_layer import TransformerLayer

    _, wrapper_class = _drafter_classes()
    for layer in model.modules():
        if isinstance(layer, TransformerLayer):
            for name, sub in layer.named_modules():
                if isinstance(sub, wrapper_class):
                    yield layer.layer_number, name.rsplit(".", 1)[-1], sub


def add_lora(model_chunks: list, settings: LoraSettings) -> list:
    """Freeze every parameter of ``model_chunks`` and wrap the target linears with trainable adapters (in place).

    A is drawn from a generator seeded by (seed, global layer number, target), on the full matrix, and then
    sharded: the same adapter under every tensor / pipeline layout. B is zero.
    """
    lora_class, _ = _drafter_classes()
    unknown = [t for t in settings.target_modules if t not in KNOWN_TARGETS and "*" not in t]
    if not settings.target_modules or unknown:
        raise UserError(f"drafter.target_modules={list(settings.target_modules)}: give one or more of "
                        f"{', '.join(KNOWN_TARGETS)} (or a pattern with '*', e.g. '*.linear_fc*')")
    lora_class(target_modules=list(settings.target_modules), dim=settings.rank, alpha=settings.alpha,
               dropout=0.0, lora_A_init_method="xavier", lora_B_init_method="zero")(model_chunks, training=True)
    _refuse_other_wrappers(model_chunks)
    found = [entry for chunk in model_chunks for entry in adapters(chunk)]
    if not found and _model_has_layers(model_chunks):
        raise UserError(f"drafter.target_modules={list(settings.target_modules)} matched no linear layer of the "
                        f"model: nothing would be trained (its targets are {', '.join(KNOWN_TARGETS)})")
    _refuse_partial_layers(model_chunks, found, settings)
    for layer_number, target, wrapper in found:
        _seeded_init(wrapper, settings, layer_number, target)
    return model_chunks


def _refuse_other_wrappers(model_chunks: list) -> None:
    """megatron-bridge wraps some layers in other classes (TE's fused-op LoRA, routers, plain nn.Linear); they have
    no token mode, so a draft-only adapter cannot be one of them."""
    from megatron.bridge.peft.adapter_wrapper import AdapterWrapper

    _, wrapper_class = _drafter_classes()
    others = sorted({type(m).__name__ for chunk in model_chunks for m in chunk.modules()
                     if isinstance(m, AdapterWrapper) and not isinstance(m, wrapper_class)})
    if others:
        raise UserError(f"drafter.target_modules matched layers that megatron-bridge wraps as {', '.join(others)}, "
                        "which cannot act on draft tokens only: target linear_proj, linear_qkv, linear_fc1 or "
                        "linear_fc2 (and turn off Transformer Engine's op fuser)")


def _refuse_partial_layers(model_chunks: list, found: list, settings: LoraSettings) -> None:
    """A target's adapters must be in every layer: megatron checkpoints store a target's layers as one stacked
    tensor, which a subset of layers cannot fill (the first save would fail after the training it should keep)."""
    from megatron.core.transformer.transformer_layer import TransformerLayer

    layers = sorted({m.layer_number for chunk in model_chunks for m in chunk.modules()
                     if isinstance(m, TransformerLayer)})
    for target in sorted({target for _, target, _ in found}):
        covered = {layer for layer, name, _ in found if name == target}
        missing = [layer - 1 for layer in layers if layer not in covered]
        if missing:
            raise UserError(f"drafter.target_modules={list(settings.target_modules)} puts {target} adapters in "
                            f"layers {', '.join(str(layer - 1) for layer in sorted(covered))} but not in "
                            f"{', '.join(map(str, missing))}: a target's adapters must be in every layer (checkpoints "
                            f"store them as one tensor stacked over the layers); name the target ({target}) or a "
                            f"pattern that matches it in every layer")


def _model_has_layers(model_chunks: list) -> bool:
    from megatron.core.transformer.transformer_layer import TransformerLayer

    return any(isinstance(m, TransformerLayer) for chunk in model_chunks for m in chunk.modules())


def _seeded_init(wrapper, settings: LoraSettings, layer_number: int, target: str) -> None:
    """A (``linear_in``) uniform in +-1/sqrt(in_features) (PEFT's default bound), B (``linear_out``) zero."""
    digest = hashlib.sha256(f"{settings.seed}:{layer_number}:{target}".encode()).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
    a = wrapper.adapter.linear_in.weight
    full = _full_shape(a)
    bound = full[1] ** -0.5
    values = (torch.rand(full, generator=generator, dtype=torch.float64) * 2 - 1) * bound
    with torch.no_grad():
        a.copy_(_local_shard(values, a).to(a.dtype))
        wrapper.adapter.linear_out.weight.zero_()


def _full_shape(parameter: Tensor) -> tuple[int, int]:
    from megatron.core import parallel_state

    shape = list(parameter.shape)
    if getattr(parameter, "tensor_model_parallel", False):
        shape[parameter.partition_dim] *= parallel_state.get_tensor_model_parallel_world_size()
    return tuple(shape)


def _local_shard(full: Tensor, parameter: Tensor) -> Tensor:
    from megatron.core import parallel_state

    if not getattr(parameter, "tensor_model_parallel", False):
        return full
    size = parallel_state.get_tensor_model_parallel_world_size()
    return full.chunk(size, dim=parameter.partition_dim)[parallel_state.get_tensor_model_parallel_rank()]


def set_adapter_mode(model_chunks: list, mode: str) -> None:
    """Which tokens every adapter of the model acts on from now on: ``on``, ``off`` or ``noisy_stream``."""
    if mode not in ADAPTER_MODES:
        raise ValueError(f"adapter mode must be one of {ADAPTER_MODES}, got {mode!r}")
    for chunk in model_chunks:
        for _, _, wrapper in adapters(chunk):
            wrapper.mode = mode


@contextmanager
def adapter_mode(model_chunks: list, mode: str):
    """Run the body with every adapter in ``mode``, then restore each adapter's previous mode."""
    previous = [(wrapper, wrapper.mode) for chunk in model_chunks for _, _, wrapper in adapters(chunk)]
    set_adapter_mode(model_chunks, mode)
    try:
        yield
    finally:
        for wrapper, old in previous:
            wrapper.mode = old


def adapter_tensors(model_chunks: list) -> dict[tuple[int, str], tuple[Tensor, Tensor]]:
    """{(global layer number, target): (A [rank, in], B [out, rank])} of a single-process model, detached."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized() and parallel_state.get_tensor_model_parallel_world_size() > 1:
        raise ValueError("adapter_tensors needs the whole adapter: call it on a tensor-parallel size 1 model")
    return {(layer, target): (wrapper.adapter.linear_in.weight.detach(), wrapper.adapter.linear_out.weight.detach())
            for chunk in model_chunks for layer, target, wrapper in adapters(chunk)}


def remove_adapters(model_chunks: list) -> list:
    """Put every wrapped base layer back in place of its wrapper (in place): the base model, for its export."""
    _, wrapper_class = _drafter_classes()
    for chunk in model_chunks:
        for parent in list(chunk.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, wrapper_class):
                    setattr(parent, name, child.to_wrap)
    return model_chunks


def trainable_parameters(model_chunks: list) -> list[tuple[str, torch.nn.Parameter]]:
    return [(name, p) for chunk in model_chunks for name, p in chunk.named_parameters() if p.requires_grad]
