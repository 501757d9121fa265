"""The prompt of `ar2dlm generate`: ``prompt=TEXT`` as typed, or the text of ``prompt_file=PATH`` (``-``: stdin)."""

from __future__ import annotations

import sys
from pathlib import Path

from omegaconf import DictConfig

from ar2dlm.errors import UserError


def read_prompt(cfg: DictConfig) -> str:
    """The prompt text; a file's (or stdin's) one final line break is dropped, as ``$(cat FILE)`` does.

    UserError for an empty prompt or a file that cannot be read as UTF-8 text."""
    if cfg.get("prompt") is not None:
        text, origin = cfg.prompt, "prompt"
    elif cfg.prompt_file == "-":
        text, origin = _without_final_line_break(sys.stdin.read()), "the prompt read from stdin"
    else:
        path = Path(cfg.prompt_file).expanduser()
        try:
            text = _without_final_line_break(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise UserError(f"prompt_file {path} does not exist") from None
        except IsADirectoryError:
            raise UserError(f"prompt_file {path} is a directory, not a text file") from None
        except UnicodeDecodeError:
            raise UserError(f"prompt_file {path} is not UTF-8 text") from None
        except OSError as error:
            raise UserError(f"cannot read prompt_file {path}: {error.strerror or error}") from None
        origin = f"prompt_file {path}"
    if text == "":
        raise UserError(f"{origin} is empty: give the text to continue")
    return text


def _without_final_line_break(text: str) -> str:
    return text.removesuffix("\n").removesuffix("\r")
