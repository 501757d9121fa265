"""Prompt / completion records (``prompt_field`` of a source): the prompt in context, the loss on the completion."""

import numpy as np
import pytest
from omegaconf import OmegaConf

from ar2dlm.config.schema import DataSourceConfig
from ar2dlm.data.build import check_sources
from ar2dlm.data.loader import TrainDataLoader, build_datasets
from ar2dlm.data.prepare import prepare
from ar2dlm.data.sources import ReadStats, Record, iter_records
from ar2dlm.data.tokenize import encode_prompted
from ar2dlm.errors import UserError

PAIRS = [{"prompt": f"doc {i} number", "answer": f" {i}" + " alpha" * (i % 3), "text": "unused"} for i in range(12)]


def _ids(tokenizer, text, special):
    return tokenizer(text, add_special_tokens=special)["input_ids"]


def test_a_pair_is_its_prompt_out_of_the_loss_then_its_completion_and_eos_in_it(tokenizer):
    records = [Record(("doc 1 number", " 1 alpha"), "a:1"), Record(("", " 2"), "a:2")]
    batch = encode_prompted(tokenizer, records)
    eos = tokenizer.eos_token_id
    first = _ids(tokenizer, "doc 1 number", True) + _ids(tokenizer, " 1 alpha", False) + [eos]
    second = _ids(tokenizer, "", True) + _ids(tokenizer, " 2", False) + [eos]
    assert batch.tokens.tolist() == first + second
    assert batch.lengths.tolist() == [len(first), len(second)]
    prompt = len(_ids(tokenizer, "doc 1 number", True))
    expected = [False] * prompt + [True] * (len(first) - prompt) + [True] * len(second)
    assert batch.loss_mask.tolist() == expected


def test_a_pair_longer_than_max_document_chars_is_refused(tokenizer):
    with pytest.raises(UserError, match=r"a\.jsonl:3: the prompt and completion have 12 characters"):
        encode_prompted(tokenizer, [Record(("abcdef", "ghijkl"), "a.jsonl:3")], max_chars=10)


@pytest.mark.parametrize("fill", [False, True])
def test_packed_rows_train_on_the_completions_only(tokenizer, write_jsonl, data_cfg, fill):
    path = write_jsonl("pairs.jsonl", PAIRS)
    cfg = data_cfg([{"path": str(path), "text_field": "answer", "prompt_field": "prompt"}], seq_length=32,
                   eos_fill_to_block=fill)
    train, _ = build_datasets(cfg, tokenizer, seq_length=32, block_size=8, seed=0)
    rows = [train[i] for i in range(len(train))]
    eos = tokenizer.eos_token_id
    seen = 0
    for row in rows:
        for doc in np.unique(row.document_ids[row.input_ids != tokenizer.pad_token_id]):
            positions = np.flatnonzero(row.document_ids == doc)
            if positions[0] == 0 or positions[-1] == 31:
                continue  # a document cut by a row's edge
            tokens, mask = row.input_ids[positions], row.loss_mask[positions]
            index = int(tokenizer.decode(tokens[:2]).split()[1])  # "doc {i}"
            prompt = _ids(tokenizer, PAIRS[index]["prompt"], True)
            answer = _ids(tokenizer, PAIRS[index]["answer"], False)
            assert tokens[:len(prompt)].tolist() == prompt and not mask[:len(prompt)].any()
            rest = len(positions) - len(prompt)
            assert tokens[len(prompt):len(prompt) + len(answer)].tolist() == answer
            assert (tokens[len(prompt) + len(answer):] == eos).all() and mask[len(prompt):].all()
            assert rest == len(answer) + 1 if not fill else len(positions) % 8 == 0 and rest >= len(answer) + 1
            seen += 1
    assert seen >= 3


def test_training_batches_never_score_a_prompt(tokenizer, write_jsonl, data_cfg):
    path = write_jsonl("pairs.jsonl", PAIRS)
    cfg = data_cfg([{"path": str(path), "text_field": "answer", "prompt_field": "prompt"}], seq_length=16)
    train, _ = build_datasets(cfg, tokenizer, seq_length=16, block_size=4, seed=0)
    batch = TrainDataLoader(train, global_batch_size=4, micro_batch_size=4, dp_rank=0, dp_size=1,
                            seed=0).next_step()[0]
    doc_token = _ids(tokenizer, "doc", True)[-1]
    assert (batch.input_ids == doc_token).any() and not batch.loss_mask[batch.input_ids == doc_token].any()
    assert batch.loss_mask.any()


def test_parquet_pairs_read_both_columns(tmp_path, tokenizer):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "pairs.parquet"
    pq.write_table(pa.table({"question": ["q1", "q2"], "reply": [" a1", " a2"]}), path)
    source = OmegaConf.structured(DataSourceConfig(path=str(path), text_field="reply", prompt_field="question"))
    values = [r.value for r in iter_records(source, sft=False, strict=True, stats=ReadStats())]
    assert values == [("q1", " a1"), ("q2", " a2")]
    missing = OmegaConf.structured(DataSourceConfig(path=str(path), text_field="reply", prompt_field="prompt"))
    with pytest.raises(UserError, match="no 'prompt' column .*set prompt_field"):
        list(iter_records(missing, sft=False, strict=True, stats=ReadStats()))


def test_bad_pairs_get_one_clear_error_each(tmp_path, tokenizer, write_jsonl, data_cfg):
    def check(path, match, **fields):  # train's early check and the build both refuse
        cfg = data_cfg([{"path": str(path), "text_field": "answer", "prompt_field": "prompt"}], seq_length=16,
                       **fields)
        for refuse in (lambda: check_sources(cfg),
                       lambda: build_datasets(cfg, tokenizer, seq_length=16, block_size=4, seed=0)):
            with pytest.raises(UserError, match=match):
                refuse()

    check(write_jsonl("a.jsonl", [{"answer": " 1"}]), r"a\.jsonl:1: record has no 'prompt' field")
    check(write_jsonl("b.jsonl", [{"prompt": 3, "answer": " 1"}]), r"b\.jsonl:1: 'prompt' is int, not a string")
    text = tmp_path / "c.txt"
    text.write_text("doc 1\n")
    check(text, "a plain text file has no 'prompt' field")
    check(write_jsonl("d.jsonl", PAIRS), "SFT chats mark their prompts by role", sft=True)
    source = OmegaConf.structured(DataSourceConfig(path=str(write_jsonl("e.jsonl", PAIRS))))
    prepare(source, tokenizer, str(tmp_path / "corpus"))
    check(tmp_path / "corpus", "an indexed dataset holds tokens without loss masks")
    paired = OmegaConf.structured(DataSourceConfig(path=str(tmp_path / "e.jsonl"), prompt_field="prompt"))
    with pytest.raises(UserError, match="prompt / completion records train from"):
        prepare(paired, tokenizer, str(tmp_path / "other"))
    assert not (tmp_path / "other.bin").exists()


def test_an_empty_completion_is_skipped_and_an_empty_prompt_kept(write_jsonl):
    path = write_jsonl("pairs.jsonl", [{"prompt": "q", "answer": " "}, {"prompt": "", "answer": " a"}])
    source = OmegaConf.structured(DataSourceConfig(path=str(path), text_field="answer", prompt_field="prompt"))
    stats = ReadStats()
    assert [r.value for r in iter_records(source, sft=False, strict=True, stats=stats)] == [("", " a")]
    assert stats.empty == 1


def test_data_continue_reads_the_prompts_of_pairs(write_jsonl):
    from ar2dlm.data.continuations import read_prompts

    path = write_jsonl("pairs.jsonl", PAIRS[:3])
    source = OmegaConf.structured(DataSourceConfig(path=str(path), text_field="answer", prompt_field="prompt"))
    assert read_prompts(source, None, strict=True) == [p["prompt"] for p in PAIRS[:3]]
