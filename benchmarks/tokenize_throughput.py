"""Tokens per second of the data pipeline's batched tokenisation on CPU, for a generated corpus.

    python benchmarks/tokenize_throughput.py [--documents 10000 --words 200 --vocab 4096 --batch-size 1000]

Reports: one tokenizer call per document (the naive baseline), batched calls (what ar2dlm does), and
`ar2dlm data prepare`'s whole path (read JSONL, tokenise, write a Megatron .bin/.idx).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

from ar2dlm.data.indexed import _megatron_indexed
from ar2dlm.data.prepare import prepare
from ar2dlm.data.tokenize import encode_texts
from ar2dlm.model.hf_factory import train_tokenizer


def corpus(documents: int, words: int, seed: int = 0) -> list[str]:
    """Documents of random pseudo-words, lengths uniform in [words/2, 3*words/2]."""
    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    lexicon = ["".join(rng.choice(letters, size=rng.integers(2, 9))) for _ in range(5000)]
    zipf = 1.0 / np.arange(1, len(lexicon) + 1)
    picks = rng.choice(len(lexicon), size=documents * words * 2, p=zipf / zipf.sum())
    lengths, out, at = rng.integers(words // 2, 3 * words // 2 + 1, size=documents), [], 0
    for length in lengths:
        out.append(" ".join(lexicon[i] for i in picks[at:at + length]) + ".")
        at += length
    return out


def rate(tokens: int, seconds: float) -> str:
    return f"{tokens / seconds:>12,.0f} tokens/s  ({tokens:,} tokens in {seconds:.2f}s)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--documents", type=int, default=10000)
    parser.add_argument("--words", type=int, default=200)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--batch-size", type=int, default=1000)
    args = parser.parse_args()

    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs (load average {os.getloadavg()[0]:.1f}), "
          f"python {platform.python_version()}, TOKENIZERS_PARALLELISM="
          f"{os.environ.get('TOKENIZERS_PARALLELISM', 'unset')}")
    texts = corpus(args.documents, args.words)
    start = time.perf_counter()
    tokenizer = train_tokenizer(texts[:2000], vocab_size=args.vocab)
    megabytes = sum(map(len, texts)) / 1e6
    print(f"settings: {args.documents} documents of ~{args.words} words ({megabytes:.1f} MB), "
          f"byte-level BPE vocabulary {len(tokenizer)} (trained in {time.perf_counter() - start:.1f}s), "
          f"batch size {args.batch_size}")

    sample = texts[: max(1, len(texts) // 10)]
    start = time.perf_counter()
    tokens = sum(len(tokenizer(text)["input_ids"]) + 1 for text in sample)
    print(f"one call per document (1/10 of the corpus): {rate(tokens, time.perf_counter() - start)}")

    start = time.perf_counter()
    tokens = sum(int(encode_texts(tokenizer, texts[i:i + args.batch_size]).lengths.sum())
                 for i in range(0, len(texts), args.batch_size))
    print(f"batched (encode_texts):                     {rate(tokens, time.perf_counter() - start)}")

    start = time.perf_counter()
    _megatron_indexed()  # a one-off import (megatron-core), kept out of the timing below
    print(f"(importing megatron-core's indexed_dataset took {time.perf_counter() - start:.1f}s once)")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "corpus.jsonl"
        path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
        from omegaconf import OmegaConf

        from ar2dlm.config.schema import DataSourceConfig

        source = OmegaConf.structured(DataSourceConfig(path=str(path)))
        result = prepare(source, tokenizer, str(Path(tmp) / "out"), batch_size=args.batch_size)
        print(f"data prepare (JSONL -> .bin/.idx):          {rate(result.tokens, result.seconds)}")


if __name__ == "__main__":
    main()
