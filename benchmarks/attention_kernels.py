"""Time the block-diffusion attention kernels on the doubled sequence [x_t ; x_0].

    python benchmarks/attention_kernels.py [--heads 4 --head-dim 64 --block-size 32 --reps 3]

Reports, per L: sdpa with the dense 2L x 2L mask, the split kernel and flex (forward only where
backward is unavailable, i.e. on CPU), plain causal SDPA over L, and the ratios.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from ar2dlm.model.attention import block_diffusion_attention
from ar2dlm.model.masks import build_block_mask


def median_seconds(fn: Callable[[], None], reps: int, device: torch.device) -> float:
    """Median wall time of ``fn`` over ``reps`` runs after one warm-up run."""
    fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def make_step(
    kernel: str, qkv: tuple[torch.Tensor, ...], args: argparse.Namespace, seq_len: int, backward: bool
) -> Callable[[], None]:
    """One attention call (and backward when asked) with the given kernel."""

    def step() -> None:
        with torch.set_grad_enabled(backward):
            out = block_diffusion_attention(
                *qkv, layout="doubled_causal", block_size=args.block_size, seq_len=seq_len, kernel=kernel
            )
            if backward:
                out.sum().backward()

    return step


def causal_step(qkv: tuple[torch.Tensor, ...], backward: bool) -> Callable[[], None]:
    """Plain causal SDPA over the tensors (the AR-only cost)."""

    def step() -> None:
        with torch.set_grad_enabled(backward):
            out = F.scaled_dot_product_attention(*qkv, is_causal=True)
            if backward:
                out.sum().backward()

    return step


def bench_length(seq_len: int, args: argparse.Namespace, device: torch.device) -> None:
    shape = (args.batch, args.heads, 2 * seq_len, args.head_dim)
    dtype = getattr(torch, args.dtype)
    qkv = tuple(torch.randn(shape, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
    half = tuple(t.detach()[:, :, :seq_len].clone().requires_grad_() for t in qkv)
    flex_backward = device.type == "cuda"
    start = time.perf_counter()
    build_block_mask("doubled_causal", seq_len, args.block_size, device=device)
    mask_s = time.perf_counter() - start
    t = {
        "dense fwd": median_seconds(make_step("sdpa", qkv, args, seq_len, False), args.reps, device),
        "dense fwd+bwd": median_seconds(make_step("sdpa", qkv, args, seq_len, True), args.reps, device),
        "split fwd": median_seconds(make_step("split", qkv, args, seq_len, False), args.reps, device),
        "split fwd+bwd": median_seconds(make_step("split", qkv, args, seq_len, True), args.reps, device),
        "flex fwd": median_seconds(make_step("flex", qkv, args, seq_len, False), args.reps, device),
        "causal-L fwd+bwd": median_seconds(causal_step(half, True), args.reps, device),
    }
    if flex_backward:
        t["flex fwd+bwd"] = median_seconds(make_step("flex", qkv, args, seq_len, True), args.reps, device)
    print(f"\nL={seq_len} (attention sequence 2L={2 * seq_len}); BlockMask build {mask_s * 1e3:.1f} ms")
    for name, seconds in t.items():
        print(f"  {name:<18} {seconds * 1e3:10.2f} ms")
    flex_key, dense_key = ("flex fwd+bwd", "dense fwd+bwd") if flex_backward else ("flex fwd", "dense fwd")
    label = "fwd+bwd" if flex_backward else "forward only"
    print(f"  flex/dense ({label}):          {t[flex_key] / t[dense_key]:.2f}")
    print(f"  split/dense (fwd+bwd):              {t['split fwd+bwd'] / t['dense fwd+bwd']:.2f}")
    print(f"  split/dense (forward only):         {t['split fwd'] / t['dense fwd']:.2f}")
    print(f"  dense-2L joint / causal-L (fwd+bwd): {t['dense fwd+bwd'] / t['causal-L fwd+bwd']:.2f}")
    print(f"  split joint / causal-L (fwd+bwd):    {t['split fwd+bwd'] / t['causal-L fwd+bwd']:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 2048])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--block-size", type=int, default=32)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    print(f"platform: {platform.platform()} | python {platform.python_version()} | {platform.processor()}")
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "none"
    print(f"torch {torch.__version__} | threads {torch.get_num_threads()} | device {device} ({gpu})")
    print(
        f"settings: batch={args.batch} heads={args.heads} head_dim={args.head_dim} block_size={args.block_size} "
        f"dtype={args.dtype} reps={args.reps} (median) layout=doubled_causal"
    )
    if device.type == "cpu":
        print("note: flex runs eagerly on CPU (forward only; torch has no CPU FlexAttention backward)")
    for seq_len in args.lengths:
        bench_length(seq_len, args, device)


if __name__ == "__main__":
    main()
