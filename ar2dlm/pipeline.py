"""`ar2dlm run`: the whole method in one command, each stage the same code as its own command.

    1. source   the user's HF model (source=PATH), or a small model trained here with objective=ar on
                the generated task corpus and exported as an ordinary HF checkpoint (the stand-in
                for a pretrained model)
    2. convert  HF -> ar2dlm checkpoint (mask token chosen, exact at step 0)
    3. train    joint AR + diffusion training
    4. drafter  (drafter_stage.steps > 0) the self-speculation drafter LoRA, train.objective=drafter, from the joint
                stage's last checkpoint; the base model stays frozen
    5. export   HF folder with the tri-mode runtime (and the drafter as linear_spec_lora/)
    6. eval     the source in AR mode and the export in every mode of ``eval.modes`` on held-out prompts

Everything lands in OUTPUT/; OUTPUT/report.md, report.json and accuracy_vs_tpf.png hold the result.
"""

from __future__ import annotations

import shutil
import time
from contextlib import contextmanager
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from ar2dlm.config.schema import DataSourceConfig
from ar2dlm.conversion.runtime_install import SERVED_CLEAN_PATTERN
from ar2dlm.data.synthetic import read_jsonl, split_corpus, write_jsonl
from ar2dlm.distributed import ParallelLayout, init_distributed, is_rank_zero
from ar2dlm.errors import UserError
from ar2dlm.fs import check_output_dir
from ar2dlm.log import logger

STAGES = ("source", "convert", "train", "drafter", "export", "eval")


class StageClock:
    """Prints a header per stage and records its wall time."""

    def __init__(self, names: tuple[str, ...]):
        self.names = names
        self.seconds: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str, detail: str = ""):
        index = self.names.index(name) + 1
        logger.info("=== [%d/%d] %s%s ===", index, len(self.names), name, f": {detail}" if detail else "")
        started = time.perf_counter()
        yield
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - started
        logger.info("=== %s done in %.1fs ===", name, self.seconds[name])


def _train_config(cfg: DictConfig, *, init: Path, output: Path, **sections) -> DictConfig:
    """A train-stage config derived from the run config (the same keys the `train` command takes)."""
    plain = OmegaConf.to_container(cfg, resolve=True)
    plain.update(init=str(init), output=str(output), resume=False, **sections)
    return OmegaConf.create(plain)


def _corpus(cfg: DictConfig, data_dir: Path) -> tuple[Path, Path]:
    train, held_out = split_corpus(cfg.demo.train_examples, cfg.demo.eval_examples, cfg.seed)
    return write_jsonl(data_dir / "train.jsonl", train), write_jsonl(data_dir / "eval.jsonl", held_out)


def corpus_source(cfg: DictConfig, corpus: Path, *, whole_text: bool = False) -> dict:
    """The demo corpus as a data source: its whole texts, or (``demo.loss_on_answers``, unless ``whole_text``)
    its prompt / answer pairs with the loss on the answers."""
    pairs = cfg.demo.loss_on_answers and not whole_text
    fields = {"text_field": "answer", "prompt_field": "prompt"} if pairs else {}
    return OmegaConf.to_container(OmegaConf.structured(DataSourceConfig(path=str(corpus), **fields)))


def _demo_source(cfg: DictConfig, output: Path, corpus: Path) -> Path:
    """Train the stand-in pretrained model: a small random model of the chosen family, objective=ar."""
    from ar2dlm.conversion.convert import convert
    from ar2dlm.conversion.export import export
    from ar2dlm.model.hf_factory import make_hf_model, train_tokenizer
    from ar2dlm.training.checkpointing import newest_checkpoint
    from ar2dlm.training.loop import Trainer

    spec = cfg.source_model
    texts = [example.text for example in read_jsonl(corpus)]
    tokenizer = train_tokenizer(texts, cfg.demo.tokenizer_vocab_size, extra_special_tokens=["<|mask|>"])
    vocab = -(-len(tokenizer) // 8) * 8  # pad the vocabulary to a multiple of 8 like real checkpoints
    initial = make_hf_model(spec.architecture, output / "source_init", vocab_size=vocab, hidden_size=spec.hidden_size,
                            num_layers=spec.num_layers, num_attention_heads=spec.num_attention_heads,
                            num_key_value_heads=spec.num_key_value_heads, intermediate_size=spec.intermediate_size,
                            tokenizer=tokenizer, seed=cfg.seed, tie_word_embeddings=True)
    convert(initial, output / "source_megatron", block_size=cfg.diffusion.block_size, overwrite=True)
    # a plain pretrained stand-in: the whole texts in the loss, no EOS fill
    data = {**OmegaConf.to_container(cfg.data, resolve=True), "eos_fill_to_block": False,
            "sources": [corpus_source(cfg, corpus, whole_text=True)]}
    train_cfg = _train_config(cfg, init=output / "source_megatron", output=output / "source_train",
                              train=OmegaConf.to_container(spec.train), optim=OmegaConf.to_container(spec.optim),
                              data=data)
    history = Trainer(train_cfg).fit()
    final = newest_checkpoint(output / "source_train")
    export(final, output / "source", overwrite=True)
    logger.info("source model: %s, AR loss %.4f after %d steps", spec.architecture, history[-1]["ar_loss"],
                history[-1]["step"])
    return output / "source"


def _source(cfg: DictConfig, output: Path, corpus: Path) -> Path:
    if cfg.source:
        return Path(cfg.source).expanduser()
    if cfg.source_gguf.package:
        from ar2dlm.conversion.gguf_source import hf_checkpoint_from_gguf

        return hf_checkpoint_from_gguf(cfg.source_gguf.package, cfg.source_gguf.file, output / "source")
    return _demo_source(cfg, output, corpus)


def _drafter(cfg: DictConfig, joint_checkpoint: Path, output: Path) -> Path:
    """The drafter stage: its last checkpoint (the joint one when drafter_stage.steps is 0). It drafts blocks of
    the size the export decodes with: when the joint stage trained another (diffusion.decode_block_size), the
    drafter trains at the decoding block, its random block sizes (if on) the default candidates of that block.
    ``drafter_stage.random_block_prob``, when set, replaces the joint stage's share of steps at a random size."""
    from ar2dlm.training.checkpointing import newest_checkpoint
    from ar2dlm.training.loop import Trainer, decode_block_size

    stage = cfg.drafter_stage
    if stage.steps == 0:
        logger.info("no drafter stage (drafter_stage.steps=0)")
        return joint_checkpoint
    train = {**OmegaConf.to_container(cfg.train), "objective": "drafter", "steps": stage.steps}
    diffusion = OmegaConf.to_container(cfg.diffusion)
    if decode_block_size(cfg.diffusion) != cfg.diffusion.block_size:
        diffusion.update(block_size=decode_block_size(cfg.diffusion), decode_block_size=None, random_block_sizes=[])
    if stage.random_block_prob is not None:
        diffusion.update(random_block_prob=stage.random_block_prob)
    Trainer(_train_config(cfg, init=joint_checkpoint, output=output, train=train, diffusion=diffusion,
                          optim=OmegaConf.to_container(stage.optim))).fit()
    return newest_checkpoint(output)


def _evaluate(model_dir: Path, examples: list, settings, output: Path, *, export: bool = True,
              **config_defaults) -> dict:
    """Evaluate ``model_dir`` with this ar2dlm's runtime classes (the folder's own code never runs);
    ``config_defaults`` fill config fields the folder lacks (a source has no mask token yet)."""
    from transformers import AutoTokenizer

    from ar2dlm.eval.report import write_report
    from ar2dlm.eval.run import evaluate_model
    from ar2dlm.generation.loading import load_runtime_model

    model = load_runtime_model(model_dir, export=export).eval()
    for key, value in config_defaults.items():
        if getattr(model.config, key, None) is None:
            setattr(model.config, key, value)
    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)
    report = evaluate_model(model, tokenizer, examples, settings)
    rows = report.pop("rows")
    write_report(report, output, rows=rows)
    return {**report, "rows": rows}


def eval_settings(cfg: DictConfig):
    """The eval stage's :class:`~ar2dlm.eval.run.EvalSettings` from a run config (also used by
    benchmarks/demo_seeds.py, so that its evaluations match the demo's)."""
    from ar2dlm.eval.run import EvalSettings
    from ar2dlm.generation.modes import diffusion_levers

    block_lengths = tuple(cfg.eval.get("block_lengths") or [cfg.eval.block_length])
    return EvalSettings(modes=tuple(cfg.eval.modes), thresholds=tuple(cfg.eval.thresholds),
                        block_lengths=block_lengths, max_new_tokens=cfg.eval.max_new_tokens,
                        batch_size=cfg.eval.batch_size, seed=cfg.seed, elbo_draws=cfg.eval.elbo_draws,
                        decode_alone=cfg.eval.decode_alone, levers=diffusion_levers(cfg.eval),
                        draft_length=cfg.eval.get("draft_length"), use_drafter=cfg.eval.get("use_drafter"))


def run_pipeline(cfg: DictConfig) -> int:
    """CLI entry point of `ar2dlm run`; rank 0 holds the output's lock (one run per output) throughout."""
    from ar2dlm.training.output_lock import output_lock

    cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))  # writable copy
    output = check_output_dir(cfg.output, cfg.overwrite, inputs=[cfg.source])
    with output_lock(output):  # one run per output: a second one stops here, before deleting anything
        _empty(output)
        return _run_stages(cfg, output)


def _empty(output: Path) -> None:
    """Delete everything in ``output`` but its lock file (``overwrite=true`` was given or it was empty)."""
    from ar2dlm.training.output_lock import LOCK_FILE

    for entry in output.iterdir():
        if entry.name == LOCK_FILE:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def _run_stages(cfg: DictConfig, output: Path) -> int:
    """The stages of :func:`run_pipeline` into the (empty, locked) ``output``."""
    from ar2dlm.conversion.convert import convert
    from ar2dlm.conversion.export import export
    from ar2dlm.eval.run import EvalSettings
    from ar2dlm.pipeline_report import write_run_report
    from ar2dlm.training.checkpointing import newest_checkpoint
    from ar2dlm.training.loop import Trainer

    init_distributed(ParallelLayout(cfg.parallel.tensor, cfg.parallel.pipeline, cfg.parallel.context), seed=cfg.seed)
    clock = StageClock(STAGES)
    with clock.stage("source", cfg.source or cfg.source_gguf.file
                     or f"train a {cfg.source_model.architecture} with objective=ar"):
        train_corpus, eval_corpus = _corpus(cfg, output / "data")
        if cfg.data.sources:
            raise UserError("ar2dlm run trains on the generated demo corpus; use `ar2dlm train` for your own data")
        data = {**OmegaConf.to_container(cfg.data), "sources": [corpus_source(cfg, train_corpus)]}
        cfg = OmegaConf.merge(cfg, {"data": data})
        source = _source(cfg, output, train_corpus)
    with clock.stage("convert", str(source)):
        metadata = convert(source, output / "converted", mask_token_id=cfg.mask_token_id,
                           block_size=cfg.diffusion.block_size)
    with clock.stage("train", f"objective={cfg.train.objective}, {cfg.train.steps} steps"):
        history = Trainer(_train_config(cfg, init=output / "converted", output=output / "train")).fit()
    joint = newest_checkpoint(output / "train")
    with clock.stage("drafter", f"objective=drafter, {cfg.drafter_stage.steps} steps"):
        final = _drafter(cfg, joint, output / "drafter")
    with clock.stage("export"):
        exported = export(final, output / "model")
    with clock.stage("eval", f"{cfg.demo.eval_examples} held-out prompts"):
        examples = read_jsonl(eval_corpus)
        settings = eval_settings(cfg)
        ar_only = EvalSettings(**{**settings.__dict__, "modes": ("ar",), "elbo_draws": 0})  # no mask token yet
        source_report = _evaluate(source, examples, ar_only, output / "eval_source", export=False,
                                  mask_token_id=metadata.mask_token_id, block_size=cfg.diffusion.block_size)
        if exported.clean_pattern != SERVED_CLEAN_PATTERN:
            logger.warning("the model was trained with diffusion.clean_pattern=%s, which the runtime decodes in AR "
                           "mode only: evaluating AR mode", exported.clean_pattern)
            settings = ar_only
        model_report = _evaluate(output / "model", examples, settings, output / "eval_model")
    if is_rank_zero():
        table = write_run_report(output, cfg, source_report, model_report, history, clock.seconds)
        print(table)
    return 0
