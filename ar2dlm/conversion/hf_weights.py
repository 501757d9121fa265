"""Megatron model -> HF-named tensors (through megatron-bridge), written as safetensors shards.

A checkpoint remembers its source's HF tensor names, so export needs no reference HF model: the
bridge is given those names as its key list and maps every Megatron parameter back to them.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import save_file

from ar2dlm.compat import import_megatron_bridge


def _names_only_state(names: list[str]):
    from megatron.bridge.models.hf_pretrained.state import StateDict, StateSource

    class TensorNamesSource(StateSource):
        """The HF tensor names of a checkpoint, without its tensors (export only needs the names)."""

        def get_all_keys(self) -> list[str]:
            return list(names)

        def load_tensors(self, keys: list[str]) -> dict[str, torch.Tensor]:
            raise RuntimeError("TensorNamesSource holds names only")

    return StateDict(TensorNamesSource())


def export_bridge(hf_dir: Path, hf_tensor_names: list[str]):
    """An AutoBridge over a config/tokenizer folder whose weights exist only as Megatron tensors."""
    import_megatron_bridge()
    from megatron.bridge import AutoBridge
    from megatron.bridge.models.hf_pretrained.causal_lm import PreTrainedCausalLM

    pretrained = PreTrainedCausalLM.from_pretrained(str(hf_dir))
    pretrained._state_dict_accessor = _names_only_state(hf_tensor_names)
    return AutoBridge(pretrained)


def hf_tensors(bridge, model_chunks: list) -> Iterator[tuple[str, torch.Tensor]]:
    """Stream (HF name, tensor) pairs of the model, on CPU."""
    for name, tensor in bridge.export_hf_weights(model_chunks, cpu=True, show_progress=False):
        yield name, tensor.detach().to("cpu").contiguous()


def save_safetensors_shards(tensors: Iterator[tuple[str, torch.Tensor]], directory: Path,
                            max_shard_bytes: int = 2 * 1024**3, dtype: torch.dtype | None = None) -> list[Path]:
    """Write tensors as ``model-0000i-of-0000n.safetensors`` shards (plus an index when n > 1).

    Each shard is written as soon as it is full, so at most one shard is held in memory.
    """
    directory.mkdir(parents=True, exist_ok=True)
    written: list[tuple[Path, list[str]]] = []
    shard: dict[str, torch.Tensor] = {}
    shard_bytes = total_bytes = 0

    def flush() -> None:
        path = directory / f".shard-{len(written) + 1:05d}.partial"
        save_file(shard, str(path), metadata={"format": "pt"})
        written.append((path, list(shard)))
        shard.clear()

    for name, tensor in tensors:
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        size = tensor.numel() * tensor.element_size()
        if shard and shard_bytes + size > max_shard_bytes:
            flush()
            shard_bytes = 0
        shard[name] = tensor
        shard_bytes += size
        total_bytes += size
    if shard or not written:
        flush()
    if len(written) == 1:
        final = directory / "model.safetensors"
        written[0][0].rename(final)
        return [final]
    paths, weight_map = [], {}
    for index, (path, names) in enumerate(written, start=1):
        final = directory / f"model-{index:05d}-of-{len(written):05d}.safetensors"
        path.rename(final)
        paths.append(final)
        weight_map.update(dict.fromkeys(names, final.name))
    index_doc = {"metadata": {"total_size": total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index_doc, indent=2) + "\n")
    return paths
