"""ar2dlm's stages load an export with the installed runtime: a planted modeling_ar2dlm.py never runs
(generate, eval) and the folder gets a warning; an untouched export loads without one."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from ar2dlm.errors import UserError
from ar2dlm.generation.loading import load_runtime_model, runtime_differences
from ar2dlm.log import logger


def plant_runtime(folder: Path, marker: Path) -> Path:
    """The real runtime with one line added that writes ``marker`` when the file is imported."""
    modeling = folder / "modeling_ar2dlm.py"
    modeling.write_text(modeling.read_text() + f"\nopen({str(marker)!r}, 'w').write('ran')\n")
    return folder


@pytest.fixture
def warnings_seen():
    """The ar2dlm logger's warnings (it does not propagate to the root logger once configured)."""
    seen: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: seen.append(record.getMessage())
    logger.addHandler(handler)
    yield seen
    logger.removeHandler(handler)


@pytest.fixture
def export_dir(make_export):
    return make_export("LlamaForCausalLM", name="loading-export", max_position_embeddings=64)


def test_untouched_export_loads_without_warning(export_dir, warnings_seen):
    assert runtime_differences(export_dir) == []
    model = load_runtime_model(export_dir)
    assert type(model).__module__ == "ar2dlm.runtime.modeling_ar2dlm" and warnings_seen == []


def test_generate_never_runs_a_planted_runtime_and_warns(export_dir, tmp_path, warnings_seen, capsys):
    from ar2dlm.generation.run import run_generate

    marker = tmp_path / "marker"
    plant_runtime(export_dir, marker)
    cfg = OmegaConf.create({"model": str(export_dir), "mode": "self_spec", "prompt": "the quick brown fox",
                            "max_new_tokens": 4, "block_length": 4, "threshold": 0.9, "temperature": 0.0,
                            "device": "cpu"})
    assert run_generate(cfg) == 0
    assert not marker.exists()
    assert capsys.readouterr().out.rstrip().splitlines()[-1].startswith("new tokens:")
    assert len(warnings_seen) == 1 and "modeling_ar2dlm.py differs" in warnings_seen[0]
    assert "trust_remote_code=True) would run them" in warnings_seen[0]


def test_eval_never_runs_a_planted_runtime(export_dir, tmp_path, warnings_seen):
    from ar2dlm.cli import main

    marker = tmp_path / "marker"
    plant_runtime(export_dir, marker)
    assert main(["eval", f"model={export_dir}", f"output={tmp_path / 'report'}", "tasks=[demo:2]", "modes=[ar]",
                 "max_new_tokens=2", "elbo_draws=0", "device=cpu"]) == 0
    assert not marker.exists() and any("modeling_ar2dlm.py differs" in w for w in warnings_seen)


def test_auto_map_elsewhere_is_reported(export_dir):
    config_path = export_dir / "config.json"
    config = json.loads(config_path.read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "other_code.Model"}
    config_path.write_text(json.dumps(config))
    (export_dir / "decoding_ar2dlm.py").unlink()
    differences = runtime_differences(export_dir)
    assert differences[0] == "decoding_ar2dlm.py is missing" and "auto_map" in differences[1]


def test_unsupported_architecture_is_a_user_error(export_dir):
    config_path = export_dir / "config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(UserError, match="architecture 'GPT2LMHeadModel'"):
        load_runtime_model(export_dir)
