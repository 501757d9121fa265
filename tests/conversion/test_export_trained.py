"""Export of a trained run: the block size and clean-stream pattern come from the training (also for checkpoints
written before ar2dlm recorded them), a run folder exports its newest checkpoint, and the runtime refuses
diffusion and self-speculation for a clean stream it does not serve."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

from ar2dlm.config import compose_stage
from ar2dlm.conversion.convert import convert
from ar2dlm.conversion.export import export
from ar2dlm.data.synthetic import examples, write_jsonl
from ar2dlm.errors import UserError
from ar2dlm.model.checkpoint import METADATA_FILE, read_metadata
from ar2dlm.model.manifest import write_manifest


@pytest.fixture(scope="module")
def block_causal_run(tmp_path_factory, tiny_tokenizer, megatron_ready):
    """A converted tiny Qwen3 (convert's block size 32) trained 2 steps with objective=diffusion,
    clean_pattern=block_causal and block size 4, a checkpoint after each step; returns (run folder, cfg factory)."""
    from ar2dlm.model.hf_factory import make_hf_model
    from ar2dlm.training.loop import Trainer

    root = tmp_path_factory.mktemp("trained")
    source = make_hf_model("Qwen3ForCausalLM", root / "source", vocab_size=len(tiny_tokenizer) + 4,
                           tokenizer=tiny_tokenizer, tie_word_embeddings=True)
    convert(source, root / "converted")
    corpus = write_jsonl(root / "corpus.jsonl", list(examples(40, seed=0)))

    def cfg(*overrides):
        return compose_stage("train", [
            f"init={root / 'converted'}", f"output={root / 'run'}", "recipe=tiny", f"data.sources=[{{path: {corpus}}}]",
            "data.seq_length=16", "train.global_batch_size=2", "train.micro_batch_size=2", "train.steps=2",
            "checkpoint.save_interval=1", "train.objective=diffusion", "diffusion.clean_pattern=block_causal",
            "diffusion.block_size=4", *overrides])

    Trainer(cfg()).fit()
    return root / "run", cfg


def test_training_records_its_block_size_and_clean_pattern(block_causal_run):
    from ar2dlm.training.loop import Trainer

    run, cfg = block_causal_run
    metadata = read_metadata(run / "checkpoints" / "step_0000002")
    assert (metadata.block_size, metadata.clean_pattern, metadata.step) == (4, "block_causal", 2)
    converted = read_metadata(cfg().init)
    assert (converted.block_size, converted.clean_pattern) == (32, "causal")
    ar_only = Trainer(cfg("train.objective=ar", f"output={run.parent / 'ar_run'}"))  # trains no diffusion
    assert (ar_only.metadata.block_size, ar_only.metadata.clean_pattern) == (32, "causal")


def test_a_run_folder_exports_its_newest_checkpoint_with_the_training_settings(block_causal_run, tmp_path, capsys):
    from ar2dlm.cli import main

    run, _ = block_causal_run
    assert main(["export", f"checkpoint={run}", f"output={tmp_path / 'exported'}"]) == 0
    assert f"(step 2, {run / 'checkpoints' / 'step_0000002'})" in capsys.readouterr().out
    config = json.loads((tmp_path / "exported" / "config.json").read_text())
    assert (config["block_size"], config["clean_pattern"]) == (4, "block_causal")
    assert (config["dllm"]["block_size"], config["dllm"]["causal_context"]) == (4, False)
    card = (tmp_path / "exported" / "README.md").read_text()
    assert "block size 4 and a `block_causal` clean stream" in card and "refuses diffusion and self-speculation" in card

    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "exported", trust_remote_code=True).eval()
    ids = torch.tensor([[20, 21, 22]])
    for decode in (model.generate, model.linear_spec_generate):
        with pytest.raises(ValueError, match="clean-stream pattern 'block_causal'"):
            decode(ids, 4)
    assert model.ar_generate(ids, 4)[0].shape == (1, 7)


@pytest.mark.parametrize("mode", ["diffusion", "self_spec"])
def test_generate_refuses_diffusion_modes_for_a_block_causal_export(mode, block_causal_run, tmp_path):
    from ar2dlm.cli import main

    run, _ = block_causal_run
    export(run / "checkpoints" / "step_0000001", tmp_path / "exported")
    assert main(["generate", f"model={tmp_path / 'exported'}", f"mode={mode}", "prompt=the fox", "device=cpu",
                 "max_new_tokens=2"]) == 2
    assert main(["generate", f"model={tmp_path / 'exported'}", "mode=ar", "prompt=the fox", "device=cpu",
                 "max_new_tokens=2"]) == 0


def test_older_checkpoints_take_the_settings_from_their_training_config(block_causal_run, tmp_path):
    """A checkpoint written before ar2dlm.json held clean_pattern (and with convert's block size)."""
    import shutil

    run, _ = block_causal_run
    old = tmp_path / "old"
    shutil.copytree(run / "checkpoints" / "step_0000001", old)
    raw = json.loads((old / METADATA_FILE).read_text())
    del raw["clean_pattern"]
    (old / METADATA_FILE).write_text(json.dumps({**raw, "block_size": 32}))
    write_manifest(old)
    metadata = export(old, tmp_path / "exported")
    assert (metadata.block_size, metadata.clean_pattern) == (4, "block_causal")


def test_a_run_without_checkpoints_is_refused(block_causal_run, tmp_path):
    (tmp_path / "empty_run" / "checkpoints").mkdir(parents=True)
    with pytest.raises(UserError, match="training run without a checkpoint yet"):
        export(tmp_path / "empty_run", tmp_path / "exported")
    assert not (tmp_path / "exported").exists()


def test_eval_refuses_diffusion_modes_and_the_elbo_for_a_block_causal_export(block_causal_run, tmp_path):
    from ar2dlm.cli import main

    run, _ = block_causal_run
    export(run, tmp_path / "exported")
    common = [f"model={tmp_path / 'exported'}", "tasks=[demo:2]", "max_new_tokens=2", "device=cpu"]
    for refused in (["modes=[ar,self_spec]", "elbo_draws=0"], ["modes=[ar]", "elbo_draws=2"]):
        assert main(["eval", *common, f"output={tmp_path / 'refused'}", *refused]) == 2
    assert not (tmp_path / "refused").exists()
    assert main(["eval", *common, f"output={tmp_path / 'report'}", "modes=[ar]", "elbo_draws=0"]) == 0
