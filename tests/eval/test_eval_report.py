"""Report files: report.json, report.md (settings, likelihoods, the table), predictions.jsonl and the plot."""

from __future__ import annotations

import json

from ar2dlm.eval.report import TABLE_COLUMNS, harness_table, markdown_table, write_report


def result(mode, block=None, threshold=None, accuracy=0.5, tpf=1.0, acceptance=None):
    return {"mode": mode, "block_length": block, "threshold": threshold, "examples": 4, "accuracy": accuracy,
            "task_accuracy": {"copy": accuracy}, "new_tokens": 40, "nfe": int(40 / tpf), "nfe_per_example": 10 / tpf,
            "tokens_per_forward": tpf, "acceptance_length": acceptance, "seconds": 2.0,
            "tokens_per_second": 20.0, "batch_forwards": 12, "batch_mismatches": 0}


def sample_report():
    results = [result("ar"), result("diffusion", 4, 0.5, 0.25, 2.5), result("diffusion", 4, 0.9, 0.5, 1.5),
               result("diffusion", 8, 0.9, 0.5, 1.8), result("self_spec", 4, None, 0.5, 1.6, 2.25)]
    settings = {"model": "/models/tiny", "tasks": ["demo"], "examples": 4, "seed": 3, "batch_size": 2,
                "date": "2026-11-28T12:00:00+00:00", "machine": {"device": "cpu", "torch": "2.13.0"}}
    return {"settings": settings, "results": results,
            "perplexity": {"nll": 1.0, "tokens": 10, "texts": 2, "perplexity": 2.718},
            "elbo": {"loss": 3.0, "nelbo_per_token": 1.5, "perplexity_bound": 4.48, "draws": 2, "block_size": 4}}


def test_markdown_table():
    lines = markdown_table(sample_report()["results"]).splitlines()
    assert lines[0] == "| " + " | ".join(TABLE_COLUMNS) + " |"
    # 2/4 correct: Wilson 95% [0.150, 0.850]; 1/4: [0.046, 0.699]
    assert lines[2] == "| ar | - | - | 4 | 0.500 | [0.150, 0.850] | 1.00 | - | 20.0 | 10.0 |"
    assert lines[3] == "| diffusion | 4 | 0.50 | 4 | 0.250 | [0.046, 0.699] | 2.50 | - | 20.0 | 4.0 |"
    assert lines[6] == "| self_spec | 4 | - | 4 | 0.500 | [0.150, 0.850] | 1.60 | 2.25 | 20.0 | 6.2 |"
    assert len(lines) == 2 + 5


def test_table_uses_the_recorded_interval_and_count():
    recorded = {**result("ar", accuracy=0.6), "examples": 5, "accuracy_interval": [0.2307, 0.8824]}
    assert markdown_table([recorded]).splitlines()[2].startswith("| ar | - | - | 5 | 0.600 | [0.231, 0.882] |")


def test_harness_table_intervals_for_accuracies_only():
    rows = [{"task": "toy", "mode": "ar", "block_length": None, "threshold": None, "samples": 3,
             "metrics": {"exact_match,none": 0.0, "exact_match_stderr,none": 0.0, "bleu,none": 12.5}},
            {"task": "group", "mode": None, "block_length": None, "threshold": None, "samples": None,
             "metrics": {"acc,none": 0.5}}]
    lines = harness_table(rows).splitlines()
    assert lines[2] == "| toy | ar | - | - | exact_match | 0.0000 | 0.0000 | 3 | [0.0000, 0.5615] |"
    assert lines[3] == "| toy | ar | - | - | bleu | 12.5000 | - | 3 | - |"
    assert lines[4] == "| group | loglikelihood | - | - | acc | 0.5000 | - | - | - |"


def test_write_report(tmp_path):
    report = sample_report()
    rows = [{"mode": "ar", "prompt": "copy: a =", "answer": "a", "prediction": "a", "correct": True}]
    paths = write_report(report, tmp_path / "out", rows=rows)
    assert set(paths) == {"json", "markdown", "plot", "predictions"}
    saved = json.loads(paths["json"].read_text())
    assert saved["results"] == report["results"] and saved["settings"] == report["settings"]
    assert saved["plot"] == "accuracy_vs_tpf.png" and saved["elbo"]["draws"] == 2
    markdown = paths["markdown"].read_text()
    for needle in ("- model: /models/tiny", "- seed: 3", "- batch_size: 2", "- date: 2026", "machine: device cpu",
                   "AR perplexity: 2.718", "negative ELBO: 1.5000", markdown_table(report["results"]),
                   "![accuracy vs tokens per forward](accuracy_vs_tpf.png)"):
        assert needle in markdown, needle
    assert paths["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [json.loads(line) for line in paths["predictions"].read_text().splitlines()] == rows
