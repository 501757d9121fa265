"""`ar2dlm eval` end to end on a tiny export, the in-process API, and clear errors."""

from __future__ import annotations

import json

import pytest

from ar2dlm.cli import main
from ar2dlm.errors import UserError
from ar2dlm.eval.report import TABLE_COLUMNS
from ar2dlm.eval.run import EvalSettings, evaluate_model, settings_from_config


def eval_args(model, output, *extra):
    return ["eval", f"model={model}", f"output={output}", "tasks=[demo:4]", "block_length=4",
            "thresholds=[0.5,0.9]", "max_new_tokens=6", "batch_size=3", "elbo_draws=1", "device=cpu", *extra]


def test_ar2dlm_eval_end_to_end(tiny_export, tmp_path, capsys):
    output = tmp_path / "report"
    assert main(eval_args(tiny_export, output, "block_lengths=[2,4]")) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    # the table comes last: header, separator, then AR + per block length (2 diffusion + self_spec + quad_spec)
    assert printed[-11] == "| " + " | ".join(TABLE_COLUMNS) + " |"
    assert [line.split(" | ")[0] for line in printed[-9:]] == ["| ar"] + (
        ["| diffusion"] * 2 + ["| self_spec", "| quad_spec"]) * 2
    report = json.loads((output / "report.json").read_text())
    assert [(r["mode"], r["block_length"], r["threshold"]) for r in report["results"]] == [
        ("ar", None, None), ("diffusion", 2, 0.5), ("diffusion", 2, 0.9), ("self_spec", 2, None),
        ("quad_spec", 2, None), ("diffusion", 4, 0.5), ("diffusion", 4, 0.9), ("self_spec", 4, None),
        ("quad_spec", 4, None)]
    assert all(len(r["acceptance_by_offset"]) == r["block_length"] - 1
               for r in report["results"] if r["mode"] in ("self_spec", "quad_spec"))
    assert "acceptance by draft offset" in (output / "report.md").read_text()
    for r in report["results"]:
        if r["mode"] in ("self_spec", "quad_spec"):
            assert r["acceptance_length"] <= r["acceptance_ceiling"] <= r["block_length"]
            assert f"(acceptance {r['acceptance_length']:.2f} of {r['acceptance_ceiling']:.2f})" in \
                (output / "report.md").read_text()
    settings = report["settings"]
    assert settings["model"] == str(tiny_export) and settings["examples"] == 4 and settings["batch_size"] == 3
    assert settings["tasks"] == ["demo:4"] and settings["seed"] == 1234 and settings["machine"]["device"] == "cpu"
    assert report["perplexity"]["perplexity"] > 1 and report["elbo"]["draws"] == 1
    assert all(r["examples"] == 4 and r["tokens_per_forward"] > 0 for r in report["results"])
    assert (output / "report.md").is_file() and (output / "accuracy_vs_tpf.png").is_file()
    predictions = (output / "predictions.jsonl").read_text().splitlines()
    assert len(predictions) == 4 * 9 and {"prompt", "answer", "prediction", "nfe"} <= set(json.loads(predictions[0]))


def test_jsonl_task_and_perplexity_texts(tiny_export, tmp_path, capsys):
    tasks = tmp_path / "qa.jsonl"
    tasks.write_text(json.dumps({"prompt": "copy: a b =", "answer": " a b"}) + "\n")
    texts = tmp_path / "held.txt"
    texts.write_text("copy: a b = a b\nsort: 2 1 = 1 2\n")
    output = tmp_path / "out"
    args = eval_args(tiny_export, output, "modes=[ar]", "perplexity_texts=text:" + str(texts))
    args[3] = f"tasks=[jsonl:{tasks}]"
    assert main(args) == 0
    report = json.loads((output / "report.json").read_text())
    assert report["settings"]["task_examples"] == {"qa": 1} and report["perplexity"]["texts"] == 2
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("| ar |")


@pytest.mark.parametrize("change, message", [
    ("tasks=[gsm8k]", "unknown task spec"),
    ("tasks=[jsonl:/nonexistent.jsonl]", "does not exist"),
    ("model=/nonexistent/model", "is not a directory"),
    ("block_lengths=[0]", "block lengths must be >= 1"),
    ("elbo_draws=-1", "elbo_draws"),
    ("limit=0", "limit=0"),
])
def test_bad_arguments_exit_with_a_clear_error(tiny_export, tmp_path, capsys, change, message):
    assert main(eval_args(tiny_export, tmp_path / "out", change)) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_evaluate_model_in_process(tiny, held_out):
    model, tokenizer = tiny
    settings = EvalSettings(modes=("diffusion",), thresholds=(0.9,), block_lengths=(4,), max_new_tokens=4,
                            batch_size=2, perplexity=False, extra={"run": "demo"})
    report = evaluate_model(model, tokenizer, held_out[:3], settings)
    assert report["perplexity"] is None and report["elbo"] is None and report["settings"]["run"] == "demo"
    assert len(report["results"]) == 1 and len(report["rows"]) == 3
    assert report["results"][0]["nfe"] == sum(row["nfe"] for row in report["rows"])


def test_settings_from_config():
    from omegaconf import OmegaConf

    from ar2dlm.config.schema import EvalStage

    cfg = OmegaConf.structured(EvalStage(model="m", output="o", thresholds=[0.5, 1.0], block_lengths=[]))
    settings = settings_from_config(cfg)
    assert settings.block_lengths == (32,) and settings.thresholds == (0.5, 1.0) and settings.seed == 1234
    with pytest.raises(UserError, match="modes"):
        settings_from_config(OmegaConf.merge(cfg, {"modes": []}))


def test_the_diffusion_levers_reach_every_diffusion_setting():
    from omegaconf import OmegaConf

    from ar2dlm.config.schema import EvalStage
    from ar2dlm.eval.run import sweep_configs

    cfg = OmegaConf.structured(EvalStage(model="m", output="o", thresholds=[0.5, 0.9], sub_block_length=4,
                                         confidence="position", position_decay=0.8))
    levers = {"sub_block_length": 4, "confidence": "position", "position_decay": 0.8}
    configs = sweep_configs(settings_from_config(cfg))
    assert [c.levers() for c in configs if c.mode == "diffusion"] == [levers, levers]
    assert all(c.sub_block_length is None for c in configs if c.mode != "diffusion")


def test_decode_alone_is_off_unless_asked_and_the_report_says_what_nfe_is():
    from omegaconf import OmegaConf

    from ar2dlm.config.schema import EvalStage
    from ar2dlm.eval.report import render_markdown

    cfg = OmegaConf.structured(EvalStage(model="m", output="o"))
    assert settings_from_config(cfg).decode_alone is False
    assert settings_from_config(OmegaConf.merge(cfg, {"decode_alone": True})).decode_alone is True
    results = [{"mode": "ar", "block_length": None, "threshold": None, "accuracy": 1.0, "tokens_per_forward": 1.0,
                "acceptance_length": None, "tokens_per_second": 9.0, "nfe_per_example": 4.0, "nfe_basis": "alone"},
               {"mode": "self_spec", "block_length": 4, "threshold": None, "accuracy": 1.0, "tokens_per_forward": 2.0,
                "acceptance_length": 2.5, "tokens_per_second": 9.0, "nfe_per_example": 2.0, "nfe_basis": "batch"}]
    text = render_markdown({"settings": {"batch_size": 8}, "results": results})
    assert "self_spec: each example is charged the NFE and cycles of the batch of 8" in text
    assert "decode_alone=true" in text
    results[1]["nfe_basis"] = "alone"
    assert "charged" not in render_markdown({"settings": {"batch_size": 8}, "results": results})


def test_self_speculation_runs_with_and_without_the_drafter_of_an_export_that_has_one():
    from omegaconf import OmegaConf

    from ar2dlm.config.schema import EvalStage
    from ar2dlm.eval.run import sweep_configs

    cfg = OmegaConf.structured(EvalStage(model="m", output="o", modes=["ar", "self_spec", "quad_spec"],
                                         block_length=8, draft_length=12))
    settings = settings_from_config(cfg)
    plain = [(c.mode, c.block_length, c.draft_length, c.use_drafter) for c in sweep_configs(settings)]
    assert plain == [("ar", None, None, None), ("self_spec", 8, None, None), ("quad_spec", 8, 7, None)]
    both = [(c.mode, c.use_drafter) for c in sweep_configs(settings, has_drafter=True)]
    assert both == [("ar", None), ("self_spec", False), ("quad_spec", False), ("self_spec", True), ("quad_spec", True)]
    only = settings_from_config(OmegaConf.merge(cfg, {"use_drafter": True}))
    assert [(c.mode, c.use_drafter) for c in sweep_configs(only, has_drafter=True)][1:] == [
        ("self_spec", True), ("quad_spec", True)]
