"""`ar2dlm data prepare` and Megatron indexed datasets: prepare -> load gives the same tokens and docs."""

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from ar2dlm.config.schema import DataPrepareStage, DataSourceConfig
from ar2dlm.data.indexed import load_indexed
from ar2dlm.data.loader import TrainDataLoader, build_datasets
from ar2dlm.data.prepare import prepare, run_prepare
from ar2dlm.data.tokenize import encode_texts
from ar2dlm.errors import UserError


@pytest.fixture
def docs_path(write_jsonl, numbered_docs):
    return write_jsonl("docs.jsonl", numbered_docs(30))


def _source(path, **fields):
    return OmegaConf.structured(DataSourceConfig(path=str(path), **fields))


def test_prepare_then_load_gives_the_same_tokens_and_documents(tmp_path, tokenizer, docs_path, numbered_docs):
    result = prepare(_source(docs_path), tokenizer, str(tmp_path / "out" / "corpus"))
    assert (tmp_path / "out" / "corpus.bin").is_file() and (tmp_path / "out" / "corpus.idx").is_file()
    expected = encode_texts(tokenizer, [d["text"] for d in numbered_docs(30)])
    assert result.documents == 30 and result.tokens == int(expected.lengths.sum())
    store = load_indexed(str(tmp_path / "out" / "corpus"), tokenizer)
    assert len(store) == 30 and store.needs_eos is None
    assert (store.lengths == expected.lengths).all()
    offsets = np.concatenate([[0], np.cumsum(expected.lengths)])
    for doc in range(30):
        tokens, _ = store.read(doc, 0, int(store.lengths[doc]))
        assert tokens.tolist() == expected.tokens[offsets[doc]:offsets[doc + 1]].tolist()
        assert tokens[-1] == tokenizer.eos_token_id


def test_training_from_indexed_data_reads_what_the_text_gives(tmp_path, tokenizer, docs_path, data_cfg):
    prepare(_source(docs_path), tokenizer, str(tmp_path / "corpus"))
    batches = []
    for path in (docs_path, tmp_path / "corpus"):
        train, _ = build_datasets(data_cfg([{"path": str(path)}], seq_length=16), tokenizer, seq_length=16,
                                  block_size=4, seed=0)
        loader = TrainDataLoader(train, global_batch_size=4, micro_batch_size=4, dp_rank=0, dp_size=1, seed=0)
        batches.append([loader.next_step()[0] for _ in range(5)])
    for a, b in zip(*batches, strict=True):
        assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.document_ids, b.document_ids)


def test_foreign_indexed_dataset_without_eos_and_with_multi_sequence_documents(tmp_path, tokenizer, data_cfg):
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    prefix = str(tmp_path / "foreign")
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    builder.add_document(torch.tensor([10, 11, 12, 13, 14]), [2, 3])  # two sentences, no EOS
    builder.add_document(torch.tensor([20, 21, tokenizer.eos_token_id]), [3])
    builder.finalize(prefix + ".idx")
    store = load_indexed(prefix, tokenizer)
    assert store.lengths.tolist() == [6, 3]
    assert store.read(0, 0, 6)[0].tolist() == [10, 11, 12, 13, 14, tokenizer.eos_token_id]
    assert store.read(0, 3, 6)[0].tolist() == [13, 14, tokenizer.eos_token_id]
    train, _ = build_datasets(data_cfg([{"path": prefix + ".idx"}], seq_length=16), tokenizer, seq_length=16,
                              block_size=4, seed=0)
    row = train[0]
    eos = tokenizer.eos_token_id
    assert row.input_ids[:9].tolist() == [10, 11, 12, 13, 14, eos, 20, 21, eos]
    assert row.document_ids[:10].tolist() == [0] * 6 + [1] * 3 + [2]


def test_run_prepare_from_the_stage_config(tmp_path, tokenizer, docs_path, capsys):
    from ar2dlm.config.compose import compose_stage

    tokenizer.save_pretrained(tmp_path / "tok")
    composed = compose_stage("data_prepare", [f"source.path={docs_path}", f"tokenizer={tmp_path / 'tok'}",
                                              f"output={tmp_path / 'c'}"], require_complete=False)
    assert composed.batch_size == 1000 and composed.source.text_field == "text"
    cfg = OmegaConf.structured(DataPrepareStage(source=DataSourceConfig(path=str(docs_path)),
                                                tokenizer=str(tmp_path / "tok"), output=str(tmp_path / "c"),
                                                batch_size=7))
    assert run_prepare(cfg) == 0
    assert "prepared 30 documents" in capsys.readouterr().out
    assert len(load_indexed(str(tmp_path / "c"), tokenizer)) == 30
    with pytest.raises(UserError, match=r"c.bin exists \(pass overwrite=true"):
        run_prepare(cfg)
    cfg.overwrite = True
    assert run_prepare(cfg) == 0


def test_prepare_leaves_nothing_behind_on_bad_input(tmp_path, tokenizer, write_jsonl):
    path = write_jsonl("bad.jsonl", [{"text": "alpha"}, {"body": "beta"}])
    with pytest.raises(UserError, match=r"bad.jsonl:2: record has no 'text' field"):
        prepare(_source(path), tokenizer, str(tmp_path / "out" / "c"))
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(UserError, match=r"empty.jsonl has no documents"):
        prepare(_source(tmp_path / "empty.jsonl"), tokenizer, str(tmp_path / "out" / "c"))
    assert list((tmp_path / "out").iterdir()) == []


def test_indexed_dataset_of_another_tokenizer_is_refused(tmp_path, tokenizer, docs_path):
    from ar2dlm.model.hf_factory import train_tokenizer

    prepare(_source(docs_path), tokenizer, str(tmp_path / "c"))
    other = train_tokenizer(["zzz yyy"] * 5, vocab_size=300)
    with pytest.raises(UserError, match=r"prepared with tokenizer .* prepare it again"):
        load_indexed(str(tmp_path / "c"), other)


def test_missing_or_unusable_indexed_sources(tmp_path, tokenizer, docs_path, data_cfg):
    with pytest.raises(UserError, match=r"no Megatron indexed dataset there"):
        load_indexed(str(tmp_path / "nothing"), tokenizer)
    prepare(_source(docs_path), tokenizer, str(tmp_path / "c"))
    (tmp_path / "broken.bin").write_bytes(b"\0" * 8)
    (tmp_path / "broken.idx").write_bytes(b"not an index at all")
    with pytest.raises(UserError, match=r"broken.idx: not a readable Megatron index"):
        load_indexed(str(tmp_path / "broken"), tokenizer)
    with pytest.raises(UserError, match=r"SFT needs chat records"):
        build_datasets(data_cfg([{"path": str(tmp_path / "c")}], sft=True), tokenizer, seq_length=16,
                       block_size=4, seed=0)
    with pytest.raises(UserError, match=r"already a Megatron indexed dataset"):
        prepare(_source(tmp_path / "c"), tokenizer, str(tmp_path / "d"))
