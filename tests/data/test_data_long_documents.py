"""Oversized documents: texts are tokenised in pieces of at most data.max_document_chars characters, so one
huge line cannot exhaust the memory; a chat that long is refused with its file:line."""

import random

import numpy as np
import pytest

from ar2dlm.config.compose import ConfigError, compose_stage
from ar2dlm.config.schema import DataSourceConfig
from ar2dlm.data.indexed import load_indexed
from ar2dlm.data.loader import build_datasets
from ar2dlm.data.prepare import prepare
from ar2dlm.data.tokenize import split_text
from ar2dlm.errors import UserError

MAX_CHARS = 64
WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda".split()


class RecordingTokenizer:
    """The tokenizer, recording the texts of every call."""

    def __init__(self, tokenizer):
        self.inner = tokenizer
        self.calls: list[list[str]] = []

    def __call__(self, texts, **kwargs):
        self.calls.append([texts] if isinstance(texts, str) else list(texts))
        return self.inner(texts, **kwargs)

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __len__(self):
        return len(self.inner)


def _long_text(characters: int) -> str:
    rng = random.Random(0)
    return " ".join(rng.choice(WORDS) for _ in range(characters // 4))[:characters].strip()


def _ids(tokenizer, text: str, special: bool) -> list[int]:
    return tokenizer(text, add_special_tokens=special)["input_ids"]


def test_split_text_cuts_before_whitespace_and_hard_without_any():
    text = _long_text(1000)
    pieces = list(split_text(text, MAX_CHARS))
    assert "".join(pieces) == text
    assert max(map(len, pieces)) <= MAX_CHARS and len(pieces) >= 1000 // MAX_CHARS
    assert all(piece[0] == " " for piece in pieces[1:])
    assert list(split_text("x" * 150, MAX_CHARS)) == ["x" * 64, "x" * 64, "x" * 22]
    assert list(split_text("short", MAX_CHARS)) == ["short"]


def test_long_document_is_tokenised_in_bounded_pieces(tokenizer, write_jsonl, data_cfg):
    long_text = _long_text(2000)
    path = write_jsonl("corpus.jsonl", [{"text": "alpha beta"}, {"text": long_text}, {"text": "gamma"}])
    recording = RecordingTokenizer(tokenizer)
    train, _ = build_datasets(data_cfg([{"path": str(path)}], seq_length=16, pack=False,
                                       max_document_chars=MAX_CHARS),
                              recording, seq_length=16, block_size=4, seed=0)

    assert max(len(text) for call in recording.calls for text in call) <= MAX_CHARS
    assert max(sum(map(len, call)) for call in recording.calls) <= MAX_CHARS  # per tokenizer call, too
    pieces = list(split_text(long_text, MAX_CHARS))
    expected = _ids(tokenizer, pieces[0], True) + [t for p in pieces[1:] for t in _ids(tokenizer, p, False)]
    expected.append(tokenizer.eos_token_id)
    assert expected == _ids(tokenizer, long_text, True) + [tokenizer.eos_token_id]  # cut where the words are
    store = train.sources[0].store
    documents = [store.tokens[s:e].tolist() for s, e in zip(store.starts, store.ends, strict=True)]
    assert expected in documents and len(documents) == 3
    assert sum(1 for t in expected if t == tokenizer.eos_token_id) == 1


def test_data_prepare_bounds_its_tokenizer_calls(tokenizer, write_jsonl, tmp_path):
    long_text = _long_text(1000)
    path = write_jsonl("corpus.jsonl", [{"text": long_text}])
    recording = RecordingTokenizer(tokenizer)
    prepare(DataSourceConfig(path=str(path)), recording, str(tmp_path / "out" / "c"),
            max_document_chars=MAX_CHARS)
    assert max(len(text) for call in recording.calls for text in call) <= MAX_CHARS
    store = load_indexed(str(tmp_path / "out" / "c"), tokenizer)
    assert np.array_equal(store.tokens[store.starts[0]:store.ends[0]],
                          _ids(tokenizer, long_text, True) + [tokenizer.eos_token_id])


def test_oversized_chat_is_refused_with_its_line(tokenizer, write_jsonl, data_cfg):
    short = [{"role": "user", "content": "what"}, {"role": "assistant", "content": "alpha"}]
    long = [{"role": "user", "content": "what"}, {"role": "assistant", "content": _long_text(500)}]
    path = write_jsonl("chat.jsonl", [{"messages": short}, {"messages": long}])
    with pytest.raises(UserError, match=r"chat.jsonl:2: the conversation has 50\d characters, more than "
                                        r"data.max_document_chars=64") as error:
        build_datasets(data_cfg([{"path": str(path)}], sft=True, seq_length=64, max_document_chars=MAX_CHARS),
                       tokenizer, seq_length=64, block_size=4, seed=0)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("stage, key", [("train", "data.max_document_chars"),
                                        ("data_prepare", "max_document_chars")])
def test_max_document_chars_must_be_positive(stage, key):
    required = {"train": ["init=a", "output=b"], "data_prepare": ["source.path=a", "tokenizer=t", "output=o"]}
    with pytest.raises(ConfigError, match=f"{key}=0 must be >= 1"):
        compose_stage(stage, required[stage] + [f"{key}=0"])
