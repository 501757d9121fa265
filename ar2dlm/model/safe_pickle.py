"""Refuse a distributed checkpoint whose pickles could run code while megatron-core loads it.

Loading ``weights/`` (megatron-core ``torch_dist`` format) reads JSON (``metadata.json``), tensor data
(``torch.load(weights_only=True)`` inside torch) and these pickles:

    .metadata                   torch's checkpoint metadata, read with plain ``pickle.load``
    byte entries of *.distcp    ``torch.save``'d objects (the layers' ``_extra_state``), read with
                                ``torch.load(weights_only=False)``
    _extra_state byte tensors   Transformer Engine layers ``pickle.loads`` them in ``load_state_dict``
    common.pt                   ``torch.load`` with torch's default (weights only, unless
                                TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD is set)

:func:`check_distributed_checkpoint` reads every one of them first, with an unpickler that admits only
the classes and functions these files hold when ar2dlm writes them (``torch.load(weights_only=True)`` for
the ``torch.save`` files). megatron-core then loads the checked bytes unchanged; nothing in torch or
megatron-core is patched. A file swapped between the check and the load is not covered.
"""

from __future__ import annotations

import io
import json
import pickle
import re
from pathlib import Path

import torch

from ar2dlm.errors import UserError

_DCP = "torch.distributed.checkpoint"
_DCP_CLASSES = {
    f"{_DCP}.metadata": ("Metadata", "StorageMeta", "MetadataIndex", "ChunkStorageMetadata", "TensorProperties",
                         "TensorStorageMetadata", "BytesStorageMetadata", "_MEM_FORMAT_ENCODING"),
    f"{_DCP}.planner": ("SavePlan", "WriteItem", "WriteItemType", "TensorWriteData", "BytesIOWriteData"),
    f"{_DCP}.filesystem": ("_StorageInfo",),
}
_TORCH_DTYPES = frozenset(("torch", name) for name, value in vars(torch).items() if isinstance(value, torch.dtype))
METADATA_GLOBALS = frozenset(
    {(module, name) for module, names in _DCP_CLASSES.items() for name in names}
    | {("torch", "Size"), ("torch.serialization", "_get_layout")} | _TORCH_DTYPES)

_TE_RECIPES = ("Format", "_FormatHelper", "_OverrideLinearPrecision", "DelayedScaling", "Float8CurrentScaling",
               "MXFP8BlockScaling", "Float8BlockScaling", "NVFP4BlockScaling", "QParams", "MMParams")
# Transformer Engine's FP8 state: the recipe (dataclasses, enums, named tuples) and pickled CPU tensors.
EXTRA_STATE_GLOBALS = frozenset(
    {("transformer_engine.common.recipe", name) for name in _TE_RECIPES}
    | {("torch._utils", "_rebuild_tensor_v2"), ("torch.storage", "_load_from_bytes"), ("collections", "OrderedDict"),
       ("torch", "Size")} | _TORCH_DTYPES)

DCP_METADATA_FILE = ".metadata"
CONFIG_FILE = "metadata.json"
COMMON_FILE = "common.pt"
_BACKENDS = {"sharded_backend": "torch_dist", "sharded_backend_version": 1, "common_backend": "torch",
             "common_backend_version": 1}
_TORCH_REFUSED_GLOBAL = re.compile(r"Unsupported global: GLOBAL (\S+)")
_TORCH_REFUSAL = re.compile(r"WeightsUnpickler error:\s*([^\n]+)")


class _ForbiddenGlobal(Exception):
    pass


class _StandIn:
    """What a checked Transformer Engine pickle gets for an admitted class: takes any arguments, runs nothing."""

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass


class _AllowListUnpickler(pickle.Unpickler):
    """Resolves a global only if it is in ``allowed``; ``substitute(module, name)`` may hand the pickle
    something else for it (None: the real object)."""

    def __init__(self, file, allowed: frozenset, substitute=None):
        super().__init__(file)
        self.allowed, self.substitute = allowed, substitute

    def find_class(self, module: str, name: str):
        if (module, name) not in self.allowed:
            raise _ForbiddenGlobal(f"{module}.{name}")
        replacement = self.substitute(module, name) if self.substitute else None
        return super().find_class(module, name) if replacement is None else replacement


def _refusal(where: str, reference: str) -> UserError:
    return UserError(f"refusing to load {where}: it references {reference}, which a checkpoint never contains "
                     "(the file may have been tampered with)")


def _unreadable(where: str, error: Exception) -> UserError:
    detail = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return UserError(f"cannot read {where} (damaged, or not written by ar2dlm): {detail}")


def _unpickle(data: bytes, where: str, allowed: frozenset, substitute=None):
    try:
        return _AllowListUnpickler(io.BytesIO(data), allowed, substitute).load()
    except _ForbiddenGlobal as error:
        raise _refusal(where, str(error)) from None
    except UserError:
        raise
    except Exception as error:  # a damaged pickle raises many types
        raise _unreadable(where, error) from None


def _load_weights_only(source, where: str):
    try:
        return torch.load(source, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        refused_global = _TORCH_REFUSED_GLOBAL.search(str(error))
        if refused_global:
            raise _refusal(where, refused_global.group(1)) from None
        refused = _TORCH_REFUSAL.search(str(error))
        detail = refused.group(1).strip() if refused else "not plain tensors and data"
        raise UserError(f"refusing to load {where}: {detail} (the file may have been tampered with)") from None
    except Exception as error:
        raise _unreadable(where, error) from None


def _check_backend(weights_dir: Path) -> None:
    path = weights_dir / CONFIG_FILE
    if not path.is_file():
        raise UserError(f"{weights_dir} is not a megatron-core distributed checkpoint: {CONFIG_FILE} is missing")
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise _unreadable(str(path), error) from None
    found = {key: config.get(key) for key in _BACKENDS} if isinstance(config, dict) else config
    if found != _BACKENDS:
        raise UserError(f"refusing to load {weights_dir}: {CONFIG_FILE} names the backends {found}; ar2dlm writes "
                        f"and checks only {_BACKENDS}")


def _read_dcp_metadata(weights_dir: Path):
    from torch.distributed.checkpoint.metadata import Metadata

    path = weights_dir / DCP_METADATA_FILE
    if not path.is_file():
        raise UserError(f"{weights_dir} is not a megatron-core distributed checkpoint: {DCP_METADATA_FILE} is missing")
    metadata = _unpickle(path.read_bytes(), str(path), METADATA_GLOBALS)
    if not isinstance(metadata, Metadata) or not isinstance(metadata.storage_data, dict):
        raise UserError(f"refusing to load {path}: it holds a {type(metadata).__name__}, not checkpoint metadata")
    return metadata


def _data_file(weights_dir: Path, relative_path: str, where: str) -> Path:
    path = (weights_dir / relative_path).resolve()
    if weights_dir.resolve() not in path.parents:
        raise UserError(f"refusing to load {where}: its entries point outside the checkpoint ({relative_path})")
    return path


def _byte_entries(metadata) -> list[tuple[str, object]]:
    """(key, storage info) of every ``torch.save``'d entry, which the load ``torch.load(weights_only=False)``s."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    byte_keys = {key for key, entry in metadata.state_dict_metadata.items() if isinstance(entry, BytesStorageMetadata)}
    return [(index.fqn, info) for index, info in metadata.storage_data.items() if index.fqn in byte_keys]


def _check_byte_entry(weights_dir: Path, key: str, info) -> None:
    data_file = _data_file(weights_dir, info.relative_path, str(weights_dir / DCP_METADATA_FILE))
    where = f"{data_file} (entry {key})"
    if getattr(info, "transform_descriptors", None):
        raise UserError(f"refusing to load {where}: it is stored with transforms "
                        f"{list(info.transform_descriptors)}, which ar2dlm never writes")
    try:
        with data_file.open("rb") as handle:
            handle.seek(info.offset)
            blob = handle.read(info.length)
    except OSError as error:
        raise _unreadable(where, error) from None
    value = _load_weights_only(io.BytesIO(blob), where)
    if "_extra_state" in key:
        _check_extra_state(value, where)


def _check_extra_state(value, where: str) -> None:
    """Transformer Engine unpickles a non-empty uint8 tensor (or ``torch.load``s a BytesIO) found here."""
    if isinstance(value, (list, tuple)):
        for item in value:
            _check_extra_state(item, where)
    elif isinstance(value, dict):
        for item in value.values():
            _check_extra_state(item, where)
    elif isinstance(value, io.BytesIO):
        _load_weights_only(io.BytesIO(value.getvalue()), where)
    elif isinstance(value, torch.Tensor) and value.dtype == torch.uint8 and value.numel() > 0:
        _check_extra_state_pickle(value.detach().cpu().numpy().tobytes(), where)


def _check_extra_state_pickle(data: bytes, where: str) -> None:
    """Nothing of Transformer Engine is imported: its classes get a stand-in, and so do tensors, whose
    storage bytes are checked instead."""

    def substitute(module: str, name: str):
        if (module, name) == ("torch.storage", "_load_from_bytes"):
            return lambda storage_bytes: _load_weights_only(io.BytesIO(storage_bytes), where)
        if module.startswith("transformer_engine") or (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _StandIn
        return None

    _unpickle(data, f"{where}, its Transformer Engine state", EXTRA_STATE_GLOBALS, substitute)


def check_distributed_checkpoint(weights_dir: str | Path) -> None:
    """Read every pickle that loading ``weights_dir`` would unpickle, with only the globals ar2dlm's
    checkpoints contain admitted; UserError naming the file and the global otherwise."""
    weights_dir = Path(weights_dir).expanduser()
    _check_backend(weights_dir)
    metadata = _read_dcp_metadata(weights_dir)
    try:
        for key, info in _byte_entries(metadata):
            _check_byte_entry(weights_dir, key, info)
    except (AttributeError, TypeError, ValueError) as error:  # a pickle of admitted classes, not what torch writes
        raise _unreadable(str(weights_dir / DCP_METADATA_FILE), error) from None
    common = weights_dir / COMMON_FILE
    if common.is_file():
        _load_weights_only(common, str(common))
