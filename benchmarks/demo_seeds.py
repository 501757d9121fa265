"""Seed spread of the demo's joint stage: N trainings from one fixed converted source checkpoint.

    python benchmarks/demo_seeds.py --output outputs/demo_seeds --seeds 1234 1235 1236 \
        [--source-run outputs/demo] [--steps N] [--source-steps N] [--eval-prompts N] [--set KEY=VALUE ...] \
        [--drafter] [--joint-from OUTPUT_OF_AN_EARLIER_CALL]

The source model (stage 1 of `ar2dlm run recipe=demo`) and its conversion are made once: taken from
``--source-run`` (a finished `ar2dlm run` output folder, its ``converted/`` and ``data/``), else built in
OUTPUT/source_run with the pipeline's own code and reused by later calls with the same OUTPUT. Per seed
the joint stage trains from that checkpoint with ``seed`` set to the seed (data order, masks, dropout),
then exports and evaluates on the same held-out prompts (the first ``--eval-prompts`` of the run's
eval.jsonl) with the same eval settings. ``--drafter`` adds the recipe's drafter stage after the joint stage,
as `ar2dlm run` does (the export then holds the adapter, and self-speculation is evaluated without and with
it); ``--joint-from`` takes each seed's joint checkpoint from an earlier call's OUTPUT/seed_S/train instead of
training it again (drafter studies on fixed joint models). Prints, per decoding setting, the mean, min-max and
std of the accuracy, of tokens per forward and of the acceptance length over the seeds, the pooled accuracy's
95% Wilson interval, and with ``--drafter`` the drafter's gain in acceptance length per seed
(:mod:`ar2dlm.eval.spread`); writes OUTPUT/seeds.json and OUTPUT/seeds.md. Each seed's folder
(OUTPUT/seed_S) is replaced on every call.

Smoke check (minutes on a CPU; the numbers mean nothing):
    python benchmarks/demo_seeds.py --output /tmp/seeds --seeds 1 2 --source-steps 20 --steps 10 \
        --eval-prompts 20 --set demo.train_examples=2000
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, required=True, help="benchmark folder")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1234, 1235, 1236])
    parser.add_argument("--source-run", type=Path, help="a finished `ar2dlm run` output folder to train from")
    parser.add_argument("--steps", type=int, help="joint-stage steps (default: the recipe's train.steps)")
    parser.add_argument("--source-steps", type=int, help="source-stage steps when the source is built here")
    parser.add_argument("--eval-prompts", type=int, help="evaluate the first N held-out prompts (default: all)")
    parser.add_argument("--recipe", default="demo")
    parser.add_argument("--set", dest="overrides", nargs="*", default=[], metavar="KEY=VALUE",
                        help="config overrides of the run stage, e.g. eval.thresholds=[0.9]")
    parser.add_argument("--drafter", action="store_true", help="run the recipe's drafter stage after the joint stage")
    parser.add_argument("--joint-from", type=Path, help="an earlier call's OUTPUT: its seed_S/train checkpoints "
                        "are the joint stage")
    args = parser.parse_args(argv)
    if args.joint_from is not None and args.joint_from.resolve() == args.output.resolve():
        parser.error("--joint-from must be another folder than --output (each seed's folder is replaced)")
    return args


def run_config(args: argparse.Namespace, source_run: Path):
    from omegaconf import OmegaConf

    from ar2dlm.config import compose_stage

    overrides = [f"recipe={args.recipe}", f"output={source_run}", "overwrite=true", *args.overrides]
    if args.steps is not None:
        overrides.append(f"train.steps={args.steps}")
    if args.source_steps is not None:
        overrides.append(f"source_model.train.steps={args.source_steps}")
    return OmegaConf.create(OmegaConf.to_container(compose_stage("run", overrides), resolve=True))  # writable


def with_corpus(cfg, train_corpus: Path):
    """The run config training on the demo corpus file (what `ar2dlm run` does before its stages)."""
    from omegaconf import OmegaConf

    from ar2dlm.pipeline import corpus_source

    return OmegaConf.merge(cfg, {"data": {**OmegaConf.to_container(cfg.data),
                                          "sources": [corpus_source(cfg, train_corpus)]}})


def build_source(cfg, folder: Path) -> None:
    """Stages 1-2 of the demo (corpus, source model, conversion) into ``folder``, as `ar2dlm run` makes them."""
    from ar2dlm.conversion.convert import convert
    from ar2dlm.pipeline import _corpus, _source

    folder.mkdir(parents=True, exist_ok=True)
    train_corpus, _ = _corpus(cfg, folder / "data")
    source = _source(with_corpus(cfg, train_corpus), folder, train_corpus)
    convert(source, folder / "converted", mask_token_id=cfg.mask_token_id, block_size=cfg.diffusion.block_size,
            overwrite=True)


def fixed_source(args: argparse.Namespace, cfg) -> Path:
    """The run folder holding converted/ and data/: --source-run, or one built (once) under OUTPUT."""
    folder = args.source_run or args.output / "source_run"
    if not (folder / "converted").is_dir() or not (folder / "data" / "eval.jsonl").is_file():
        if args.source_run:
            raise SystemExit(f"{folder} has no converted/ and data/eval.jsonl: not an `ar2dlm run` output")
        print(f"building the source model and its conversion in {folder}")
        build_source(cfg, folder)
    return folder


def train_and_export(cfg, source_run: Path, seed: int, folder: Path, *, drafter: bool = False,
                     joint_from: Path | None = None) -> tuple[Path, dict]:
    """The joint stage with ``seed`` from the fixed converted checkpoint (or the one of ``joint_from``), then the
    drafter stage if asked, exported to folder/model; and the stages' wall seconds."""
    from omegaconf import OmegaConf

    from ar2dlm.conversion.export import export
    from ar2dlm.distributed import ParallelLayout, init_distributed
    from ar2dlm.pipeline import _drafter, _train_config
    from ar2dlm.training.loop import Trainer

    seeded = OmegaConf.merge(with_corpus(cfg, source_run / "data" / "train.jsonl"), {"seed": seed})
    init_distributed(ParallelLayout(cfg.parallel.tensor, cfg.parallel.pipeline, cfg.parallel.context), seed=seed)
    seconds, started = {}, time.perf_counter()
    if joint_from is None:
        Trainer(_train_config(seeded, init=source_run / "converted", output=folder / "train")).fit()
        final = last_checkpoint(folder / "train")
        seconds["joint"] = round(time.perf_counter() - started, 1)
    else:
        final = last_checkpoint(joint_from / f"seed_{seed}" / "train")
    if drafter:
        started = time.perf_counter()
        final = _drafter(seeded, final, folder / "drafter")
        seconds["drafter"] = round(time.perf_counter() - started, 1)
    export(final, folder / "model")
    return folder / "model", seconds


def last_checkpoint(train_folder: Path) -> Path:
    from ar2dlm.training.checkpointing import newest_checkpoint

    newest = newest_checkpoint(train_folder)
    if newest is None:
        raise SystemExit(f"{train_folder} holds no checkpoint (checkpoints/step_*)")
    return newest


def start(cfg) -> None:
    """What the CLI does before a stage: logging, the expected warnings silenced, torch set up for the CPU,
    and (as `ar2dlm run` does) the process group."""
    from ar2dlm.compat import configure_torch_for_cpu
    from ar2dlm.distributed import ParallelLayout, init_distributed
    from ar2dlm.expected_warnings import silence_expected_warnings
    from ar2dlm.log import setup_logging

    setup_logging(cfg.logging.level)
    silence_expected_warnings()
    configure_torch_for_cpu()
    init_distributed(ParallelLayout(cfg.parallel.tensor, cfg.parallel.pipeline, cfg.parallel.context), seed=cfg.seed)


def main(argv: list[str] | None = None) -> None:
    from ar2dlm.data.synthetic import read_jsonl
    from ar2dlm.eval.report import mode_label
    from ar2dlm.eval.spread import aggregate_seeds, drafter_gains, spread_table
    from ar2dlm.pipeline import _evaluate, eval_settings

    args = parse_args(argv)
    if len(set(args.seeds)) != len(args.seeds):
        raise SystemExit(f"repeated seeds in {args.seeds}")
    cfg = run_config(args, args.source_run or args.output / "source_run")
    start(cfg)
    source_run = fixed_source(args, cfg)
    examples = read_jsonl(source_run / "data" / "eval.jsonl")[:args.eval_prompts]
    if args.eval_prompts is not None and len(examples) < args.eval_prompts:
        raise SystemExit(f"{source_run / 'data' / 'eval.jsonl'} holds {len(examples)} prompts, fewer than "
                         f"--eval-prompts {args.eval_prompts} (its run had demo.eval_examples={len(examples)})")
    settings = eval_settings(cfg)  # the demo's, seeded with the recipe's seed: only training varies
    per_seed, seconds = {}, {}
    for seed in args.seeds:
        folder = args.output / f"seed_{seed}"
        if folder.exists():
            shutil.rmtree(folder)
        started = time.perf_counter()
        model, stages = train_and_export(cfg, source_run, seed, folder, drafter=args.drafter,
                                         joint_from=args.joint_from)
        trained = time.perf_counter()
        per_seed[seed] = _evaluate(model, examples, settings, folder / "eval")["results"]
        seconds[seed] = {**stages, "train_export": round(trained - started, 1),
                         "eval": round(time.perf_counter() - trained, 1)}
        print(f"seed {seed}: " + ", ".join(f"{mode_label(r)} {r['accuracy']:.3f} ({r['tokens_per_forward']:.2f} tpf)"
                                           for r in per_seed[seed]) + f"; {seconds[seed]}")
    rows = aggregate_seeds(per_seed)
    gains = drafter_gains(per_seed)
    table = spread_table(rows) + "".join(
        f"\n\n{gain['mode']} B={gain['block_length']}: acceptance length +{100 * gain['mean']:.1f}% (per seed: "
        + ", ".join(f"{seed} {100 * value:+.1f}%" for seed, value in gain["per_seed"].items()) + ")"
        for gain in gains)
    summary = {"source_run": str(source_run), "seeds": args.seeds, "prompts": len(examples),
               "joint_steps": cfg.train.steps, "joint_from": args.joint_from and str(args.joint_from),
               "drafter_steps": cfg.drafter_stage.steps if args.drafter else 0, "seconds": seconds,
               "settings": rows, "drafter_gains": gains, "per_seed": per_seed}
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "seeds.json").write_text(json.dumps(summary, indent=2) + "\n")
    joint = (f"the joint stage ({cfg.train.steps} steps) from {source_run / 'converted'}" if args.joint_from is None
             else f"the joint checkpoints of {args.joint_from}")
    drafter = f", then the drafter stage ({cfg.drafter_stage.steps} steps)" if args.drafter else ""
    note = (f"{len(args.seeds)} seeds ({' '.join(map(str, args.seeds))}) of {joint}{drafter}, {len(examples)} held-out "
            "prompts each; std: sample (n-1); pooled interval: Wilson 95% over all seeds' decodings of the same "
            "prompts")
    (args.output / "seeds.md").write_text(f"# demo seeds\n\n{table}\n\n{note}\n")
    print(table)
    print(note)


if __name__ == "__main__":
    main()
