"""Fixtures of the data tests: a tiny tokenizer and small source files made in tmp_path."""

from __future__ import annotations

import json

import pytest
from omegaconf import OmegaConf

from ar2dlm.config.schema import DataConfig, DataSourceConfig

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda user assistant system what".split()


@pytest.fixture(scope="session")
def tokenizer():
    """A byte-level BPE tokenizer without a chat template (EOS <|eos|>, pad <|pad|>)."""
    from ar2dlm.model.hf_factory import train_tokenizer

    texts = [" ".join(WORDS)] * 20 + [f"doc {i} number {i}" for i in range(100)]
    return train_tokenizer(texts, vocab_size=400)


@pytest.fixture
def write_jsonl(tmp_path):
    """Factory: write records (dicts) as JSON lines to tmp_path/name; returns the path."""

    def write(name: str, records: list[dict]):
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
        return path

    return write


@pytest.fixture
def data_cfg():
    """Factory: a DataConfig DictConfig; ``sources`` are dicts of DataSourceConfig fields."""

    def make(sources: list[dict], **fields):
        return OmegaConf.structured(DataConfig(sources=[DataSourceConfig(**s) for s in sources], **fields))

    return make


@pytest.fixture
def numbered_docs():
    """Factory: documents ``{prefix} {i} number {i} ...`` of varied lengths, each naming its index."""

    def make(count: int, prefix: str = "doc") -> list[dict]:
        return [{"text": f"{prefix} {i} number {i}" + " alpha beta" * (i % 5)} for i in range(count)]

    return make
