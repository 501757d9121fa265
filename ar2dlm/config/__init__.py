"""Stage configurations: Hydra-composed recipes validated against typed schemas."""

from ar2dlm.config.compose import ConfigError, compose_stage, recipes_dir, required_keys, stage_keys

__all__ = ["ConfigError", "compose_stage", "recipes_dir", "required_keys", "stage_keys"]
