"""Evaluation reports: ``report.json``, ``report.md`` (settings + tables), ``predictions.jsonl`` and a PNG
plot of accuracy against tokens per forward across the sweep."""

from __future__ import annotations

import json
import platform
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path

import torch

from ar2dlm.eval.intervals import successes_of, wilson_interval

TABLE_COLUMNS = ("mode", "block", "threshold", "prompts", "accuracy", "95% interval", "tokens/forward", "acceptance",
                 "tokens/s", "NFE")
HARNESS_COLUMNS = ("lm-eval task", "mode", "block", "threshold", "metric", "value", "stderr", "samples",
                   "95% interval")
ACCURACY_METRICS = ("acc", "acc_norm", "exact_match")  # lm-eval metrics that are a proportion of samples
MODE_MARKERS = {"ar": "s", "diffusion": "o", "self_spec": "^", "quad_spec": "D"}


def machine_info(device: torch.device | str | None = None) -> dict:
    """Where the numbers were measured."""
    info = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "cpu": platform.processor() or platform.machine(), "cpu_threads": torch.get_num_threads()}
    device = torch.device(device) if device is not None else torch.device("cpu")
    info["device"] = str(device)
    if device.type == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(device)
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:  # pragma: no cover - transformers is a dependency
        pass
    return info


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _cell(value, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def accuracy_interval(result: dict) -> tuple[float, float] | None:
    """The 95% Wilson interval of a result's accuracy (recomputed from accuracy and examples when the
    result predates the ``accuracy_interval`` field; None without a prompt count)."""
    if result.get("accuracy_interval") is not None:
        return tuple(result["accuracy_interval"])
    examples = result.get("examples")
    if examples is None:
        return None
    return wilson_interval(successes_of(result["accuracy"], examples), examples)


def interval_cell(interval, digits: int = 3) -> str:
    if interval is None:
        return "-"
    low, high = interval
    return f"[{low:.{digits}f}, {high:.{digits}f}]"


def mode_label(result: dict) -> str:
    """The mode, marked ``+drafter`` when self-speculation drafted with the export's drafter LoRA."""
    return result["mode"] + (" +drafter" if result.get("drafter") else "")


def table_row(result: dict) -> list[str]:
    return [mode_label(result), _cell(result["block_length"]), _cell(result["threshold"]), _cell(result.get("examples")),
            _cell(result["accuracy"], 3), interval_cell(accuracy_interval(result)), _cell(result["tokens_per_forward"]),
            _cell(result["acceptance_length"]), _cell(result["tokens_per_second"], 1),
            _cell(result["nfe_per_example"], 1)]


def markdown_table(results: list[dict]) -> str:
    """The sweep as a markdown table (accuracy with its prompt count and 95% Wilson interval; NFE: mean per
    example, decoded alone)."""
    return _markdown(TABLE_COLUMNS, [table_row(result) for result in results])


def _markdown(columns: Sequence[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def harness_interval(metric: str, value: float, samples: int | None) -> str:
    """The 95% Wilson interval of an lm-eval accuracy-like metric over ``samples`` ("-" for other metrics,
    for a group's aggregate, which has no sample count, and for values that are not proportions)."""
    if metric not in ACCURACY_METRICS or not samples or not 0.0 <= value <= 1.0:
        return "-"
    return interval_cell(wilson_interval(successes_of(value, samples), samples), 4)


def harness_table(rows: list[dict]) -> str:
    """lm-evaluation-harness results (:func:`ar2dlm.eval.harness.evaluate_harness`), a line per metric;
    loglikelihood tasks have no decoding mode (the harness scores them with the AR forward). Accuracies
    (acc, acc_norm, exact_match) get the sample count and a 95% Wilson interval next to lm-eval's stderr."""
    lines = []
    for row in rows:
        for key, value in row["metrics"].items():
            metric, _, filter_name = key.partition(",")
            if metric.endswith("_stderr"):
                continue
            lines.append([row["task"], row["mode"] or "loglikelihood", _cell(row["block_length"]),
                          _cell(row["threshold"]), metric if filter_name == "none" else f"{metric} ({filter_name})",
                          _cell(value, 4), _cell(row["metrics"].get(f"{metric}_stderr,{filter_name}"), 4),
                          _cell(row.get("samples")), harness_interval(metric, value, row.get("samples"))])
    return _markdown(HARNESS_COLUMNS, lines)


def tables(report: dict) -> list[str]:
    """The markdown tables of a report: the sweep (when there were examples) and the lm-eval tasks."""
    out = [markdown_table(report["results"])] if report["results"] else []
    return out + ([harness_table(report["lm_eval"])] if report.get("lm_eval") else [])


def _likelihood_lines(report: dict) -> list[str]:
    lines = []
    if report.get("perplexity"):
        ppl = report["perplexity"]
        lines.append(f"- AR perplexity: {ppl['perplexity']:.3f} ({ppl['tokens']} tokens, {ppl['texts']} texts)")
    if report.get("elbo"):
        elbo = report["elbo"]
        lines.append(f"- diffusion loss: {elbo['loss']:.4f}; negative ELBO: {elbo['nelbo_per_token']:.4f} "
                     f"nats/token (perplexity bound {elbo['perplexity_bound']:.3f}; {elbo['draws']} draws, "
                     f"block {elbo['block_size']})")
    return lines


def _offset_lines(results: list[dict]) -> list[str]:
    """Per self-speculation setting, how often the draft token at each offset was accepted."""
    lines = [f"- {mode_label(r)} B={r['block_length']}: " + " ".join(f"{rate:.2f}" for rate in r["acceptance_by_offset"])
             + _ceiling_note(r) for r in results if r.get("acceptance_by_offset")]
    if not lines:
        return []
    return ["acceptance by draft offset (1, 2, ...: the share of verified draft tokens at that offset accepted; the "
            "acceptance length against its ceiling, every draft accepted, for the same outputs):", *lines, ""]


def _ceiling_note(result: dict) -> str:
    ceiling = result.get("acceptance_ceiling")
    return "" if ceiling is None else f" (acceptance {result['acceptance_length']:.2f} of {ceiling:.2f})"


def render_markdown(report: dict) -> str:
    """Settings next to the numbers, then the likelihoods and the tables."""
    settings = report["settings"]
    lines = ["# ar2dlm evaluation", ""]
    lines += [f"- {key}: {value}" for key, value in settings.items() if key != "machine"]
    machine = settings.get("machine", {})
    lines.append("- machine: " + ", ".join(f"{key} {value}" for key, value in machine.items()))
    lines += [""] + _likelihood_lines(report)
    lines += ["", "\n\n".join(tables(report)), ""]
    if report["results"]:
        lines += ["accuracy: exact match over the prompts; 95% interval: Wilson score interval of that proportion.",
                  "NFE: forward passes per example decoded alone; tokens/forward = generated tokens (EOS included)"
                  " / NFE; acceptance: tokens committed per self-speculation verify cycle; tokens/s: batched"
                  " wall-clock throughput.", ""]
        lines += _offset_lines(report["results"])
    batched = sorted({r["mode"] for r in report["results"] if r.get("nfe_basis") == "batch"})
    if batched:
        lines += [f"{' and '.join(batched)}: each example is charged the NFE and cycles of the batch of "
                  f"{settings.get('batch_size')} it was decoded in, an upper bound of decoding it alone "
                  "(tokens/forward and acceptance are lower bounds); `decode_alone=true` measures each alone.", ""]
    if report.get("plot"):
        lines += [f"![accuracy vs tokens per forward]({report['plot']})", ""]
    return "\n".join(lines)


def plot_tradeoff(results: list[dict], path: Path, title: str = "") -> Path:
    """Accuracy against tokens per forward: a line per (diffusion, block length) across thresholds,
    a point for AR and for each self-speculation block length."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 4), dpi=120)
    groups: dict[tuple, list[dict]] = {}
    for result in results:
        groups.setdefault((result["mode"], result["block_length"], mode_label(result)), []).append(result)
    for (mode, block, name), items in groups.items():
        items = sorted(items, key=lambda r: r["tokens_per_forward"])
        label = name if block is None else f"{name} B={block}"
        xs, ys = [r["tokens_per_forward"] for r in items], [r["accuracy"] for r in items]
        axes.plot(xs, ys, marker=MODE_MARKERS.get(mode, "o"), label=label)
        for r in items:
            if r["threshold"] is not None:
                axes.annotate(f"{r['threshold']:g}", (r["tokens_per_forward"], r["accuracy"]), fontsize=7,
                              textcoords="offset points", xytext=(3, 3))
    axes.set_xlabel("tokens per forward")
    axes.set_ylabel("accuracy (exact match)")
    axes.set_ylim(-0.03, 1.03)
    axes.set_title(title or "accuracy vs tokens per forward", fontsize=9)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    plt.close(figure)
    return path


def write_report(report: dict, output: Path, rows: list[dict] | None = None) -> dict[str, Path]:
    """Write report.json, report.md, accuracy_vs_tpf.png (when the sweep has results) and (given
    per-example ``rows``) predictions.jsonl into ``output``; returns their paths."""
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    paths = {}
    if report["results"]:
        paths["plot"] = plot_tradeoff(report["results"], output / "accuracy_vs_tpf.png",
                                      title=str(report["settings"].get("model", "")))
        report = {**report, "plot": paths["plot"].name}
    paths["json"] = output / "report.json"
    paths["json"].write_text(json.dumps(report, indent=2) + "\n")
    paths["markdown"] = output / "report.md"
    paths["markdown"].write_text(render_markdown(report))
    if rows is not None:
        paths["predictions"] = output / "predictions.jsonl"
        with paths["predictions"].open("w") as handle:
            for row in rows:
                handle.write(json.dumps(row) + "\n")
    return paths
