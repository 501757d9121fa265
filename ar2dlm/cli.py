"""`ar2dlm <stage> [key=value ...]`: compose the stage's config from recipes/ and run it."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable

from ar2dlm import __version__
from ar2dlm.errors import UserError

# stage -> "module:function"; imported lazily so that --help never pays for torch/megatron imports
STAGE_ENTRY_POINTS: dict[str, str] = {
    "convert": "ar2dlm.conversion.convert:run_convert",
    "train": "ar2dlm.training.loop:run_train",
    "export": "ar2dlm.conversion.export:run_export",
    "generate": "ar2dlm.generation.run:run_generate",
    "eval": "ar2dlm.eval.run:run_eval",
    "run": "ar2dlm.pipeline:run_pipeline",
    "data_prepare": "ar2dlm.data.prepare:run_prepare",
    "data_continue": "ar2dlm.data.continuations:run_continue",
    "plan": "ar2dlm.planning.report:run_plan",
}
# options of one stage only: --NAME becomes the entry point's keyword argument NAME=True
STAGE_OPTIONS: dict[str, dict[str, str]] = {"plan": {"--json": "print the plan as JSON (bytes, FLOPs, seconds)"}}
# multi-word commands: `ar2dlm data prepare ...` runs stage data_prepare
SUBCOMMANDS = {("data", "prepare"): "data_prepare", ("data", "continue"): "data_continue"}

USAGE = """usage: ar2dlm <stage> [recipe=NAME] [key=value ...] [--help | --cfg]
       ar2dlm data prepare source.path=... tokenizer=... output=...
       ar2dlm data continue model=... source.path=... output=...

stages:
{stages}

  ar2dlm <stage> --help   list the stage's keys: default, meaning and allowed values
  ar2dlm <stage> --cfg    print the composed configuration and exit
  ar2dlm plan --json      print the plan as JSON, for scripts
"""


def _usage() -> str:
    from ar2dlm.config.schema import STAGE_SUMMARIES

    names = {stage: " ".join(words) for words, stage in SUBCOMMANDS.items()}
    return USAGE.format(stages="\n".join(f"  {names.get(name, name):<13} {text}"
                                          for name, text in STAGE_SUMMARIES.items()))


def _format_value(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str) and value == "???":
        return "??? (required)"
    return repr(value) if isinstance(value, str) else str(value)


def _stage_help(stage: str, overrides: list[str]) -> str:
    from ar2dlm.config.compose import available_recipes, stage_keys
    from ar2dlm.config.descriptions import describe
    from ar2dlm.config.schema import STAGE_SUMMARIES

    keys = stage_keys(stage, overrides)
    width = max(len(key) for key, _ in keys)
    command = next((" ".join(words) for words, name in SUBCOMMANDS.items() if name == stage), stage)
    lines = [f"usage: ar2dlm {command} [recipe=NAME] [key=value ...]", "", STAGE_SUMMARIES[stage], "",
             "keys (name and default, then what it does and the values it takes):"]
    for key, value in keys:
        lines += [f"  {key:<{width}}  {_format_value(value)}", f"      {describe(stage, key) or '(undocumented)'}"]
    options = STAGE_OPTIONS.get(stage, {})
    if options:
        lines += ["", "options:"] + [f"  {flag}  {text}" for flag, text in options.items()]
    lines += ["", f"recipes: {', '.join(available_recipes())}"]
    return "\n".join(lines)


def _entry_point(stage: str) -> Callable:
    module_name, function_name = STAGE_ENTRY_POINTS[stage].split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name == module_name:
            raise UserError(f"stage {stage!r} is not available in ar2dlm {__version__} yet") from None
        raise
    return getattr(module, function_name)


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    if args[0] == "--version":
        print(f"ar2dlm {__version__}")
        return 0
    stage, rest = args[0], args[1:]
    if rest and (stage, rest[0]) in SUBCOMMANDS:
        stage, rest = SUBCOMMANDS[(stage, rest[0])], rest[1:]
    flags = [a for a in rest if a.startswith("--")]
    overrides = [a for a in rest if not a.startswith("--")]
    try:
        if stage not in STAGE_ENTRY_POINTS:
            raise UserError(f"unknown stage {stage!r}; stages: {', '.join(STAGE_ENTRY_POINTS)}")
        stage_options = STAGE_OPTIONS.get(stage, {})
        unknown = [f for f in flags if f not in ("--help", "-h", "--cfg", *stage_options)]
        if unknown:
            known = ", ".join(["--help", "--cfg", *stage_options])
            raise UserError(f"unknown option {unknown[0]!r}; options: {known}")
        if "--help" in flags:
            print(_stage_help(stage, overrides))
            return 0
        from omegaconf import OmegaConf

        from ar2dlm.config.compose import compose_stage

        if "--cfg" in flags:
            print(OmegaConf.to_yaml(compose_stage(stage, overrides, require_complete=False)), end="")
            return 0
        cfg = compose_stage(stage, overrides)
        from ar2dlm.compat import configure_torch_for_cpu
        from ar2dlm.expected_warnings import silence_expected_warnings
        from ar2dlm.log import setup_logging

        setup_logging(cfg.logging.level)
        silence_expected_warnings()
        configure_torch_for_cpu()
        options = {flag.removeprefix("--"): True for flag in flags if flag in stage_options}
        result = _entry_point(stage)(cfg, **options)
        return int(result or 0)
    except UserError as error:
        command = next((" ".join(words) for words, name in SUBCOMMANDS.items() if name == stage), stage)
        print(f"ar2dlm {command}: {error.label}: {error}", file=sys.stderr)
        return error.exit_code
    except BrokenPipeError:  # e.g. `ar2dlm train --help | head`; any other broken pipe is a failure
        if _stdout_is_open():
            raise
        return 0
    except KeyboardInterrupt:
        print(f"ar2dlm {stage}: interrupted", file=sys.stderr)
        return 130


def _stdout_is_open() -> bool:
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        return False
    return True


if __name__ == "__main__":
    sys.exit(main())
