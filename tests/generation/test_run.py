"""`ar2dlm generate` in-process: the text and stats line, and one-line UserErrors for bad input."""

from __future__ import annotations

import json
import re

import pytest
from omegaconf import OmegaConf

from ar2dlm.errors import UserError

STATS = re.compile(r"^new tokens: (\d+) \| NFE: (\d+) \| tokens/forward: [\d.]+ \| tokens/s: [\d.]+$")


def generate_config(model, **overrides):
    values = {"model": str(model), "mode": "self_spec", "prompt": "the quick brown fox", "max_new_tokens": 8,
              "block_length": 4, "threshold": 0.9, "temperature": 0.0, "device": "cpu",
              "logging": {"level": "INFO", "tensorboard": False, "wandb": False, "wandb_project": "ar2dlm",
                          "run_name": None}}
    return OmegaConf.create(values | overrides)


@pytest.fixture
def export_dir(make_export):
    return make_export("LlamaForCausalLM", name="cli-export", max_position_embeddings=64)


@pytest.mark.parametrize("mode, nfe", [
    ("ar", 8),
    ("diffusion", 1 + 1 + 1 + 1),  # prefill; block C0 F F F in one pass (F at 0.985 >= 0.9); causal pass; F F F F
    ("self_spec", 1 + 2 * 4),  # prefill: C0; cycles give C1 | C2 | C3 | F F F F (the draft F F F accepted)
])
def test_generate_prints_text_and_stats(mode, nfe, known, tiny_tokenizer, capsys):
    """The known-answer export (tests/conftest.py) continues "...fox" with C0 C1 C2 C3 F F F F."""
    from ar2dlm.generation.run import run_generate

    assert run_generate(generate_config(known.path, mode=mode)) == 0
    *text, stats = capsys.readouterr().out.rstrip("\n").split("\n")
    match = STATS.match(stats)
    assert match, stats
    assert (int(match.group(1)), int(match.group(2))) == (8, nfe)
    c, f = known.chain, known.fixed
    expected = {"diffusion": [c[0]] + [f] * 7}.get(mode, list(c) + [f] * 4)
    assert "\n".join(text) == tiny_tokenizer.decode(expected, skip_special_tokens=True)


@pytest.mark.parametrize("overrides, message", [
    ({"max_new_tokens": 0}, "max_new_tokens"),
    ({"block_length": 0}, "block_length"),
    ({"threshold": 1.5}, "threshold"),
    ({"temperature": -0.5}, "temperature"),
    ({"mode": "beam"}, "mode"),
    ({"device": "nonsense"}, "device"),
    ({"prompt": "the quick brown fox " * 20}, "context window"),
    ({"max_new_tokens": 64}, "context window"),
])
def test_bad_arguments_raise_user_error(overrides, message, export_dir):
    from ar2dlm.generation.run import run_generate

    with pytest.raises(UserError, match=message) as error:
        run_generate(generate_config(export_dir, **overrides))
    assert "\n" not in str(error.value)


def _without(path, name):
    (path / name).unlink()
    return path


def _config_without_mask(path):
    config_path = path / "config.json"
    config = json.loads(config_path.read_text())
    del config["mask_token_id"]
    config_path.write_text(json.dumps(config))
    return path


@pytest.mark.parametrize("damage, message", [
    (lambda p: p / "missing", "not a directory"),
    (lambda p: _without(p, "config.json"), "config.json"),
    (lambda p: _without(p, "model.safetensors"), "no weights"),
    (lambda p: _without(p, "modeling_ar2dlm.py"), "runtime"),
    (_config_without_mask, "mask_token_id"),
])
def test_broken_export_raises_user_error(damage, message, export_dir):
    from ar2dlm.generation.run import run_generate

    with pytest.raises(UserError, match=message):
        run_generate(generate_config(damage(export_dir)))
