"""Spread of eval results across training seeds: mean, min-max and standard deviation of each setting's
accuracy, tokens per forward and (self-speculation) acceptance length, the Wilson interval of the pooled
accuracy, and the drafter's gain in acceptance length per seed.

Input: per seed, the ``results`` of an eval report (:func:`ar2dlm.eval.run.evaluate_model`), all on the
same prompts. A setting is (mode, block length, threshold). The pooled interval counts every decoded
prompt of every seed (sum of correct / sum of prompts); the seeds share their prompts, so it measures the
decoding noise of these prompts, not the sampling of new ones, and the seed spread is reported next to it.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence

from ar2dlm.eval.intervals import successes_of, wilson_interval
from ar2dlm.eval.report import mode_label

SPREAD_COLUMNS = ("mode", "block", "threshold", "seeds", "prompts", "accuracy mean", "accuracy min-max",
                  "accuracy std", "pooled 95% interval", "tokens/forward mean", "tokens/forward min-max",
                  "tokens/forward std", "acceptance mean", "acceptance min-max")


def spread(values: Sequence[float]) -> dict[str, float]:
    """mean, min, max and std (sample standard deviation, n - 1; 0.0 for a single value)."""
    if not values:
        raise ValueError("no values")
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": statistics.fmean(values), "min": min(values), "max": max(values), "std": std}


def setting_key(result: Mapping) -> tuple:
    """(mode, block length, threshold); the mode marked ``+drafter`` for self-speculation with the drafter."""
    return mode_label(result), result["block_length"], result["threshold"]


def correct_count(result: Mapping) -> int:
    """Correct prompts of a result (from accuracy x examples for results without the ``correct`` field)."""
    if "correct" in result:
        return int(result["correct"])
    return successes_of(result["accuracy"], result["examples"])


def aggregate_seeds(per_seed: Mapping[int, Sequence[Mapping]]) -> list[dict]:
    """One row per setting (in the first seed's order) with the spread over seeds; ValueError when the
    seeds do not report the same settings on the same number of prompts."""
    if not per_seed:
        raise ValueError("no seeds")
    seeds = list(per_seed)
    first = [setting_key(result) for result in per_seed[seeds[0]]]
    by_key: dict[tuple, list[Mapping]] = {key: [] for key in first}
    for seed, results in per_seed.items():
        if [setting_key(result) for result in results] != first:
            raise ValueError(f"seed {seed} reports other settings than seed {seeds[0]}")
        for result in results:
            by_key[setting_key(result)].append(result)
    rows = []
    for (mode, block, threshold), results in by_key.items():
        prompts = {int(result["examples"]) for result in results}
        if len(prompts) != 1:
            raise ValueError(f"{mode} block={block} threshold={threshold}: seeds evaluated {sorted(prompts)} prompts")
        correct, total = sum(correct_count(r) for r in results), sum(int(r["examples"]) for r in results)
        rows.append({
            "mode": mode, "block_length": block, "threshold": threshold, "seeds": seeds, "prompts": prompts.pop(),
            "accuracy": spread([r["accuracy"] for r in results]),
            "pooled": {"correct": correct, "examples": total, "accuracy": correct / total if total else 0.0,
                       "interval": list(wilson_interval(correct, total))},
            "tokens_per_forward": spread([r["tokens_per_forward"] for r in results]),
            "acceptance_length": _acceptance_spread(results),
        })
    return rows


def _acceptance_spread(results: Sequence[Mapping]) -> dict[str, float] | None:
    values = [result.get("acceptance_length") for result in results]
    return None if any(value is None for value in values) else spread(values)


def drafter_gains(per_seed: Mapping[int, Sequence[Mapping]]) -> list[dict]:
    """Per self-speculation setting that was decoded without and with the drafter: the relative gain in
    acceptance length of each seed (with / without - 1) and their mean."""
    gains: dict[tuple, dict[int, float]] = {}
    for seed, results in per_seed.items():
        without = {setting_key(r): r for r in results if r.get("acceptance_length") and not r.get("drafter")}
        for result in results:
            if result.get("drafter") and result.get("acceptance_length"):
                base = without.get(setting_key({**result, "drafter": False}))
                if base is not None:
                    gains.setdefault(setting_key(result), {})[seed] = \
                        result["acceptance_length"] / base["acceptance_length"] - 1
    return [{"mode": mode, "block_length": block, "per_seed": per, "mean": statistics.fmean(per.values())}
            for (mode, block, _), per in gains.items()]


def _cell(value) -> str:
    return "-" if value is None else (f"{value:g}" if isinstance(value, float) else str(value))


def spread_table(rows: Sequence[Mapping]) -> str:
    """The aggregated rows as a markdown table."""
    lines = ["| " + " | ".join(SPREAD_COLUMNS) + " |", "|" + "---|" * len(SPREAD_COLUMNS)]
    for row in rows:
        acc, tpf, pooled = row["accuracy"], row["tokens_per_forward"], row["pooled"]
        low, high = pooled["interval"]
        cells = [row["mode"], _cell(row["block_length"]), _cell(row["threshold"]), str(len(row["seeds"])),
                 str(row["prompts"]), f"{acc['mean']:.3f}", f"{acc['min']:.3f}-{acc['max']:.3f}", f"{acc['std']:.3f}",
                 f"{pooled['accuracy']:.3f} [{low:.3f}, {high:.3f}]", f"{tpf['mean']:.2f}",
                 f"{tpf['min']:.2f}-{tpf['max']:.2f}", f"{tpf['std']:.2f}", *_acceptance_cells(row)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _acceptance_cells(row: Mapping) -> list[str]:
    acceptance = row.get("acceptance_length")
    if acceptance is None:
        return ["-", "-"]
    return [f"{acceptance['mean']:.2f}", f"{acceptance['min']:.2f}-{acceptance['max']:.2f}"]
