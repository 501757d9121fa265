"""The `ar2dlm` command as a user runs it: a separate process, exit codes, no tracebacks."""

import subprocess
import sys

import yaml

from ar2dlm.cli import STAGE_ENTRY_POINTS


def ar2dlm(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ar2dlm.cli", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=120)


def test_top_level_help_lists_every_stage():
    result = ar2dlm("--help")
    assert result.returncode == 0
    for stage in STAGE_ENTRY_POINTS:
        assert f"  {stage.replace('_', ' ')} " in result.stdout


def help_keys(result: subprocess.CompletedProcess) -> dict[str, str]:
    assert result.returncode == 0, result.stderr
    return {line.split()[0]: line.split(None, 1)[1] for line in result.stdout.splitlines()
            if line.startswith("  ") and not line.startswith("   ") and len(line.split()) > 1}


def test_stage_help_lists_keys_with_defaults():
    result = ar2dlm("train", "--help")
    lines = help_keys(result)
    assert lines["train.steps"] == "100"
    assert lines["diffusion.dlm_loss_weight"] == "0.3"
    assert lines["init"] == "??? (required)"
    assert "recipes: " in result.stdout and "tiny" in result.stdout


def test_help_reflects_recipe_and_overrides():
    lines = help_keys(ar2dlm("train", "recipe=tiny", "train.steps=3", "--help"))
    assert lines["train.steps"] == "3"
    assert lines["data.seq_length"] == "64"


def test_cfg_prints_the_composed_yaml():
    result = ar2dlm("train", "recipe=tiny", "optim.lr=0.002", "--cfg")
    assert result.returncode == 0, result.stderr
    cfg = yaml.safe_load(result.stdout)
    assert cfg["optim"]["lr"] == 0.002
    assert cfg["data"]["seq_length"] == 64  # from the tiny recipe
    assert cfg["train"]["objective"] == "joint"


def test_invalid_override_is_one_clean_error_and_writes_nothing(tmp_path):
    output = tmp_path / "out"
    result = ar2dlm("train", f"output={output}", "init=x", "data.seq_length=100")
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "ar2dlm train: error: data.seq_length=100 is not a multiple of diffusion.block_size=32"
    )
    assert "Traceback" not in result.stderr
    assert not output.exists()


def test_unknown_key_and_unknown_stage_and_option():
    unknown_key = ar2dlm("train", "trian.steps=3")
    assert unknown_key.returncode == 2 and "unknown key 'trian'" in unknown_key.stderr
    unknown_stage = ar2dlm("trian")
    assert unknown_stage.returncode == 2 and "unknown stage 'trian'" in unknown_stage.stderr
    unknown_option = ar2dlm("train", "--dry")
    assert unknown_option.returncode == 2 and "unknown option '--dry'" in unknown_option.stderr
    for result in (unknown_key, unknown_stage, unknown_option):
        assert "Traceback" not in result.stderr


def test_version():
    result = ar2dlm("--version")
    assert result.returncode == 0 and result.stdout.startswith("ar2dlm ")


def test_every_key_of_every_stage_has_a_description():
    from ar2dlm.config.compose import stage_keys
    from ar2dlm.config.descriptions import describe
    from ar2dlm.config.schema import STAGE_SCHEMAS

    undocumented = [f"{stage}: {key}" for stage in STAGE_SCHEMAS for key, _ in stage_keys(stage)
                    if not describe(stage, key)]
    assert not undocumented, "add them to ar2dlm/config/descriptions.py"


def test_stage_help_describes_each_key_with_its_allowed_values():
    result = ar2dlm("train", "--help")
    lines = result.stdout.splitlines()
    objective = lines.index(next(line for line in lines if line.split()[:1] == ["train.objective"]))
    assert lines[objective].split() == ["train.objective", "'joint'"]
    assert lines[objective + 1].startswith("      losses trained: ") and lines[objective + 1].endswith(
        "  [ar | joint | diffusion | drafter]")
    assert "  [null | hybrid | e4m3]" in result.stdout and "(undocumented)" not in result.stdout
    assert help_keys(result)["resume"] == "false"
    prompt = ar2dlm("generate", "--help").stdout
    assert "taken exactly as typed" in prompt and "'-' for stdin" in prompt


def test_every_stage_entry_point_imports():
    from ar2dlm.cli import _entry_point

    assert all(callable(_entry_point(stage)) for stage in STAGE_ENTRY_POINTS)


def test_a_stage_configures_torch_for_the_cpu_at_process_start(monkeypatch, tmp_path):
    from ar2dlm.cli import main

    calls = []
    monkeypatch.setattr("ar2dlm.compat.configure_torch_for_cpu", lambda: calls.append("configured"))
    assert main(["generate", f"model={tmp_path}", "prompt=x"]) == 2  # not an export: refused after the start
    assert calls == ["configured"]
