"""The run report's setting column names the diffusion decoding levers the demo decoded with."""

from omegaconf import OmegaConf

from ar2dlm.pipeline_report import _line, decoding_label

RESULT = {"mode": "diffusion", "block_length": 16, "threshold": 0.9, "examples": 10, "accuracy": 0.5, "correct": 5,
          "tokens_per_forward": 2.5, "acceptance_length": None, "tokens_per_second": 100.0}


def test_the_setting_names_sub_blocks_and_confidence_only_when_set():
    assert decoding_label(OmegaConf.create({"sub_block_length": None, "confidence": "probability"})) == ""
    levers = decoding_label(OmegaConf.create({"sub_block_length": 8, "confidence": "position"}))
    assert levers == " sub=8 confidence=position"
    assert _line("ar2dlm", RESULT, decoding=levers)["setting"] == "B=16 t=0.9 sub=8 confidence=position"
    assert _line("ar2dlm", {**RESULT, "mode": "ar"}, decoding=levers)["setting"] == ""
