"""Joint AR+diffusion training step vs plain AR step: same model, same data tokens, one process.

DESIGN.md target: joint / AR <= 2.1 (the joint step runs the doubled [x_t ; x_0] sequence).
Prints the machine, the settings, median step times and the ratio for each attention kernel.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch


def _median_step_seconds(model, prepared, settings, reps: int) -> float:
    from ar2dlm.training.forward import forward_loss

    times = []
    for index in range(reps + 1):
        started = time.perf_counter()
        model.zero_grad(set_to_none=True)
        parts = forward_loss(model, prepared, settings)
        parts.loss_sum.backward()
        if index:  # the first repetition warms up
            times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--lengths", type=int, nargs="+", default=[512])
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()

    from ar2dlm.conversion.convert import convert
    from ar2dlm.data.loader import Batch
    from ar2dlm.distributed import ParallelLayout, init_distributed
    from ar2dlm.model.checkpoint import load_model
    from ar2dlm.model.hf_factory import make_hf_model, train_tokenizer
    from ar2dlm.training.forward import ObjectiveSettings, prepare_batch
    from ar2dlm.training.loss import objective_weights
    from ar2dlm.training.noise import NoiseConfig

    init_distributed(ParallelLayout())
    print(f"machine: {platform.platform()} | python {platform.python_version()} | torch {torch.__version__} | "
          f"threads {torch.get_num_threads()}")
    print(f"settings: Qwen3 hidden {args.hidden}, {args.layers} layers, batch {args.batch}, block {args.block_size}, "
          f"fp32, forward+backward, median of {args.reps}")
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = train_tokenizer(["benchmark text " * 20], 300, extra_special_tokens=["<|fim_pad|>"])
        source = make_hf_model("Qwen3ForCausalLM", Path(tmp) / "src", vocab_size=len(tokenizer), tokenizer=tokenizer,
                               hidden_size=args.hidden, num_layers=args.layers, num_attention_heads=4,
                               num_key_value_heads=2, intermediate_size=3 * args.hidden)
        convert(source, Path(tmp) / "converted")
        chunks, metadata, _ = load_model(Path(tmp) / "converted", seq_length=max(args.lengths))
        model = chunks[0].train()
        for length in args.lengths:
            ids = torch.randint(0, len(tokenizer), (args.batch, length), generator=torch.Generator().manual_seed(0))
            batch = Batch(ids, torch.ones_like(ids, dtype=torch.bool), None, torch.arange(args.batch))
            noise = NoiseConfig(mask_token_id=metadata.mask_token_id, block_size=args.block_size)

            def settings(objective: str, kernel: str) -> ObjectiveSettings:
                return ObjectiveSettings(objective_weights(objective), noise, "causal", kernel, seed=0, pad_id=0)

            ar_settings = settings("ar", "sdpa")
            ar = _median_step_seconds(model, prepare_batch(batch, 1, ar_settings), ar_settings, args.reps)
            print(f"L={length}: AR step {ar * 1e3:.1f} ms")
            for kernel in ("sdpa", "split"):
                joint_settings = settings("joint", kernel)
                joint = _median_step_seconds(model, prepare_batch(batch, 1, joint_settings), joint_settings, args.reps)
                print(f"  joint step ({kernel:5s} kernel) {joint * 1e3:.1f} ms   joint / AR = {joint / ar:.2f}")


if __name__ == "__main__":
    main()
