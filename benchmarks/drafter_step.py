"""Drafter training step: the split forward against the single doubled forward it replaces, and against a joint step.

Same model, same micro-batch, one process (docs/design.md §4.7). The rows pack documents of a prompt (not scored,
as the demo's prompt / answer pairs) and an answer; the drafter's split forward skips the draft blocks that hold
no answer position. Prints the machine, the settings, median step times (forward + backward) and the ratios.

    python -m benchmarks.drafter_step
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import torch

from benchmarks.train_step_ratio import converted_qwen3, machine_line, step_seconds


def packed_batch(batch: int, length: int, document: int, prompt: int, vocab: int):
    """Rows of ``length`` tokens packing documents of ``document`` tokens whose first ``prompt`` are a prompt."""
    from ar2dlm.data.loader import Batch

    ids = torch.randint(1, vocab, (batch, length), generator=torch.Generator().manual_seed(0))
    position = torch.arange(length)
    documents = (position // document).expand(batch, length).contiguous()
    loss_mask = (position % document >= prompt).expand(batch, length).contiguous()
    return Batch(ids, loss_mask, documents, torch.arange(batch))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--document", type=int, default=44, help="tokens per packed document (the demo's mean)")
    parser.add_argument("--prompt", type=int, default=22, help="of which the prompt (not scored)")
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--reps", type=int, default=20)
    args = parser.parse_args()

    from ar2dlm.distributed import ParallelLayout, init_distributed
    from ar2dlm.model.checkpoint import load_model
    from ar2dlm.model.draft_pass import use_split_forward
    from ar2dlm.model.lora import LoraSettings, add_lora, set_adapter_mode
    from ar2dlm.training.drafter import DrafterLossConfig
    from ar2dlm.training.forward import ObjectiveSettings, forward_loss, prepare_batch
    from ar2dlm.training.loss import objective_weights
    from ar2dlm.training.noise import NoiseConfig

    init_distributed(ParallelLayout())
    print(machine_line())
    print(f"settings: Qwen3 hidden {args.hidden}, {args.layers} layers, batch {args.batch} x {args.length}, "
          f"documents of {args.document} tokens ({args.prompt} prompt), block {args.block_size}, LoRA rank "
          f"{args.rank} on linear_proj / fc1 / fc2, fp32, forward+backward, median of {args.reps}")
    with tempfile.TemporaryDirectory() as tmp:
        converted, vocab = converted_qwen3(Path(tmp), args.hidden, args.layers)

        def model(drafter: str | None):
            chunks, metadata, _ = load_model(converted, seq_length=2 * args.length)
            if drafter is not None:
                add_lora(chunks, LoraSettings(rank=args.rank, alpha=2.0 * args.rank,
                                              target_modules=("linear_proj", "linear_fc1", "linear_fc2")))
                set_adapter_mode(chunks, "noisy_stream" if drafter == "doubled" else "on")
                if drafter == "split":
                    use_split_forward(chunks)
            return chunks[0].train(), metadata

        models = {name: model(drafter) for name, drafter in (("doubled", "doubled"), ("split", "split"),
                                                              ("joint", None))}
        metadata = models["joint"][1]
        noise = NoiseConfig(mask_token_id=metadata.mask_token_id, block_size=args.block_size)
        # aligned blocks: the doubled forward's masks know no phase, and both forwards must compute the same loss
        loss = DrafterLossConfig(temperature=1.0, ce_target="verifier", length_weighting=True,
                                 random_block_start=False)
        settings = {"doubled": ObjectiveSettings(objective_weights("drafter"), noise, "causal", "auto", seed=0,
                                                 pad_id=0, drafter=loss)}
        settings["split"] = settings["doubled"]
        settings["joint"] = ObjectiveSettings(objective_weights("joint"), noise, "causal", "auto", seed=0, pad_id=0)
        batch = packed_batch(args.batch, args.length, args.document, args.prompt, vocab)
        prepared = {name: prepare_batch(batch, 1, settings[name]) for name in models}
        plan = prepared["split"].layout.draft_plan
        with torch.no_grad():
            same = [float(forward_loss(models[name][0], prepared[name], settings[name]).loss()) for name in
                    ("doubled", "split")]
        print(f"the split forward's draft pass: {plan.index.shape[1]} of {args.length} positions per row; drafter "
              f"loss doubled {same[0]:.6f}, split {same[1]:.6f}")
        times: dict[str, list[float]] = {name: [] for name in models}
        for rep in range(args.reps + 1):  # interleaved, so load changes hit every variant alike
            for name, (module, _) in models.items():
                seconds = step_seconds(module, prepared[name], settings[name])
                if rep:
                    times[name].append(seconds)
        medians = {name: statistics.median(values) for name, values in times.items()}
        for name in models:
            print(f"  {name:8s} step {medians[name] * 1e3:.1f} ms")
        print(f"split / doubled = {medians['split'] / medians['doubled']:.2f}   "
              f"doubled / joint = {medians['doubled'] / medians['joint']:.2f}   "
              f"split / joint = {medians['split'] / medians['joint']:.2f}")


if __name__ == "__main__":
    main()
