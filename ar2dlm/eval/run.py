"""`ar2dlm eval model=HF_DIR output=DIR tasks=[demo] modes=[ar,diffusion,self_spec] thresholds=[...]`.

Quality and speed of every decoding mode of an exported model: exact-match accuracy, NFE, tokens per
forward, self-speculation acceptance length and tokens/s for each setting of a sweep (AR once; diffusion
per block length and threshold; both self-speculation modes per block length), plus the AR perplexity and the
diffusion negative ELBO of held-out texts. Writes report.json, report.md, predictions.jsonl and
accuracy_vs_tpf.png into ``output`` and prints the table last. Metric definitions: :mod:`ar2dlm.eval.metrics`.
lm-evaluation-harness tasks (``tasks=[lm_eval:NAME]``) run after them: :mod:`ar2dlm.eval.harness`.

In-process use (e.g. by the demo pipeline, with a model already loaded)::

    report = evaluate_model(model, tokenizer, examples, EvalSettings(batch_size=4))
    write_report(report, output_dir, rows=report.pop("rows"))
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from omegaconf import DictConfig

from ar2dlm import __version__
from ar2dlm.errors import UserError
from ar2dlm.eval.elbo import diffusion_elbo
from ar2dlm.eval.generation import DecodeConfig, encode_prompts, evaluate_setting
from ar2dlm.eval.harness import check_harness_tasks, evaluate_harness, split_task_specs
from ar2dlm.eval.likelihood import encode_texts, perplexity
from ar2dlm.eval.metrics import ModeResult
from ar2dlm.eval.report import machine_info, now, tables, write_report
from ar2dlm.eval.tasks import check_limit, load_tasks, load_texts
from ar2dlm.fs import atomic_directory, check_output_dir
from ar2dlm.generation.modes import MODES, diffusion_levers
from ar2dlm.log import logger


@dataclass
class EvalSettings:
    """What :func:`evaluate_model` measures."""

    modes: tuple[str, ...] = MODES
    thresholds: tuple[float, ...] = (0.9,)
    block_lengths: tuple[int, ...] = (32,)
    max_new_tokens: int = 64
    batch_size: int = 8
    seed: int = 1234
    perplexity: bool = True
    elbo_draws: int = 4
    warmup: bool = True  # one short untimed decoding call before each setting
    decode_alone: bool = False  # see ar2dlm.eval.generation.evaluate_setting
    levers: dict = field(default_factory=dict)  # diffusion's sub_block_length, confidence, position_decay
    draft_length: int | None = None  # quad_spec; None: each block length - 1
    use_drafter: bool | None = None  # None: self-speculation with and without the drafter when the export has one
    extra: dict = field(default_factory=dict)  # recorded in the report's settings as given

    def check(self) -> None:
        """UserError for values no sweep can run with."""
        unknown = [mode for mode in self.modes if mode not in MODES]
        if unknown or not self.modes:
            raise UserError(f"modes must be a non-empty subset of {', '.join(MODES)}, got {list(self.modes)}")
        if any(not 0.0 <= t <= 1.0 for t in self.thresholds) or ("diffusion" in self.modes and not self.thresholds):
            raise UserError(f"thresholds must be in [0, 1] (at least one for diffusion), got {list(self.thresholds)}")
        if not self.block_lengths or any(b < 1 for b in self.block_lengths):
            raise UserError(f"block lengths must be >= 1, got {list(self.block_lengths)}")
        for name in ("max_new_tokens", "batch_size"):
            if getattr(self, name) < 1:
                raise UserError(f"{name}={getattr(self, name)} must be >= 1")
        if self.elbo_draws < 0:
            raise UserError(f"elbo_draws={self.elbo_draws} must be >= 0")


def sweep_configs(settings: EvalSettings, has_drafter: bool = False) -> list[DecodeConfig]:
    """The settings of the sweep: AR once, then per block length diffusion at each threshold and both
    self-speculation modes (quad_spec's ``draft_length`` capped at the block length - 1), each without and then
    with the export's drafter LoRA when it has one (``use_drafter``: only with, True; only without, False)."""
    configs = []
    if "ar" in settings.modes:
        configs.append(DecodeConfig("ar", settings.max_new_tokens))
    for block in settings.block_lengths:
        if "diffusion" in settings.modes:
            configs += [DecodeConfig("diffusion", settings.max_new_tokens, block, float(t), **settings.levers)
                        for t in settings.thresholds]
        drafters = [settings.use_drafter] if settings.use_drafter is not None else (
            [False, True] if has_drafter else [None])
        for drafter in drafters:
            if "self_spec" in settings.modes:
                configs.append(DecodeConfig("self_spec", settings.max_new_tokens, block, use_drafter=drafter))
            if "quad_spec" in settings.modes:
                draft = None if settings.draft_length is None else min(settings.draft_length, block - 1)
                configs.append(DecodeConfig("quad_spec", settings.max_new_tokens, block, draft_length=draft,
                                            use_drafter=drafter))
    return configs


def sweep(model, tokenizer, examples: Sequence, settings: EvalSettings) -> list[ModeResult]:
    """Decode every example in every setting of the sweep; one :class:`ModeResult` per setting."""
    settings.check()
    if not examples:
        raise UserError("no evaluation examples")
    context = getattr(model.config, "max_position_embeddings", None)
    encoded = encode_prompts(tokenizer, [e.prompt for e in examples], context, settings.max_new_tokens)
    results = []
    has_drafter = bool(getattr(model, "has_drafter", lambda: False)())
    for config in sweep_configs(settings, has_drafter):
        result = evaluate_setting(model, tokenizer, examples, encoded, config, settings.batch_size,
                                  warmup=settings.warmup, decode_alone=settings.decode_alone)
        logger.info("%s block=%s threshold=%s: accuracy %.3f, tokens/forward %.2f, %.1f tokens/s",
                    config.mode, config.block_length, config.threshold, result.accuracy,
                    result.tokens_per_forward, result.tokens_per_second)
        results.append(result)
    return results


def likelihoods(model, tokenizer, texts: Sequence[str], settings: EvalSettings) -> dict:
    """AR perplexity and (with ``elbo_draws`` > 0 and a mask token) the diffusion ELBO of ``texts``."""
    tokens = encode_texts(tokenizer, texts)
    out = {"perplexity": perplexity(model, tokens, settings.batch_size), "elbo": None}
    if settings.elbo_draws > 0:
        out["elbo"] = diffusion_elbo(model, tokens, draws=settings.elbo_draws, seed=settings.seed,
                                     batch_size=settings.batch_size)
    return out


def evaluate_model(model, tokenizer, examples: Sequence, settings: EvalSettings,
                   texts: Sequence[str] | None = None) -> dict:
    """The whole evaluation of a loaded tri-mode model, as a JSON-ready dict: ``settings``,
    ``results`` (one summary per setting), ``perplexity``, ``elbo`` and ``rows`` (per-example outputs).
    ``texts``: held-out texts for the likelihoods (default: each example's prompt + answer). Without
    examples there is no sweep, and no likelihoods without ``texts``."""
    start = time.perf_counter()
    results = sweep(model, tokenizer, examples, settings) if examples else []
    report = {"settings": report_settings(model, examples, settings), "results": [r.summary() for r in results],
              "perplexity": None, "elbo": None}
    if settings.perplexity and (texts or examples):
        report.update(likelihoods(model, tokenizer, texts or [e.prompt + e.answer for e in examples], settings))
    report["rows"] = [{"mode": r.mode, "block_length": r.block_length, "threshold": r.threshold, **asdict(row)}
                      for r in results for row in r.rows]
    report["settings"]["seconds"] = round(time.perf_counter() - start, 3)
    return report


def report_settings(model, examples: Sequence, settings: EvalSettings) -> dict:
    tasks: dict[str, int] = {}
    for example in examples:
        tasks[example.task] = tasks.get(example.task, 0) + 1
    return {
        "model": str(getattr(model, "name_or_path", "") or getattr(model.config, "_name_or_path", "")),
        **settings.extra, "examples": len(examples), "task_examples": tasks, "modes": list(settings.modes),
        "block_lengths": list(settings.block_lengths), "thresholds": list(settings.thresholds), **settings.levers,
        "draft_length": settings.draft_length, "use_drafter": settings.use_drafter, "max_new_tokens": settings.max_new_tokens, "batch_size": settings.batch_size, "seed": settings.seed,
        "temperature": 0.0, "elbo_draws": settings.elbo_draws if settings.perplexity else 0,
        "decode_alone": settings.decode_alone,
        "dtype": str(model.dtype).replace("torch.", ""), "ar2dlm": __version__, "date": now(),
        "machine": machine_info(model.device),
    }


def settings_from_config(cfg: DictConfig) -> EvalSettings:
    """:class:`EvalSettings` from an ``EvalStage``-shaped config."""
    block_lengths = tuple(cfg.get("block_lengths") or [cfg.block_length])
    settings = EvalSettings(
        modes=tuple(cfg.modes), thresholds=tuple(float(t) for t in cfg.thresholds),
        block_lengths=tuple(int(b) for b in block_lengths), max_new_tokens=int(cfg.max_new_tokens),
        batch_size=int(cfg.batch_size), seed=int(cfg.get("seed", 1234)), perplexity=bool(cfg.get("perplexity", True)),
        elbo_draws=int(cfg.get("elbo_draws", 4)), decode_alone=bool(cfg.get("decode_alone", False)),
        levers=diffusion_levers(cfg), draft_length=cfg.get("draft_length"), use_drafter=cfg.get("use_drafter"),
        extra={"model": str(cfg.model), "tasks": list(cfg.tasks), "limit": cfg.limit,
               **({"lm_eval_include": cfg.lm_eval_include} if cfg.get("lm_eval_include") else {})},
    )
    settings.check()
    return settings


def run_eval(cfg: DictConfig) -> int:
    """Entry point of `ar2dlm eval`."""
    from ar2dlm.generation.loading import check_export, check_served, load_export, resolve_device

    output = check_output_dir(cfg.output, cfg.get("overwrite", False), inputs=[cfg.model])
    settings = settings_from_config(cfg)
    native, harness_names = split_task_specs(list(cfg.tasks))
    check_limit(cfg.limit)
    examples = load_tasks(native, seed=settings.seed, limit=cfg.limit) if native or not harness_names else []
    texts = load_texts(cfg.perplexity_texts) if cfg.get("perplexity_texts") else None
    model_dir = Path(cfg.model).expanduser()
    config = check_export(model_dir)
    check_served(model_dir, config, [m for m in settings.modes if m != "ar"]
                 + (["the diffusion ELBO (elbo_draws > 0)"] if settings.perplexity and settings.elbo_draws else []))
    harness_tasks = check_harness_tasks(harness_names, cfg.get("lm_eval_include")) if harness_names else []
    device = resolve_device(cfg.get("device", "auto"))
    logger.info("evaluating %s on %s: %d examples%s", model_dir, device, len(examples),
                "".join(f", lm_eval:{task.name}" for task in harness_tasks))
    tokenizer, model = load_export(model_dir, device)
    report = evaluate_model(model, tokenizer, examples, settings, texts=texts)
    if harness_tasks:
        report["lm_eval"] = evaluate_harness(
            model, tokenizer, harness_tasks, sweep_configs(settings), include=cfg.get("lm_eval_include"),
            batch_size=settings.batch_size, max_new_tokens=settings.max_new_tokens, limit=cfg.limit)
    rows = report.pop("rows")
    with atomic_directory(output, cfg.get("overwrite", False)) as staging:
        paths = write_report(report, staging, rows=rows)
    logger.info("wrote %s", ", ".join(str(output / path.name) for path in paths.values()))
    print("\n\n".join(tables(report)))
    return 0
