"""`ar2dlm run` end to end with a few steps per stage: every stage runs and the report is complete."""

import json
import shutil

import pytest
from omegaconf import OmegaConf

from ar2dlm.config import compose_stage
from ar2dlm.config.schema import DataSourceConfig
from ar2dlm.pipeline import STAGES, run_pipeline


def test_shortened_demo_runs_every_stage_and_reports(tmp_path, megatron_ready, capsys):
    output = tmp_path / "demo"
    cfg = compose_stage("run", [
        "recipe=demo", f"output={output}", "demo.train_examples=400", "demo.eval_examples=12",
        "source_model.train.steps=6", "train.steps=6", "eval.thresholds=[0.5,0.9]", "eval.elbo_draws=1",
        "drafter_stage.steps=3",
    ])
    assert run_pipeline(cfg) == 0
    report = json.loads((output / "report.json").read_text())
    assert list(report["stage_seconds"]) == list(STAGES)
    modes = [(line["model"], line["mode"], line["setting"]) for line in report["table"]]
    assert modes == [("source", "ar", ""), ("ar2dlm", "ar", ""), ("ar2dlm", "diffusion", "B=16 t=0.5 sub=8"),
                     ("ar2dlm", "diffusion", "B=16 t=0.9 sub=8"), ("ar2dlm", "self_spec", "B=16"),
                     ("ar2dlm", "quad_spec", "B=16"), ("ar2dlm", "self_spec", "B=16 +drafter"),
                     ("ar2dlm", "quad_spec", "B=16 +drafter")]
    assert (output / "model" / "linear_spec_lora" / "adapter_model.safetensors").is_file()
    # lossless on every prompt, with and without the drafter
    assert report["self_spec_vs_ar"] == {"identical": 24, "examples": 24}
    assert report["quad_spec_vs_ar"] == {"identical": 24, "examples": 24}
    assert all(line["tokens_per_forward"] > 0 for line in report["table"])
    for line in report["table"]:  # every accuracy carries its prompt count and 95% interval
        low, high = line["accuracy_interval"]
        assert line["prompts"] == 12 and 0.0 <= low <= line["accuracy"] <= high <= 1.0 and high - low > 0.1
    assert report["table"][0]["perplexity"] > 1 and report["table"][1]["perplexity"] > 1
    for name in ("report.md", "accuracy_vs_tpf.png", "model/config.json", "source/config.json",
                 "eval_model/predictions.jsonl"):
        assert (output / name).is_file(), name
    printed = capsys.readouterr().out.strip().splitlines()
    header = max(i for i, line in enumerate(printed) if line.startswith("| model | mode |"))
    assert len(printed) - header == 2 + len(report["table"]) + 3  # the table and three notes close the output
    assert "95% Wilson score interval" in printed[-3]
    assert "self-speculation identical to AR greedy on 24/24 decodings, quadratic on 24/24" in printed[-1]


def test_code_in_the_source_folder_never_runs(make_tiny_hf, tiny_tokenizer, tmp_path, megatron_ready):
    from ar2dlm.conversion.runtime_install import RUNTIME_FILES, install_runtime

    source = make_tiny_hf("LlamaForCausalLM")
    install_runtime(source, architecture="LlamaForCausalLM", block_size=8,
                    mask_token_id=tiny_tokenizer.convert_tokens_to_ids("<|fim_pad|>"))
    marker = tmp_path / "marker"
    for name in RUNTIME_FILES:  # a source that ships runtime files which write the marker when imported
        (source / name).write_text((source / name).read_text() + f"\nopen({str(marker)!r}, 'w').write('ran')\n")
    cfg = compose_stage("run", [
        "recipe=demo", f"source={source}", f"output={tmp_path / 'run'}", "demo.train_examples=40",
        "demo.eval_examples=2", "train.steps=1", "train.global_batch_size=2", "train.micro_batch_size=2",
        "data.seq_length=32", "diffusion.block_size=8", "diffusion.decode_block_size=null", "eval.block_length=8",
        "eval.thresholds=[0.9]", "eval.max_new_tokens=4", "eval.elbo_draws=0", "drafter_stage.steps=1",
    ])
    assert run_pipeline(cfg) == 0
    assert not marker.exists()


def test_the_run_passes_every_decoding_key_of_its_eval_section():
    from ar2dlm.pipeline import eval_settings

    cfg = compose_stage("run", ["recipe=demo", "output=/tmp/unused", "eval.modes=[ar,quad_spec]", "eval.draft_length=5",
                                "eval.sub_block_length=4", "eval.confidence=position", "eval.use_drafter=false",
                                "eval.block_lengths=[8,16]"])
    settings = eval_settings(cfg)
    assert settings.modes == ("ar", "quad_spec") and settings.draft_length == 5 and settings.use_drafter is False
    assert settings.block_lengths == (8, 16) and settings.levers["sub_block_length"] == 4
    assert settings.levers["confidence"] == "position"


def test_the_drafter_stage_drafts_blocks_of_the_decoding_size(tmp_path, monkeypatch):
    """A joint stage that trains at block 32 and decodes at 16 gets a drafter of 16-blocks: the runtime drafts
    blocks of the size the export decodes with."""
    import ar2dlm.training.loop as loop
    from ar2dlm.pipeline import _drafter

    seen = {}

    class RecordingTrainer:
        def __init__(self, cfg):
            seen["cfg"] = cfg

        def fit(self):
            (tmp_path / "drafter" / "checkpoints" / "step_0000002").mkdir(parents=True)

    monkeypatch.setattr(loop, "Trainer", RecordingTrainer)
    cfg = compose_stage("run", ["recipe=demo", f"output={tmp_path}", "diffusion.block_size=32",
                                "diffusion.decode_block_size=16", "diffusion.random_block_sizes=[8,32]",
                                "drafter_stage.steps=2"])
    final = _drafter(cfg, tmp_path / "joint", tmp_path / "drafter")
    drafter = seen["cfg"]
    assert final == tmp_path / "drafter" / "checkpoints" / "step_0000002"
    assert (drafter.train.objective, drafter.train.steps) == ("drafter", 2)
    assert drafter.diffusion.block_size == 16 and drafter.diffusion.decode_block_size is None
    assert list(drafter.diffusion.random_block_sizes) == []  # 32 does not divide 16: the candidates of 16
    same = compose_stage("run", ["recipe=demo", f"output={tmp_path}", "diffusion.block_size=16",
                                 "diffusion.random_block_sizes=[4,8]", "drafter_stage.steps=2"])
    shutil.rmtree(tmp_path / "drafter")
    _drafter(same, tmp_path / "joint", tmp_path / "drafter")
    assert seen["cfg"].diffusion.block_size == 16 and list(seen["cfg"].diffusion.random_block_sizes) == [4, 8]
    assert same.diffusion.random_block_prob == 1.0 and seen["cfg"].diffusion.random_block_prob == 0.0  # the recipe's
    inherited = compose_stage("run", ["recipe=demo", f"output={tmp_path}", "drafter_stage.random_block_prob=null",
                                      "drafter_stage.steps=2"])
    shutil.rmtree(tmp_path / "drafter")
    _drafter(inherited, tmp_path / "joint", tmp_path / "drafter")
    assert seen["cfg"].diffusion.random_block_prob == 1.0


def test_the_demo_source_trains_on_whole_texts_without_the_eos_fill(tmp_path, monkeypatch):
    """The source stage stands in for a pretrained model, so data.eos_fill_to_block (a diffusion-training fill)
    is off there and its loss covers whole texts, whatever the recipe says; the joint stage keeps the recipe's
    data."""
    import ar2dlm.conversion.convert as convert
    import ar2dlm.conversion.export as export
    import ar2dlm.model.hf_factory as hf_factory
    import ar2dlm.training.loop as loop
    from ar2dlm.data.synthetic import split_corpus, write_jsonl
    from ar2dlm.pipeline import _demo_source

    seen = {}

    class RecordingTrainer:
        def __init__(self, cfg):
            seen["cfg"] = cfg

        def fit(self):
            (tmp_path / "run" / "source_train" / "checkpoints" / "step_0000001").mkdir(parents=True)
            return [{"ar_loss": 1.0, "step": 1}]

    monkeypatch.setattr(loop, "Trainer", RecordingTrainer)
    monkeypatch.setattr(hf_factory, "make_hf_model", lambda *args, **kwargs: None)
    monkeypatch.setattr(convert, "convert", lambda *args, **kwargs: None)
    monkeypatch.setattr(export, "export", lambda *args, **kwargs: None)
    corpus = write_jsonl(tmp_path / "train.jsonl", split_corpus(50, 1, 0)[0])
    cfg = compose_stage("run", ["recipe=demo", f"output={tmp_path / 'run'}", "data.eos_fill_to_block=true",
                                "data.seq_length=64", "demo.loss_on_answers=true"])
    _demo_source(cfg, tmp_path / "run", corpus)
    assert seen["cfg"].data.eos_fill_to_block is False and seen["cfg"].data.seq_length == 64
    (source,) = seen["cfg"].data.sources
    assert source.path == str(corpus) and source.text_field == "text" and source.prompt_field is None
    assert seen["cfg"].train.objective == "ar"
    assert cfg.data.eos_fill_to_block is True  # the run's own config (the joint stage's) is untouched


@pytest.mark.parametrize("answers", [False, True])
def test_the_demo_corpus_trains_on_answers_when_asked(tmp_path, answers):
    """demo.loss_on_answers reads the corpus as prompt / answer pairs, whose concatenation is the whole text."""
    from ar2dlm.data.sources import ReadStats, iter_records
    from ar2dlm.data.synthetic import split_corpus, write_jsonl
    from ar2dlm.pipeline import corpus_source

    corpus = write_jsonl(tmp_path / "train.jsonl", split_corpus(20, 1, 0)[0])
    cfg = compose_stage("run", ["recipe=demo", f"output={tmp_path}", f"demo.loss_on_answers={answers}"])
    source = OmegaConf.structured(DataSourceConfig(**corpus_source(cfg, corpus)))
    values = [r.value for r in iter_records(source, sft=False, strict=True, stats=ReadStats())]
    texts = [json.loads(line)["text"] for line in corpus.read_text().splitlines()]
    assert ["".join(v) for v in values] == texts if answers else values == texts
    assert all(isinstance(v, tuple) and v[0].endswith("=") for v in values) == answers
