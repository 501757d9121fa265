"""Peak memory of `ar2dlm convert` beyond the imported libraries, relative to the checkpoint size (issue 19: <= 1.3x).

Makes a random Llama checkpoint of about --gigabytes GB (fp32) and a tiny one in a temporary folder, converts
each with the real CLI in a subprocess and samples the memory of that process and its children. The tiny
conversion's peak is what the imported libraries (torch, megatron, transformers) take; the ratio is
(peak of the large conversion - peak of the tiny one) / the large checkpoint's bytes.
"""

from __future__ import annotations

import argparse
import platform
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]


def _make_source(path: Path, gigabytes: float) -> None:
    from ar2dlm.model.hf_factory import make_hf_model, train_tokenizer

    tokenizer = train_tokenizer(["benchmark text " * 50], vocab_size=300, extra_special_tokens=["<|fim_pad|>"])
    if gigabytes <= 0:  # the libraries-only reference: a model of a few hundred kB
        make_hf_model("LlamaForCausalLM", path, vocab_size=len(tokenizer), num_layers=1, tokenizer=tokenizer)
        return
    hidden, ffn, vocab = 1024, 2816, 32000
    per_layer = 4 * hidden * hidden + 3 * hidden * ffn
    layers = max(1, round((gigabytes * 1e9 / 4 - 2 * vocab * hidden) / per_layer))
    make_hf_model("LlamaForCausalLM", path, vocab_size=vocab, hidden_size=hidden, num_layers=layers,
                  num_attention_heads=16, num_key_value_heads=16, intermediate_size=ffn, tokenizer=tokenizer)


def _anonymous_bytes(pid: int) -> int:
    """Anonymous (heap) memory of a process: what it allocated, without file pages it merely mapped."""
    with open(f"/proc/{pid}/smaps_rollup") as handle:
        return sum(int(line.split()[1]) * 1024 for line in handle if line.startswith("Anonymous:"))


@dataclass
class Peak:
    pss: int = 0  # process + children; PSS splits pages a forked child shares with its parent
    anonymous: int = 0  # anonymous memory of the process + private memory of its children (no mapped files)


def _sample_peak(process: psutil.Process, stop: threading.Event, peak: Peak) -> None:
    while not stop.is_set():
        try:
            children = process.children(recursive=True)
            peak.anonymous = max(peak.anonymous, _anonymous_bytes(process.pid)
                                 + sum(child.memory_full_info().uss for child in children))
            peak.pss = max(peak.pss, sum(p.memory_full_info().pss for p in [process, *children]))
        except (psutil.Error, OSError):
            pass
        time.sleep(0.05)


def _checkpoint(folder: Path, gigabytes: float) -> int:
    subprocess.run([sys.executable, "-c", f"from benchmarks.conversion_memory import _make_source; "
                    f"from pathlib import Path; _make_source(Path({str(folder)!r}), {gigabytes})"],
                   check=True, cwd=ROOT)
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def _convert_peak(source: Path, output: Path) -> tuple[Peak, float]:
    started = time.perf_counter()
    child = subprocess.Popen([sys.executable, "-m", "ar2dlm.cli", "convert", f"source={source}", f"output={output}"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=ROOT)
    peak, stop = Peak(), threading.Event()
    sampler = threading.Thread(target=_sample_peak, args=(psutil.Process(child.pid), stop, peak))
    sampler.start()
    _, errors = child.communicate()
    stop.set()
    sampler.join()
    if child.returncode != 0:
        sys.exit(f"convert {source} failed ({child.returncode}):\n{errors.decode()[-3000:]}")
    return peak, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--gigabytes", type=float, default=1.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        size = _checkpoint(folder / "source", args.gigabytes)
        tiny_size = _checkpoint(folder / "tiny", 0)
        libraries, _ = _convert_peak(folder / "tiny", folder / "tiny-converted")
        peak, elapsed = _convert_peak(folder / "source", folder / "converted")
    print(f"machine: {platform.platform()} | python {platform.python_version()} | cpus {psutil.cpu_count()}")
    print(f"settings: random LlamaForCausalLM fp32 checkpoint, {size / 1e9:.2f} GB safetensors, one shard; "
          f"libraries measured on a {tiny_size / 1e6:.2f} MB one-layer checkpoint")
    print(f"convert wall {elapsed:.1f}s")
    for label, large, small in (("PSS (process + children)", peak.pss, libraries.pss),
                                ("anonymous memory (process + private memory of children)",
                                 peak.anonymous, libraries.anonymous)):
        print(f"peak {label}: {large / 1e9:.2f} GB = {large / size:.2f}x the checkpoint; libraries "
              f"{small / 1e9:.2f} GB; beyond them {(large - small) / 1e9:.2f} GB")
    print(f"ratio (peak PSS beyond the imported libraries / checkpoint bytes): {(peak.pss - libraries.pss) / size:.2f}"
          f" (target <= 1.3)")


if __name__ == "__main__":
    main()
