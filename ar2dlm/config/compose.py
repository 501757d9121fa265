"""Compose a stage's configuration from ``recipes/`` with Hydra, then check it against its schema."""

from __future__ import annotations

import re
from importlib import resources
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ar2dlm.config.schema import STAGE_SCHEMAS
from ar2dlm.config.validate import validate_stage
from ar2dlm.errors import UserError
from ar2dlm.log import logger


class ConfigError(UserError):
    """A configuration that cannot run; the message is meant for the user as it is."""


# Keys whose ``key=value`` is taken as the literal text after the first "=": Hydra's override grammar would
# read commas as a sweep, quotes and brackets as syntax and ${...} as an interpolation.
VERBATIM_KEYS: dict[str, tuple[str, ...]] = {"generate": ("prompt", "prompt_file")}
# Values renamed since users' configs were written: (key, old spelling) -> new spelling, accepted with a warning.
RENAMED_VALUES: dict[tuple[str, str], str] = {("diffusion.clean_pattern", "bidirectional"): "none"}


def recipes_dir() -> Path:
    """The recipe tree: packaged as ``ar2dlm.recipes`` in a wheel, ``recipes/`` in a clone."""
    try:
        packaged = Path(str(resources.files("ar2dlm.recipes")))
        if (packaged / "train.yaml").is_file():
            return packaged
    except ModuleNotFoundError:
        pass
    clone = Path(__file__).resolve().parents[2] / "recipes"
    if (clone / "train.yaml").is_file():
        return clone
    raise ConfigError("cannot find the recipe tree (recipes/); reinstall ar2dlm")


def available_recipes() -> list[str]:
    return sorted(p.stem for p in (recipes_dir() / "recipe").glob("*.yaml"))


def _hydra_compose(stage: str, overrides: list[str]) -> DictConfig:
    from hydra import compose, initialize_config_dir
    from hydra.core.config_store import ConfigStore
    from hydra.errors import HydraException

    store = ConfigStore.instance()
    for name, schema in STAGE_SCHEMAS.items():
        store.store(name=f"{name}_schema", node=schema)
    try:
        with initialize_config_dir(config_dir=str(recipes_dir()), version_base="1.3", job_name="ar2dlm"):
            return compose(config_name=stage, overrides=overrides)
    except HydraException as error:
        raise ConfigError(_hydra_message(error)) from None
    except OmegaConfBaseException as error:
        raise ConfigError(_first_line(str(error))) from None


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else text


def _hydra_message(error: Exception) -> str:
    text = str(error).strip()
    cause = error.__cause__
    if "Could not find 'recipe/" in text:
        return f"{_first_line(text)}; available recipes: {', '.join(available_recipes())}"
    if text.startswith("In 'recipe") and "not in" in text:
        recipe = text.split("'")[1].split("/")[-1]
        key = text.split("Key '")[1].split("'")[0] if "Key '" in text else "?"
        return f"recipe {recipe!r} sets {key!r}, which this stage does not have (the recipe is for another stage)"
    if isinstance(cause, OmegaConfBaseException):
        key = getattr(cause, "full_key", "") or ""
        if "not in '" in str(cause):
            return f"unknown key {key!r} (see `--help` for the keys of this stage)"
        return f"bad value for {key!r}: {_first_line(str(cause))}" if key else _first_line(str(cause))
    if "Could not override" in text or "not in struct" in text or "Key '" in text:
        key = text.split("'")[1] if "'" in text else text
        return f"unknown key {key!r} (see `--help` for the keys of this stage)"
    if "LexerNoViableAlt" in text or "mismatched input" in text or "no viable alternative" in text:
        return f"cannot parse override ({_first_line(text)}); use key=value"
    return _first_line(text)


def _check_types(stage: str, cfg: DictConfig) -> DictConfig:
    schema = OmegaConf.structured(STAGE_SCHEMAS[stage])
    try:
        return OmegaConf.merge(schema, cfg)
    except OmegaConfBaseException as error:
        key = getattr(error, "full_key", None) or ""
        message = _first_line(str(error))
        if "Key" in message and "not in" in message:
            raise ConfigError(f"unknown key {key!r} for stage {stage!r} (see `ar2dlm {stage} --help`)") from None
        raise ConfigError(f"bad value for {key!r}: {message}") from None


def compose_stage(stage: str, overrides: list[str] | None = None, require_complete: bool = True) -> DictConfig:
    """Compose, type-check and (unless ``require_complete`` is False) fully validate a stage's config."""
    if stage not in STAGE_SCHEMAS:
        raise ConfigError(f"unknown stage {stage!r}; stages: {', '.join(STAGE_SCHEMAS)}")
    verbatim, overrides = _split_verbatim(stage, list(overrides or []))
    bad = [item for item in overrides if "=" not in item]
    if bad:
        raise ConfigError(f"overrides must look like key=value, got {bad[0]!r}")
    cfg = _check_types(stage, _hydra_compose(stage, overrides))
    for key, value in verbatim.items():
        cfg[key] = _literal(value)
    _rename_old_values(cfg)
    if require_complete:
        missing = sorted(OmegaConf.missing_keys(cfg))
        if missing:
            raise ConfigError(f"missing required key(s) for `ar2dlm {stage}`: {', '.join(missing)}")
        problems = validate_stage(stage, cfg)
        if problems:
            raise ConfigError("; ".join(problems))
    OmegaConf.set_readonly(cfg, True)
    return cfg


def _rename_old_values(cfg: DictConfig) -> None:
    for (key, old), new in RENAMED_VALUES.items():
        if OmegaConf.select(cfg, key, default=None) == old:
            logger.warning("%s=%s is deprecated: it is now spelled %s=%s", key, old, key, new)
            OmegaConf.update(cfg, key, new)


def _split_verbatim(stage: str, overrides: list[str]) -> tuple[dict[str, str], list[str]]:
    """The stage's verbatim ``key=value`` items (the last one of a key wins), and the other overrides."""
    keys = VERBATIM_KEYS.get(stage, ())
    verbatim, rest = {}, []
    for item in overrides:
        key, equals, value = item.partition("=")
        if equals and key in keys:
            verbatim[key] = value
        else:
            rest.append(item)
    return verbatim, rest


def _literal(text: str) -> str:
    """``text`` escaped so that OmegaConf returns it as it is (no ${...} interpolation)."""
    return re.sub(r"(\\*)\$\{", lambda match: match.group(1) * 2 + "\\${", text)


def stage_keys(stage: str, overrides: list[str] | None = None) -> list[tuple[str, Any]]:
    """Every leaf key of a stage's config with its default (after the recipe and overrides)."""
    cfg = compose_stage(stage, overrides, require_complete=False)
    return list(_leaves(cfg, ""))


def _leaves(node: Any, prefix: str):
    if isinstance(node, DictConfig):
        for key in node.keys():
            value = node._get_node(key)
            path = f"{prefix}{key}"
            if isinstance(value, DictConfig):
                yield from _leaves(value, path + ".")
            elif isinstance(value, ListConfig):
                yield path, OmegaConf.to_container(value)
            else:
                yield path, value._value()


def required_keys(stage: str) -> list[str]:
    """The keys a stage cannot run without (those whose schema default is ``???``)."""
    return sorted(OmegaConf.missing_keys(compose_stage(stage, [], require_complete=False)))
