"""Seed spread: mean / min-max / std per setting and the pooled Wilson interval."""

import pytest

from ar2dlm.eval.intervals import wilson_interval
from ar2dlm.eval.spread import SPREAD_COLUMNS, aggregate_seeds, drafter_gains, spread, spread_table


def result(mode, correct, tpf, block=None, threshold=None, examples=10, with_count=True):
    out = {"mode": mode, "block_length": block, "threshold": threshold, "examples": examples,
           "accuracy": correct / examples, "tokens_per_forward": tpf}
    return {**out, "correct": correct} if with_count else out


def test_spread_of_values():
    assert spread([0.5, 0.7, 0.6]) == pytest.approx({"mean": 0.6, "min": 0.5, "max": 0.7, "std": 0.1})
    assert spread([0.4]) == {"mean": 0.4, "min": 0.4, "max": 0.4, "std": 0.0}
    with pytest.raises(ValueError):
        spread([])


def test_aggregate_seeds_per_setting():
    per_seed = {
        1: [result("ar", 7, 1.0), result("diffusion", 2, 2.5, 16, 0.9)],
        2: [result("ar", 5, 1.0), result("diffusion", 4, 3.5, 16, 0.9, with_count=False)],
    }
    ar, diffusion = aggregate_seeds(per_seed)
    assert (ar["mode"], ar["seeds"], ar["prompts"]) == ("ar", [1, 2], 10)
    assert ar["accuracy"] == pytest.approx({"mean": 0.6, "min": 0.5, "max": 0.7, "std": 0.1414213562})
    assert ar["pooled"] == {"correct": 12, "examples": 20, "accuracy": 0.6,
                            "interval": pytest.approx(list(wilson_interval(12, 20)))}
    assert (diffusion["block_length"], diffusion["threshold"], diffusion["pooled"]["correct"]) == (16, 0.9, 6)
    assert diffusion["tokens_per_forward"] == pytest.approx({"mean": 3.0, "min": 2.5, "max": 3.5,
                                                             "std": 0.7071067812})
    lines = spread_table([ar, diffusion]).splitlines()
    assert lines[0] == "| " + " | ".join(SPREAD_COLUMNS) + " |"
    assert lines[2] == ("| ar | - | - | 2 | 10 | 0.600 | 0.500-0.700 | 0.141 | 0.600 [0.387, 0.781] | 1.00 | "
                        "1.00-1.00 | 0.00 | - | - |")
    assert lines[3].startswith("| diffusion | 16 | 0.9 | 2 | 10 | 0.300 | 0.200-0.400 |")


def test_seeds_must_agree_on_settings_and_prompts():
    with pytest.raises(ValueError, match="other settings"):
        aggregate_seeds({1: [result("ar", 1, 1.0)], 2: [result("self_spec", 1, 1.0, 16)]})
    with pytest.raises(ValueError, match="prompts"):
        aggregate_seeds({1: [result("ar", 1, 1.0)], 2: [result("ar", 1, 1.0, examples=20)]})
    with pytest.raises(ValueError):
        aggregate_seeds({})


def test_acceptance_spread_and_the_drafters_gain_per_seed():
    def spec(acceptance, drafter):
        return {**result("self_spec", 5, acceptance / 2, 16), "acceptance_length": acceptance, "drafter": drafter}

    per_seed = {1: [result("ar", 5, 1.0), spec(5.0, False), spec(6.0, True)],
                2: [result("ar", 5, 1.0), spec(4.0, False), spec(5.0, True)]}
    ar, without, with_drafter = aggregate_seeds(per_seed)
    assert ar["acceptance_length"] is None
    assert without["acceptance_length"] == pytest.approx({"mean": 4.5, "min": 4.0, "max": 5.0, "std": 0.7071067812})
    assert spread_table([ar, with_drafter]).splitlines()[2].endswith("| - | - |")
    assert spread_table([ar, with_drafter]).splitlines()[3].endswith("| 5.50 | 5.00-6.00 |")
    (gain,) = drafter_gains(per_seed)
    assert (gain["mode"], gain["block_length"]) == ("self_spec +drafter", 16)
    assert gain["per_seed"] == pytest.approx({1: 0.2, 2: 0.25})
    assert gain["mean"] == pytest.approx(0.225)
