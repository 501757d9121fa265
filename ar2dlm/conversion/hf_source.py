"""Inspect a local HF checkpoint directory before converting it: every bad input is one clear error.

Only safetensors weights are read (never pickles). Headers are parsed without loading tensors, so a
corrupt or truncated shard, or tensors whose shapes disagree with config.json, are reported before
any work starts.
"""

from __future__ import annotations

import json
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path

from ar2dlm.errors import UserError
from ar2dlm.fs import read_json_object

# the families the runtime has a class for; the runtime keeps its own copy (modeling_ar2dlm.RUNTIME_CLASSES)
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "MistralForCausalLM")
INDEX_FILE = "model.safetensors.index.json"
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


@dataclass(frozen=True)
class TensorInfo:
    file: Path
    shape: tuple[int, ...]
    dtype: str


@dataclass(frozen=True)
class HFSource:
    path: Path
    config: dict
    architecture: str
    weight_files: tuple[Path, ...]
    tensors: dict[str, TensorInfo]

    @property
    def total_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.weight_files)


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_HUB_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken"]


def resolve_source(source: str | Path) -> Path:
    """A local folder as is; a hub id (``org/name``) that is not a local path is downloaded (safetensors only)."""
    local = Path(source).expanduser()
    if local.exists() or not _HUB_ID.match(str(source)):
        return local
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id=str(source), allow_patterns=_HUB_FILES))
    except Exception as error:  # offline, unknown repo, gated model: all one message for the user
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(f"source {source} is not a local folder and could not be downloaded from the "
                        f"Hugging Face hub ({reason})") from None


def inspect_source(path: str | Path) -> HFSource:
    """Validate a local HF causal-LM checkpoint directory and index its safetensors tensors."""
    root = Path(path).expanduser()
    if not root.exists():
        raise UserError(f"source {root} does not exist")
    if not root.is_dir():
        raise UserError(f"source {root} is not a directory (expected a Hugging Face checkpoint folder)")
    if not os.access(root, os.R_OK | os.X_OK):
        raise UserError(f"source {root} cannot be read (permission denied)")
    config = _read_config(root)
    architecture = _architecture(root, config)
    files = _weight_files(root)
    tensors: dict[str, TensorInfo] = {}
    for file in files:
        tensors.update(_read_header(file))
    source = HFSource(root, config, architecture, tuple(files), tensors)
    check_shapes(source)
    return source


def _read_config(root: Path) -> dict:
    config_path = root / "config.json"
    if not config_path.is_file():
        raise UserError(f"source {root} has no config.json (not a Hugging Face checkpoint folder)")
    return read_json_object(config_path)


def _architecture(root: Path, config: dict) -> str:
    architectures = config.get("architectures") or []
    name = architectures[0] if architectures else f"model_type={config.get('model_type')!r}"
    if name not in SUPPORTED_ARCHITECTURES:
        raise UserError(
            f"unsupported architecture {name} in {root / 'config.json'}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    return name


def _weight_files(root: Path) -> list[Path]:
    index_path = root / INDEX_FILE
    if index_path.is_file():
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise UserError(f"{index_path} cannot be parsed: {error}") from None
        files = [root / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise UserError(f"{index_path} names shard(s) that are missing: {', '.join(missing)}")
        return files
    files = sorted(root.glob("*.safetensors"))
    if files:
        return files
    if list(root.glob("*.bin")) or list(root.glob("*.pt")) or list(root.glob("*.pth")):
        raise UserError(
            f"source {root} has only PyTorch pickle weights (.bin/.pt), which ar2dlm never unpickles; "
            "re-save them as safetensors first, e.g. AutoModelForCausalLM.from_pretrained(src)"
            ".save_pretrained(dst, safe_serialization=True) in an environment you trust"
        )
    raise UserError(f"source {root} has no *.safetensors weights")


def _read_header(file: Path) -> dict[str, TensorInfo]:
    size = file.stat().st_size
    try:
        with file.open("rb") as handle:
            (header_len,) = struct.unpack("<Q", handle.read(8))
            if header_len > size - 8:
                raise ValueError(f"header of {header_len} bytes in a {size}-byte file")
            header = json.loads(handle.read(header_len))
    except (OSError, struct.error, ValueError, UnicodeDecodeError) as error:
        raise UserError(f"{file} is not a valid safetensors file (corrupt or truncated): {error}") from None
    header.pop("__metadata__", None)
    try:
        end = max((int(info["data_offsets"][1]) for info in header.values()), default=0)
        tensors = {name: TensorInfo(file, tuple(info["shape"]), info["dtype"]) for name, info in header.items()}
    except (KeyError, TypeError, ValueError, IndexError) as error:
        raise UserError(f"{file} has a malformed safetensors header: {error}") from None
    if 8 + header_len + end != size:
        raise UserError(f"{file} is truncated or corrupt: expected {8 + header_len + end} bytes, found {size}")
    return tensors


def expected_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """Shapes that config.json implies for the tensors every supported family has."""
    hidden = config["hidden_size"]
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or hidden // heads
    vocab, ffn = config["vocab_size"], config["intermediate_size"]
    shapes = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,)}
    per_layer = {
        "self_attn.q_proj.weight": (heads * head_dim, hidden),
        "self_attn.k_proj.weight": (kv_heads * head_dim, hidden),
        "self_attn.v_proj.weight": (kv_heads * head_dim, hidden),
        "self_attn.o_proj.weight": (hidden, heads * head_dim),
        "mlp.gate_proj.weight": (ffn, hidden),
        "mlp.up_proj.weight": (ffn, hidden),
        "mlp.down_proj.weight": (hidden, ffn),
        "input_layernorm.weight": (hidden,),
        "post_attention_layernorm.weight": (hidden,),
    }
    for layer in range(config["num_hidden_layers"]):
        shapes.update({f"model.layers.{layer}.{name}": shape for name, shape in per_layer.items()})
    if not config.get("tie_word_embeddings", False):
        shapes["lm_head.weight"] = (vocab, hidden)
    return shapes


def check_shapes(source: HFSource) -> None:
    """Refuse tensors that are missing or disagree with config.json."""
    try:
        expected = expected_shapes(source.config)
    except (KeyError, TypeError, ZeroDivisionError) as error:
        raise UserError(f"{source.path / 'config.json'} lacks a required field: {error}") from None
    layers = {int(m.group(1)) for name in source.tensors if (m := _LAYER.match(name))}
    if layers and max(layers) + 1 != source.config["num_hidden_layers"]:
        raise UserError(
            f"weights have {max(layers) + 1} layers but config.json says num_hidden_layers="
            f"{source.config['num_hidden_layers']}"
        )
    for name, shape in expected.items():
        info = source.tensors.get(name)
        if info is None:
            if name == "lm_head.weight":
                continue  # some untied checkpoints still share the matrix; the bridge decides
            raise UserError(f"tensor {name} is missing from the safetensors files of {source.path}")
        if info.shape != shape:
            raise UserError(
                f"shape mismatch: {name} is {list(info.shape)} in {info.file.name} but config.json implies {list(shape)}"
            )
