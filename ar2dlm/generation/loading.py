"""Loading an exported HF folder for ar2dlm's own stages, with the runtime classes of the installed ar2dlm.

ar2dlm's own stages (generate, eval, run, the lm-eval adapter) build the model from
:mod:`ar2dlm.runtime.modeling_ar2dlm` by the folder's architecture; the folder's ``modeling_ar2dlm.py`` /
``decoding_ar2dlm.py`` are never imported. They are what plain ``AutoModelForCausalLM.from_pretrained(
path, trust_remote_code=True)`` runs, so a folder whose runtime is not byte for byte the one this ar2dlm
version writes (an edited file, another ar2dlm version, ``auto_map`` pointing elsewhere) gets a warning.
Before loading, :func:`check_export` and :func:`check_served` turn a folder that is not a usable export into
one clear error.
"""

from __future__ import annotations

import hashlib
from functools import cache
from pathlib import Path

import torch

from ar2dlm import __version__
from ar2dlm.conversion.hf_source import SUPPORTED_ARCHITECTURES
from ar2dlm.conversion.runtime_install import (
    RUNTIME_DIR,
    RUNTIME_FILES,
    SERVED_CLEAN_PATTERN,
    runtime_class_name,
)
from ar2dlm.errors import UserError
from ar2dlm.fs import read_json_object
from ar2dlm.log import logger

_WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@cache
def _written_hashes() -> dict[str, str]:
    return {name: _sha256(RUNTIME_DIR / name) for name in RUNTIME_FILES}


def check_export(model_dir: Path) -> dict:
    """The folder's config.json, after checking it is an ar2dlm export (UserError otherwise)."""
    if not model_dir.is_dir():
        raise UserError(f"model={model_dir} is not a directory")
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise UserError(f"{model_dir} has no config.json: not a Hugging Face checkpoint")
    if not any(any(model_dir.glob(pattern)) for pattern in _WEIGHT_PATTERNS):
        raise UserError(f"{model_dir} has no weights (*.safetensors or pytorch_model*.bin)")
    missing = [name for name in RUNTIME_FILES if not (model_dir / name).is_file()]
    if missing:
        raise UserError(f"{model_dir} lacks the ar2dlm runtime ({', '.join(missing)}): "
                        "export it with `ar2dlm export`")
    config = read_json_object(config_path)
    if config.get("mask_token_id") is None:
        raise UserError(f"{config_path} has no mask_token_id: export the model with `ar2dlm export`")
    return config


def check_served(model_dir: Path, config: dict, asked: list[str]) -> None:
    """UserError when ``asked`` (diffusion decoding modes, the ELBO) needs a causal clean stream that the export's
    training did not have (config.json ``clean_pattern``; exports before ar2dlm recorded it are causal)."""
    pattern = config.get("clean_pattern") or SERVED_CLEAN_PATTERN
    if asked and pattern != SERVED_CLEAN_PATTERN:
        raise UserError(f"{model_dir} was trained with diffusion.clean_pattern={pattern}: {' and '.join(asked)} "
                        f"would read a {SERVED_CLEAN_PATTERN} prefix cache, which it was not trained for; only AR "
                        "decoding (mode ar) serves it")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"device={name!r} is not a torch device (auto, cpu, cuda, cuda:0, ...)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device={name!r} but no CUDA GPU is available")
    return device


def runtime_differences(model_dir: Path) -> list[str]:
    """How the code in ``model_dir`` that ``trust_remote_code=True`` would run differs from what this
    ar2dlm version's export writes (empty: identical)."""
    differences = []
    for name in RUNTIME_FILES:
        path = model_dir / name
        if not path.is_file():
            differences.append(f"{name} is missing")
        elif (digest := _sha256(path)) != _written_hashes()[name]:
            differences.append(f"{name} differs (sha256 {digest[:12]}, ar2dlm writes {_written_hashes()[name][:12]})")
    config = read_json_object(model_dir / "config.json")
    architecture = (config.get("architectures") or [None])[0]
    if architecture in SUPPORTED_ARCHITECTURES:
        expected = {"AutoModelForCausalLM": f"modeling_ar2dlm.{runtime_class_name(architecture)}"}
        if config.get("auto_map") != expected:
            differences.append(f"config.json auto_map is {config.get('auto_map')}, ar2dlm writes {expected}")
    tokenizer_config = model_dir / "tokenizer_config.json"
    if tokenizer_config.is_file() and "auto_map" in read_json_object(tokenizer_config):
        differences.append("tokenizer_config.json names tokenizer code (auto_map)")
    return differences


def warn_if_runtime_differs(model_dir: Path) -> bool:
    """Warn when ``model_dir``'s runtime is not the one this ar2dlm version writes; True if it is."""
    differences = runtime_differences(model_dir)
    if differences:
        logger.warning(
            "%s does not hold the runtime that ar2dlm %s writes: %s. ar2dlm loads the model with its own runtime "
            "and never runs these files, but AutoModelForCausalLM.from_pretrained(..., trust_remote_code=True) "
            "would run them: inspect them, or export the checkpoint again, before loading it that way",
            model_dir, __version__, "; ".join(differences))
    return not differences


def runtime_model_class(model_dir: Path):
    """The tri-mode class of this ar2dlm for the folder's architecture (UserError for others)."""
    from ar2dlm.runtime.modeling_ar2dlm import RUNTIME_CLASSES

    config_path = model_dir / "config.json"
    architecture = (read_json_object(config_path).get("architectures") or [None])[0]
    if architecture not in RUNTIME_CLASSES:
        raise UserError(f"{config_path} names architecture {architecture!r}; ar2dlm's runtime supports "
                        f"{', '.join(RUNTIME_CLASSES)}")
    return RUNTIME_CLASSES[architecture]


def load_runtime_model(model_dir: Path, *, dtype=None, export: bool = True):
    """The folder's weights in this ar2dlm's tri-mode class. ``export=True``: the folder is an ar2dlm export,
    whose runtime is checked; ``export=False``: a source model, checked only if it ships runtime files."""
    model_dir = Path(model_dir)
    model_class = runtime_model_class(model_dir)
    if export or any((model_dir / name).exists() for name in RUNTIME_FILES):
        warn_if_runtime_differs(model_dir)
    kwargs = {} if dtype is None else {"dtype": dtype}
    return model_class.from_pretrained(str(model_dir), **kwargs)


def load_export(model_dir: Path, device: torch.device):
    """Tokenizer and tri-mode model (float32 on CPU, the checkpoint's dtype on a GPU), built with this
    ar2dlm's runtime: the folder's own runtime files are never run (a warning says if they differ)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=False)
    except Exception as error:  # transformers raises many types for a missing/broken tokenizer
        raise UserError(f"cannot load the tokenizer of {model_dir}: {error}".splitlines()[0]) from None
    dtype = torch.float32 if device.type == "cpu" else "auto"
    model = load_runtime_model(model_dir, dtype=dtype)
    return tokenizer, model.to(device).eval()
