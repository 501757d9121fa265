"""Peak memory of `ar2dlm convert` relative to the checkpoint size (issue: stay near one copy).

Makes a random Llama checkpoint of about --gigabytes GB (fp32) in a temporary folder, converts it with
the real CLI in a subprocess, and samples the resident memory of that process and its children.
"""

from __future__ import annotations

import argparse
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil


def _make_source(path: Path, gigabytes: float) -> None:
    from ar2dlm.model.hf_factory import make_hf_model, train_tokenizer

    hidden, ffn, vocab = 1024, 2816, 32000
    per_layer = 4 * hidden * hidden + 3 * hidden * ffn
    layers = max(1, round((gigabytes * 1e9 / 4 - 2 * vocab * hidden) / per_layer))
    tokenizer = train_tokenizer(["benchmark text " * 50], vocab_size=300, extra_special_tokens=["<|fim_pad|>"])
    make_hf_model("LlamaForCausalLM", path, vocab_size=vocab, hidden_size=hidden, num_layers=layers,
                  num_attention_heads=16, num_key_value_heads=16, intermediate_size=ffn, tokenizer=tokenizer)


def _anonymous_bytes(pid: int) -> int:
    """Anonymous (heap) memory of a process: what it allocated, without file pages it merely mapped."""
    with open(f"/proc/{pid}/smaps_rollup") as handle:
        return sum(int(line.split()[1]) * 1024 for line in handle if line.startswith("Anonymous:"))


def _sample_peak(process: psutil.Process, stop: threading.Event, peak: list[int]) -> None:
    while not stop.is_set():
        try:
            children = process.children(recursive=True)  # forked writers share the parent's pages: count their USS
            peak[1] = max(peak[1], _anonymous_bytes(process.pid) + sum(c.memory_full_info().uss for c in children))
            # PSS splits pages shared between the process and its forked checkpoint writers, so the
            # sum is the real footprint (RSS would count copy-on-write pages once per process)
            processes = [process, *process.children(recursive=True)]
            total = sum(p.memory_full_info().pss for p in processes)
            peak[0] = max(peak[0], total)
        except (psutil.Error, OSError):
            pass
        time.sleep(0.1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--gigabytes", type=float, default=1.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        source, output = Path(tmp) / "source", Path(tmp) / "converted"
        subprocess.run([sys.executable, "-c", f"from benchmarks.conversion_memory import _make_source; "
                        f"from pathlib import Path; _make_source(Path({str(source)!r}), {args.gigabytes})"],
                       check=True, cwd=Path(__file__).resolve().parents[1])
        size = sum(f.stat().st_size for f in source.glob("*.safetensors"))
        started = time.perf_counter()
        child = subprocess.Popen([sys.executable, "-m", "ar2dlm.cli", "convert", f"source={source}",
                                  f"output={output}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        peak, stop = [0, 0], threading.Event()
        sampler = threading.Thread(target=_sample_peak, args=(psutil.Process(child.pid), stop, peak))
        sampler.start()
        code = child.wait()
        stop.set()
        sampler.join()
        elapsed = time.perf_counter() - started
    print(f"machine: {platform.platform()} | python {platform.python_version()} | cpus {psutil.cpu_count()}")
    print(f"settings: random LlamaForCausalLM fp32 checkpoint, {size / 1e9:.2f} GB safetensors, one shard")
    print(f"convert exit code {code}, wall {elapsed:.1f}s")
    print(f"peak PSS (process + children) {peak[0] / 1e9:.2f} GB = {peak[0] / size:.2f}x the checkpoint size")
    print(f"peak anonymous memory of the process + private memory of its writers (no mmap'd file pages) "
          f"{peak[1] / 1e9:.2f} GB = "
          f"{peak[1] / size:.2f}x the checkpoint size")


if __name__ == "__main__":
    main()
