"""Joint AR+diffusion training step vs plain AR step: same model, same data tokens, one process.

docs/design.md §8.1 target: joint / AR <= 2.1 (the joint step runs the doubled [x_t ; x_0] sequence).
Prints the machine, the settings, median step times and the ratio for each attention kernel, and
for reference, a plain causal AR step over 2L tokens (as many tokens as the doubled sequence).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch


def step_seconds(model, prepared, settings) -> float:
    """Wall time of one forward + backward of the objective ``settings`` on a prepared micro-batch."""
    from ar2dlm.training.forward import forward_loss

    started = time.perf_counter()
    model.zero_grad(set_to_none=True)
    forward_loss(model, prepared, settings).loss_sum.backward()
    return time.perf_counter() - started


def machine_line() -> str:
    return (f"machine: {platform.platform()} | python {platform.python_version()} | torch {torch.__version__} | "
            f"threads {torch.get_num_threads()}")


def converted_qwen3(folder: Path, hidden: int, layers: int) -> tuple[Path, int]:
    """(a random Qwen3 of ``hidden`` / ``layers`` converted into ``folder``/converted, its vocabulary size)."""
    from ar2dlm.conversion.convert import convert
    from ar2dlm.model.hf_factory import make_hf_model, train_tokenizer

    tokenizer = train_tokenizer(["benchmark text " * 20], 300, extra_special_tokens=["<|fim_pad|>"])
    source = make_hf_model("Qwen3ForCausalLM", folder / "src", vocab_size=len(tokenizer), tokenizer=tokenizer,
                           hidden_size=hidden, num_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                           intermediate_size=3 * hidden)
    convert(source, folder / "converted")
    return folder / "converted", len(tokenizer)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--lengths", type=int, nargs="+", default=[512])
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()

    from ar2dlm.data.loader import Batch
    from ar2dlm.distributed import ParallelLayout, init_distributed
    from ar2dlm.model.checkpoint import load_model
    from ar2dlm.training.forward import ObjectiveSettings, prepare_batch
    from ar2dlm.training.loss import objective_weights
    from ar2dlm.training.noise import NoiseConfig

    init_distributed(ParallelLayout())
    print(machine_line())
    print(f"settings: Qwen3 hidden {args.hidden}, {args.layers} layers, batch {args.batch}, block {args.block_size}, "
          f"fp32, forward+backward, median of {args.reps}")
    with tempfile.TemporaryDirectory() as tmp:
        converted, vocab = converted_qwen3(Path(tmp), args.hidden, args.layers)
        chunks, metadata, _ = load_model(converted, seq_length=2 * max(args.lengths))
        model = chunks[0].train()
        for length in args.lengths:
            ids = torch.randint(0, vocab, (args.batch, length), generator=torch.Generator().manual_seed(0))
            batch = Batch(ids, torch.ones_like(ids, dtype=torch.bool), None, torch.arange(args.batch))
            noise = NoiseConfig(mask_token_id=metadata.mask_token_id, block_size=args.block_size)
            runs = {
                name: ObjectiveSettings(objective_weights(objective), noise, "causal", kernel, seed=0, pad_id=0)
                for name, objective, kernel in (("ar", "ar", "sdpa"), ("joint-sdpa", "joint", "sdpa"),
                                                ("joint-split", "joint", "split"))
            }
            prepared = {name: prepare_batch(batch, 1, settings) for name, settings in runs.items()}
            doubled_ids = ids.repeat(1, 2)  # a plain AR step over as many tokens as [x_t ; x_0]
            doubled = Batch(doubled_ids, torch.ones_like(doubled_ids, dtype=torch.bool), None, batch.sample_index)
            runs["ar-2L"], prepared["ar-2L"] = runs["ar"], prepare_batch(doubled, 1, runs["ar"])
            times: dict[str, list[float]] = {name: [] for name in runs}
            for rep in range(args.reps + 1):  # interleaved, so load changes hit every variant alike
                for name, settings in runs.items():
                    seconds = step_seconds(model, prepared[name], settings)
                    if rep:
                        times[name].append(seconds)
            medians = {name: statistics.median(values) for name, values in times.items()}
            print(f"L={length}: AR step {medians['ar'] * 1e3:.1f} ms")
            for name in ("joint-sdpa", "joint-split"):
                print(f"  {name:11s} step {medians[name] * 1e3:.1f} ms   joint / AR = {medians[name] / medians['ar']:.2f}")
            print(f"  reference: causal AR step over 2L tokens {medians['ar-2L'] * 1e3:.1f} ms   "
                  f"/ AR = {medians['ar-2L'] / medians['ar']:.2f}")


if __name__ == "__main__":
    main()
