"""megatron-bridge's AutoBridge, the maintained HF <-> Megatron mapping for every supported family.

Loading is lazy: ``AutoBridge.from_hf_pretrained`` reads config.json and the safetensors index, and
weights are then streamed tensor by tensor into the Megatron model (the HF torch model is never
built). The model is built without initialising its parameters, as megatron-bridge's own loading does:
every one is filled from the source (checked), so converting needs about one copy of the model in memory.
"""

from __future__ import annotations

import io
import json
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, redirect_stdout
from pathlib import Path

import torch
from safetensors import safe_open
from torch.utils._python_dispatch import TorchDispatchMode

from ar2dlm.compat import import_megatron_bridge
from ar2dlm.errors import UserError
from ar2dlm.log import logger
from ar2dlm.model.gpt import build_model, prepare_provider

VOCAB_PARAMS = ("embedding.word_embeddings.weight", "output_layer.weight")
HF_VOCAB_TENSORS = {"embedding.word_embeddings.weight": "model.embed_tokens.weight",
                    "output_layer.weight": "lm_head.weight"}


def auto_bridge(hf_dir: str | Path):
    """An AutoBridge over a local HF folder (config and tensor index only; weights stay on disk)."""
    import_megatron_bridge()
    from megatron.bridge import AutoBridge

    return AutoBridge.from_hf_pretrained(str(hf_dir))


@contextmanager
def native_view(hf_dir: Path) -> Iterator[Path]:
    """``hf_dir``, or a linked copy without ``auto_map`` when its config names remote code.

    megatron-bridge dispatches on the remote-code class named in ``auto_map``; an ar2dlm export (or any
    checkpoint of a supported family that carries remote code) must be read as its native architecture.
    """
    config = json.loads((hf_dir / "config.json").read_text())
    if "auto_map" not in config:
        yield hf_dir
        return
    with tempfile.TemporaryDirectory(prefix="ar2dlm-native-") as scratch:
        view = Path(scratch)
        for item in hf_dir.iterdir():
            if item.name != "config.json":
                (view / item.name).symlink_to(item.resolve())
        config.pop("auto_map")
        (view / "config.json").write_text(json.dumps(config, indent=2))
        yield view


def bridge_from_config(hf_config):
    """An AutoBridge from a transformers config alone (no weights), e.g. to rebuild a saved model."""
    import_megatron_bridge()
    from megatron.bridge import AutoBridge

    return AutoBridge.from_hf_config(hf_config)


def megatron_provider(bridge, hf_config, *, params_dtype: torch.dtype | None = None,
                      vocab_size: int | None = None, seq_length: int | None = None):
    """The bridge's provider for this HF config, prepared for block-diffusion attention."""
    provider = bridge.to_megatron_provider(load_weights=False)
    if vocab_size is not None:
        provider.vocab_size = vocab_size
    return prepare_provider(provider, params_dtype=params_dtype, hf_config=hf_config, seq_length=seq_length)


def log_shard_progress(bridge) -> None:
    """Log each safetensors shard when the bridge first reads from it."""
    source = bridge.hf_pretrained.state.source
    file_of = getattr(source, "key_to_filename_map", None) or {}
    shards = sorted(set(file_of.values()))
    if not shards:
        return
    seen: set[str] = set()
    load = source.load_tensors

    def load_and_report(keys):
        for name in sorted({file_of.get(key) for key in keys} - seen - {None}):
            seen.add(name)
            logger.info("reading shard %d/%d: %s", len(seen), len(shards), name)
        return load(keys)

    source.load_tensors = load_and_report


# what megatron-bridge prints for each vocabulary matrix it skips; load_grown_vocabulary fills them instead
_SKIPPED_VOCAB_LINE = re.compile(r"^WARNING: Shape mismatch for megatron param .* allowed by whitelist\. Skipping\.$")


def load_weights(bridge, model_chunks: list, skip_vocab: bool = False) -> None:
    """Stream HF weights into the Megatron model; vocabulary matrices are skipped when resized."""
    if not skip_vocab:
        bridge.load_hf_weights(model_chunks)
        return
    printed = io.StringIO()
    with redirect_stdout(printed):
        bridge.load_hf_weights(model_chunks, allowed_mismatched_params=list(VOCAB_PARAMS))
    for line in printed.getvalue().splitlines():
        if not _SKIPPED_VOCAB_LINE.match(line):
            print(line)


def load_grown_vocabulary(model, hf_dir: Path, weight_files: dict[str, Path], original_rows: int,
                          initialise_rows: list[int]) -> None:
    """Copy the HF vocabulary matrices into (possibly larger) Megatron ones; set new rows to the mean row."""
    for megatron_name, hf_name in HF_VOCAB_TENSORS.items():
        parameter = dict(model.named_parameters()).get(megatron_name)
        if parameter is None or hf_name not in weight_files:
            continue
        with safe_open(str(weight_files[hf_name]), framework="pt") as handle:
            source = handle.get_tensor(hf_name)
        with torch.no_grad():
            parameter[: source.shape[0]].copy_(source.to(parameter.dtype))
            mean = source[:original_rows].double().mean(dim=0).to(parameter.dtype)
            for row in initialise_rows:
                parameter[row].copy_(mean)


class ParameterWrites(TorchDispatchMode):
    """Records which storages in-place operations write to, to tell which parameters were filled."""

    def __init__(self):
        super().__init__()
        self.storages: set[int] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        target = kwargs.get("out", args[0] if args and func._schema.name.endswith("_") else None)
        if isinstance(target, torch.Tensor):
            self.storages.add(target.untyped_storage().data_ptr())
        return func(*args, **kwargs)

    def check_all_written(self, model_chunks: list) -> None:
        missing = [name for chunk in model_chunks for name, parameter in chunk.named_parameters()
                   if parameter.untyped_storage().data_ptr() not in self.storages]
        if missing:
            raise UserError(f"megatron-bridge filled no value from the source into {', '.join(missing)}: this "
                            "checkpoint's tensors do not match its architecture (see the warnings above)")


def build_converted_model(hf_dir: Path, hf_config, params_dtype: torch.dtype | None, vocab_size: int,
                          weight_files: dict[str, Path], tokenizer_rows: int, initialise_rows: list[int]):
    """Megatron model chunks with the HF weights, the vocabulary grown and mask rows initialised."""
    with native_view(hf_dir) as view:
        bridge = auto_bridge(view)
        log_shard_progress(bridge)
        provider = megatron_provider(bridge, hf_config, params_dtype=params_dtype, vocab_size=vocab_size)
        provider.perform_initialization = False
        chunks = build_model(provider)
        vocab_changed = vocab_size != hf_config.vocab_size or bool(initialise_rows)
        original_rows = min(tokenizer_rows, hf_config.vocab_size)
        with ParameterWrites() as writes:
            load_weights(bridge, chunks, skip_vocab=vocab_changed)
            if vocab_changed:
                load_grown_vocabulary(chunks[0], hf_dir, weight_files, original_rows, initialise_rows)
        writes.check_all_written(chunks)
    if vocab_changed:
        logger.info("vocabulary %d -> %d rows: the source's embedding (and output layer) rows are copied; new "
                    "mask-token row(s) %s start as the mean of its first %d rows", hf_config.vocab_size, vocab_size,
                    initialise_rows or "none", original_rows)
    return bridge, provider, chunks
