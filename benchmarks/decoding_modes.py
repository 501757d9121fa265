"""Compare the decoding modes of the runtime (AR, diffusion, both self-speculation modes) on one model and the same prompts.

    python benchmarks/decoding_modes.py [--model EXPORT_DIR] [--max-new-tokens 64 --block-length 8
                                         --threshold 0.9 --device auto]

Without --model a tiny random Llama (tokenizer, weights and runtime) is built in a temporary folder:
its numbers show the runtime's overheads, not what a trained model achieves (a random model is rarely
confident, so diffusion commits about one token per pass and drafts are seldom accepted). Prompts are
decoded one at a time (batch 1); tokens/forward = generated tokens / forward passes.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import torch
import transformers

PROMPTS = ("the quick brown fox", "0 1 2 3 4 5", "reverse sort copy the lazy dog", "jumps over the")
TEXTS = ["the quick brown fox jumps over the lazy dog", "0 1 2 3 4 5 6 7 8 9 + - = reverse sort copy"] * 10


def build_tiny_export(folder: Path, hidden: int, layers: int, block_length: int) -> Path:
    """A random tiny Llama export with the ar2dlm runtime."""
    from ar2dlm.conversion.runtime_install import install_runtime
    from ar2dlm.model.hf_factory import make_hf_model, train_tokenizer

    tokenizer = train_tokenizer(TEXTS, vocab_size=300, extra_special_tokens=["<|fim_pad|>"])
    path = make_hf_model("LlamaForCausalLM", folder, vocab_size=len(tokenizer) + 4, tokenizer=tokenizer,
                         hidden_size=hidden, num_layers=layers, intermediate_size=4 * hidden)
    install_runtime(path, architecture="LlamaForCausalLM", block_size=block_length,
                    mask_token_id=tokenizer.convert_tokens_to_ids("<|fim_pad|>"))
    return path


def run_mode(model, mode: str, prompts: list[torch.Tensor], args: argparse.Namespace
             ) -> tuple[int, int, float]:
    """(generated tokens, forward passes, seconds) over all prompts, after one warm-up call."""
    from ar2dlm.generation.modes import decode

    def call(ids: torch.Tensor):
        return decode(model, mode, ids, args.max_new_tokens, block_length=args.block_length, threshold=args.threshold)

    call(prompts[0])
    tokens = forwards = 0
    seconds = 0.0
    for ids in prompts:
        if ids.device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        _, stats = call(ids)
        if ids.device.type == "cuda":
            torch.cuda.synchronize()
        seconds += time.perf_counter() - start
        tokens += stats.new_tokens[0]
        forwards += stats.nfe
    return tokens, forwards, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="an ar2dlm export (default: build a tiny random one)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--block-length", type=int, default=8)
    parser.add_argument("--threshold", type=float, default=0.9)
    parser.add_argument("--hidden", type=int, default=128, help="hidden size of the tiny model")
    parser.add_argument("--layers", type=int, default=4, help="layers of the tiny model")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    from ar2dlm.generation.loading import load_runtime_model

    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device)
    gpu = f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""
    print(f"machine: {platform.machine()} | {os.cpu_count()} CPUs | python {platform.python_version()} | "
          f"torch {torch.__version__} | transformers {transformers.__version__} | device {device}{gpu}")
    with tempfile.TemporaryDirectory() as tmp:
        path = args.model or build_tiny_export(Path(tmp) / "tiny", args.hidden, args.layers,
                                               args.block_length)
        tokenizer = transformers.AutoTokenizer.from_pretrained(path)
        dtype = torch.float32 if device.type == "cpu" else "auto"
        model = load_runtime_model(path, dtype=dtype).to(device).eval()  # this ar2dlm's runtime, as `generate` does
        prompts = [torch.tensor([tokenizer(p)["input_ids"]], device=device) for p in PROMPTS]
        print(f"settings: model {'tiny random Llama' if args.model is None else path} "
              f"({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params, "
              f"{model.config._attn_implementation}) | {len(prompts)} prompts, batch 1 | "
              f"max_new_tokens {args.max_new_tokens} | block_length {args.block_length} | "
              f"threshold {args.threshold} | greedy")
        results = {mode: run_mode(model, mode, prompts, args) for mode in ("ar", "diffusion", "self_spec", "quad_spec")}
    ar_tokens, ar_nfe, ar_seconds = results["ar"]
    print(f"{'mode':<10} {'tokens':>7} {'NFE':>6} {'tok/fwd':>8} {'tok/s':>9} "
          f"{'tok/fwd vs AR':>14} {'tok/s vs AR':>12}")
    for mode, (tokens, nfe, seconds) in results.items():
        per_forward, per_second = tokens / nfe, tokens / seconds
        print(f"{mode:<10} {tokens:>7} {nfe:>6} {per_forward:>8.2f} {per_second:>9.1f} "
              f"{per_forward / (ar_tokens / ar_nfe):>13.2f}x {per_second / (ar_tokens / ar_seconds):>11.2f}x")


if __name__ == "__main__":
    main()
