"""Source kinds (text, JSONL, Parquet, folders, `datasets`), and each bad input as one clear error."""

import logging

import pytest

from ar2dlm.config.schema import DataSourceConfig
from ar2dlm.data.loader import build_datasets
from ar2dlm.data.sources import ReadStats, iter_records
from ar2dlm.errors import UserError
from ar2dlm.log import logger


def _source(**fields):
    from omegaconf import OmegaConf

    return OmegaConf.structured(DataSourceConfig(**fields))


def _texts(source, strict=False, stats=None):
    return [r.value for r in iter_records(source, sft=False, strict=strict, stats=stats or ReadStats())]


def _refused(data_cfg, tokenizer, sources, match, **fields):
    with pytest.raises(UserError, match=match) as error:
        build_datasets(data_cfg(sources, **fields), tokenizer, seq_length=16, block_size=4, seed=0)
    assert "\n" not in str(error.value)
    return str(error.value)


def test_text_jsonl_parquet_and_folders(tmp_path, write_jsonl):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.txt").write_text("alpha one\n\nalpha two\n")
    write_jsonl("corpus/b.jsonl", [{"text": "beta one", "id": 1}, {"text": "beta two"}])
    pq.write_table(pa.table({"body": ["gamma one", "gamma two"]}), tmp_path / "corpus" / "c.parquet")
    (tmp_path / "corpus" / "notes.md").write_text("ignored")
    assert _texts(_source(path=str(tmp_path / "corpus" / "a.txt"))) == ["alpha one", "alpha two"]
    assert _texts(_source(path=str(tmp_path / "corpus" / "a.txt"), sample_by="document")) == [
        "alpha one\n\nalpha two\n"]
    assert _texts(_source(path=str(tmp_path / "corpus" / "c.parquet"), text_field="body")) == [
        "gamma one", "gamma two"]
    assert _texts(_source(path=str(tmp_path / "corpus"), kind="jsonl")) == ["beta one", "beta two"]
    first_three = ["alpha one", "alpha two", "beta one"]
    assert _texts(_source(path=str(tmp_path / "corpus"), max_documents=3)) == first_three


def test_datasets_code_path_with_a_local_dataset(tmp_path, write_jsonl):
    import datasets

    write_jsonl("hubby/data/train-0.jsonl", [{"text": f"delta {i}"} for i in range(5)])
    streamed = _source(path=str(tmp_path / "hubby"), kind="hub", streaming=True, max_documents=3)
    assert _texts(streamed) == ["delta 0", "delta 1", "delta 2"]
    datasets.Dataset.from_dict({"text": ["eta 0", "eta 1"]}).save_to_disk(str(tmp_path / "saved"))
    assert _texts(_source(path=str(tmp_path / "saved"))) == ["eta 0", "eta 1"]


def test_unreachable_hub_is_a_clear_error(monkeypatch):
    import datasets
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(UserError, match=r"cannot load dataset 'nobody-ar2dlm/missing' split 'train'") as err:
        _texts(_source(path="nobody-ar2dlm/missing", streaming=True))
    assert "hub is not reachable" in str(err.value) and "\n" not in str(err.value)


def test_missing_file_and_folder(tmp_path, data_cfg, tokenizer):
    _refused(data_cfg, tokenizer, [{"path": str(tmp_path / "nope.jsonl")}], r"nope.jsonl does not exist")
    (tmp_path / "empty_dir").mkdir()
    _refused(data_cfg, tokenizer, [{"path": str(tmp_path / "empty_dir")}], r"empty_dir: folder has no")


def test_empty_source(tmp_path, data_cfg, tokenizer, write_jsonl):
    (tmp_path / "blank.txt").write_text("\n  \n")
    _refused(data_cfg, tokenizer, [{"path": str(tmp_path / "blank.txt")}], r"blank.txt has no documents")
    _refused(data_cfg, tokenizer, [], r"data.sources is empty")


def test_record_without_the_text_field(data_cfg, tokenizer, write_jsonl):
    path = write_jsonl("docs.jsonl", [{"text": "alpha"}, {"text": "beta"}, {"body": "gamma", "id": 3}])
    message = _refused(data_cfg, tokenizer, [{"path": str(path)}], "docs.jsonl:3: record has no 'text' field")
    assert "fields: body, id" in message and "text_field" in message


def test_bad_json_and_wrong_types(data_cfg, tokenizer, tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"text": "alpha"}\n{"text": "beta"\n')
    _refused(data_cfg, tokenizer, [{"path": str(tmp_path / "bad.jsonl")}], r"bad.jsonl:2: not valid JSON")
    (tmp_path / "num.jsonl").write_text('{"text": 7}\n')
    _refused(data_cfg, tokenizer, [{"path": str(tmp_path / "num.jsonl")}], r"num.jsonl:1: 'text' is int")


def test_parquet_without_the_column(data_cfg, tokenizer, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": ["gamma"]}), tmp_path / "c.parquet")
    _refused(data_cfg, tokenizer, [{"path": str(tmp_path / "c.parquet")}],
             r"c.parquet: no 'text' column \(columns: body\)")


def test_invalid_utf8_is_skipped_with_a_count_or_fails_when_strict(data_cfg, tokenizer, tmp_path, caplog):
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(b'{"text": "alpha"}\n{"text": "caf\xe9"}\n{"text": "beta"}\n{"text": "\xff"}\n')
    stats = ReadStats()
    assert _texts(_source(path=str(path)), stats=stats) == ["alpha", "beta"]
    assert stats.invalid_utf8 == 2 and stats.first_invalid == f"{path}:2"
    logger.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.WARNING, logger="ar2dlm"):
            build_datasets(data_cfg([{"path": str(path)}]), tokenizer, seq_length=16, block_size=4, seed=0)
    finally:
        logger.removeHandler(caplog.handler)
    assert "skipped 2 document(s) with invalid UTF-8 (first at" in caplog.text
    _refused(data_cfg, tokenizer, [{"path": str(path)}], r"mixed.jsonl:2: invalid UTF-8", strict=True)
    (tmp_path / "bad.txt").write_bytes(b"alpha\nbeta\n\xc3\x28 gamma\n")
    bad = [{"path": str(tmp_path / "bad.txt")}]
    _refused(data_cfg, tokenizer, bad, "bad.txt:3: invalid UTF-8", strict=True)


@pytest.mark.parametrize("weights", [[0.0, 0.0], [1.0, -1.0]])
def test_weights_must_sum_to_a_positive_number(data_cfg, tokenizer, write_jsonl, weights):
    path = write_jsonl("docs.jsonl", [{"text": "alpha"}])
    sources = [{"path": str(path), "weight": w} for w in weights]
    _refused(data_cfg, tokenizer, sources, r"weights .* must be >= 0 and sum to a positive number")


def test_unknown_suffix_and_kind(tmp_path):
    (tmp_path / "data.csv").write_text("a,b\n")
    with pytest.raises(UserError, match=r"data.csv: cannot tell its format from the suffix '.csv'"):
        _texts(_source(path=str(tmp_path / "data.csv")))
    with pytest.raises(UserError, match=r"kind='xml' is not one of"):
        _texts(_source(path=str(tmp_path / "data.csv"), kind="xml"))
