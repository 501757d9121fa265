"""Accuracy against speed across a decoding sweep (AR; diffusion per block length and threshold;
self-speculation per block length) on held-out demo-corpus examples.

    python benchmarks/eval_decoding_sweep.py [--model EXPORT_DIR] [--examples 20 --max-new-tokens 16
        --block-lengths 4 8 --thresholds 0.3 0.6 0.9 --batch-size 4 --train-steps 400 --output DIR]

Without --model a tiny Llama export is built in a temporary folder and given --train-steps steps of the
joint AR + diffusion objective on the demo corpus (ar2dlm.eval.toy), so that it stops at EOS, commits
several tokens per diffusion pass and gets drafts accepted: its numbers show the shape of the trade-off
and the runtime's overheads, not what a real model achieves. NFE is per example decoded alone;
tokens/forward = generated tokens / NFE; tokens/s is batched throughput (see ar2dlm.eval.metrics).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch


def build_tiny_export(folder: Path, block_length: int, seed: int) -> Path:
    """A tiny random Llama with a tokenizer trained on the demo corpus and the ar2dlm runtime."""
    from ar2dlm.conversion.runtime_install import install_runtime
    from ar2dlm.data.synthetic import examples
    from ar2dlm.model.hf_factory import make_hf_model, train_tokenizer

    texts = [example.text for example in examples(500, seed=seed + 17)]
    tokenizer = train_tokenizer(texts, vocab_size=300, extra_special_tokens=["<|fim_pad|>"])
    path = make_hf_model("LlamaForCausalLM", folder, vocab_size=len(tokenizer) + 4, tokenizer=tokenizer,
                         hidden_size=64, num_layers=2, intermediate_size=128, seed=seed)
    install_runtime(path, architecture="LlamaForCausalLM", block_size=block_length,
                    mask_token_id=tokenizer.convert_tokens_to_ids("<|fim_pad|>"))
    return path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="an ar2dlm export (default: a tiny one made on the fly)")
    parser.add_argument("--examples", type=int, default=20, help="held-out demo examples")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--block-lengths", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--thresholds", type=float, nargs="+", default=[0.3, 0.6, 0.9])
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--train-steps", type=int, default=400, help="toy training of the tiny model")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: 1 for the tiny model, which "
                        "runs several times faster on one thread; torch's choice with --model)")
    parser.add_argument("--output", type=Path, help="also write report.json/.md and the plot here")
    return parser.parse_args(argv)


def load_model(args: argparse.Namespace, scratch: Path):
    from ar2dlm.data.synthetic import split_corpus
    from ar2dlm.eval.toy import train_toy
    from ar2dlm.generation.loading import load_export, resolve_device

    device = resolve_device(args.device)
    path = args.model or build_tiny_export(scratch / "tiny", block_length=min(args.block_lengths), seed=args.seed)
    tokenizer, model = load_export(path, device)
    if args.model is None and args.train_steps > 0:
        train, _ = split_corpus(2000, 1, args.seed)
        losses = train_toy(model, tokenizer, [e.text for e in train], args.train_steps, seed=args.seed,
                           length=32 if 32 % model.config.block_size == 0 else 8 * model.config.block_size)
        print(f"toy training: {args.train_steps} steps, loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    return path, tokenizer, model


def main(argv: list[str] | None = None) -> None:
    from ar2dlm.data.synthetic import split_corpus
    from ar2dlm.eval.report import machine_info, markdown_table, write_report
    from ar2dlm.eval.run import EvalSettings, evaluate_model

    args = parse_args(argv)
    threads = args.threads if args.threads is not None else (0 if args.model else 1)
    if threads > 0:
        torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as scratch:
        path, tokenizer, model = load_model(args, Path(scratch))
        _, examples = split_corpus(2000, args.examples, args.seed)
        settings = EvalSettings(thresholds=tuple(args.thresholds), block_lengths=tuple(args.block_lengths),
                                max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, seed=args.seed,
                                elbo_draws=2, extra={"model": str(args.model or "tiny toy-trained Llama")})
        machine = machine_info(model.device)
        print("machine: " + ", ".join(f"{key} {value}" for key, value in machine.items()))
        print(f"model: {settings.extra['model']} ({sum(p.numel() for p in model.parameters()):,} parameters, "
              f"{str(model.dtype).replace('torch.', '')})")
        print(f"settings: {args.examples} demo examples (seed {args.seed}), max_new_tokens {args.max_new_tokens}, "
              f"batch size {args.batch_size}, block lengths {args.block_lengths}, thresholds {args.thresholds}")
        with torch.inference_mode():
            report = evaluate_model(model, tokenizer, examples, settings)
        rows = report.pop("rows")
        ppl, elbo = report["perplexity"], report["elbo"]
        print(f"AR perplexity {ppl['perplexity']:.3f}; diffusion NELBO {elbo['nelbo_per_token']:.3f} nats/token")
        if args.output:
            paths = write_report(report, args.output, rows=rows)
            print("wrote " + ", ".join(str(p) for p in paths.values()))
        print(markdown_table(report["results"]))


if __name__ == "__main__":
    main()
