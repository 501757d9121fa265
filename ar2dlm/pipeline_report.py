"""The report of `ar2dlm run`: one table comparing the source model with the trained tri-mode model."""

from __future__ import annotations

import json
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from ar2dlm.eval.report import accuracy_interval, interval_cell, machine_info, now, plot_tradeoff


def _lossless(rows: list[dict], mode: str = "self_spec") -> dict:
    """A self-speculation mode against AR greedy, example by example (same prediction and token count), over all
    its settings."""
    ar = {r["prompt"]: (r["prediction"], r["new_tokens"]) for r in rows if r["mode"] == "ar"}
    spec = [r for r in rows if r["mode"] == mode]
    same = sum(ar.get(r["prompt"]) == (r["prediction"], r["new_tokens"]) for r in spec)
    return {"identical": same, "examples": len(spec)}


def decoding_label(eval_cfg) -> str:
    """The run's diffusion decoding levers as they read in a table's setting column (empty: the defaults)."""
    label = f" sub={eval_cfg.sub_block_length}" if eval_cfg.get("sub_block_length") else ""
    if eval_cfg.get("confidence", "probability") != "probability":
        label += f" confidence={eval_cfg.confidence}"
    return label


def _line(model: str, result: dict, perplexity: float | None = None, decoding: str = "") -> dict:
    mode = result["mode"]
    setting = "" if mode == "ar" else f"B={result['block_length']}"
    if mode == "quad_spec" and result.get("draft_length"):
        setting += f" k={result['draft_length']}"
    if result.get("drafter"):
        setting += " +drafter"
    if mode == "diffusion":
        setting += f" t={result['threshold']:g}{decoding}"
    interval = accuracy_interval(result)
    return {"model": model, "mode": mode, "setting": setting, "prompts": result.get("examples"),
            "accuracy": result["accuracy"], "accuracy_interval": list(interval) if interval else None,
            "perplexity": perplexity, "tokens_per_forward": result["tokens_per_forward"],
            "acceptance_length": result["acceptance_length"], "tokens_per_second": result["tokens_per_second"]}


def _cell(value, digits: int = 2) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _table(lines: list[dict]) -> str:
    header = ("| model | mode | setting | prompts | accuracy | 95% interval | perplexity | tokens/forward | acceptance "
              "| tokens/s |")
    out = [header, "|" + "---|" * 10]
    for line in lines:
        out.append(f"| {line['model']} | {line['mode']} | {line['setting']} | {_cell(line['prompts'])} | "
                   f"{_cell(line['accuracy'], 3)} | {interval_cell(line['accuracy_interval'])} | "
                   f"{_cell(line['perplexity'])} | {_cell(line['tokens_per_forward'])} | "
                   f"{_cell(line['acceptance_length'])} | {_cell(line['tokens_per_second'], 1)} |")
    return "\n".join(out)


def write_run_report(output: Path, cfg: DictConfig, source: dict, model: dict, history: list[dict],
                     seconds: dict[str, float]) -> str:
    """Write report.json, report.md and accuracy_vs_tpf.png into ``output``; return the table."""
    source_ppl = (source.get("perplexity") or {}).get("perplexity")
    model_ppl = (model.get("perplexity") or {}).get("perplexity")
    lines = [_line("source", r, source_ppl) for r in source["results"]]
    decoding = decoding_label(cfg.eval)
    lines += [_line("ar2dlm", r, model_ppl if r["mode"] == "ar" else None, decoding) for r in model["results"]]
    lossless = _lossless(model["rows"])
    quad_lossless = _lossless(model["rows"], "quad_spec")
    plot = plot_tradeoff(model["results"], output / "accuracy_vs_tpf.png", title="ar2dlm demo: trained model")
    summary = {
        "date": now(), "machine": machine_info(), "stage_seconds": {k: round(v, 1) for k, v in seconds.items()},
        "total_seconds": round(sum(seconds.values()), 1), "table": lines, "self_spec_vs_ar": lossless,
        "quad_spec_vs_ar": quad_lossless,
        "perplexity_ratio": (model_ppl / source_ppl) if model_ppl and source_ppl else None,
        "elbo": model.get("elbo"), "final_train_metrics": history[-1] if history else None,
        "config": OmegaConf.to_container(cfg), "plot": plot.name,
    }
    (output / "report.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    table = _table(lines)
    times = ", ".join(f"{name} {value:.0f}s" for name, value in seconds.items())
    ratio = f"{summary['perplexity_ratio']:.3f}" if summary["perplexity_ratio"] else "-"
    notes = ["accuracy: exact match over the held-out prompts, with its 95% Wilson score interval",
             f"stage wall times: {times} (total {summary['total_seconds']:.0f}s)",
             f"self-speculation identical to AR greedy on {lossless['identical']}/{lossless['examples']} decodings"
             + (f", quadratic on {quad_lossless['identical']}/{quad_lossless['examples']}"
                if quad_lossless["examples"] else "") + f" (every prompt in every setting); perplexity ratio "
             f"trained/source {ratio}"]
    if any(result.get("nfe_basis") == "batch" for result in model["results"]):
        notes.append("diffusion / self-speculation NFE: that of each prompt's batch (an upper bound); "
                     "eval.decode_alone=true measures each prompt alone")
    markdown = ["# ar2dlm run report", "", f"{summary['date']}, {summary['machine']}", "", table, "", *notes, "",
                f"![accuracy vs tokens per forward]({plot.name})", ""]
    (output / "report.md").write_text("\n".join(markdown))
    return "\n".join([table, *notes])
