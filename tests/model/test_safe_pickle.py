"""A pickle planted in a checkpoint's weights/ never runs: load, export, train init= and resume refuse the
checkpoint with one UserError naming the file; real converted and training checkpoints still load."""

from __future__ import annotations

import dataclasses
import enum
import io
import json
import pickle
import shutil
import sys
import types
from typing import NamedTuple

import pytest
import torch

from ar2dlm.errors import UserError
from ar2dlm.model.checkpoint import WEIGHTS_DIR, load_model
from ar2dlm.model.safe_pickle import check_distributed_checkpoint


class Planted:
    """Unpickling this writes ``marker``: what an attacker's pickle would do instead."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('ran')",)


@pytest.fixture(scope="module")
def converted_once(tmp_path_factory, tiny_tokenizer, megatron_ready):
    from ar2dlm.conversion.convert import convert
    from ar2dlm.model.hf_factory import make_hf_model

    root = tmp_path_factory.mktemp("safe_pickle")
    source = make_hf_model("Qwen3ForCausalLM", root / "hf", vocab_size=len(tiny_tokenizer) + 4,
                           tokenizer=tiny_tokenizer, tie_word_embeddings=True)
    convert(source, root / "converted")
    return root / "converted"


@pytest.fixture
def checkpoint(converted_once, tmp_path):
    return shutil.copytree(converted_once, tmp_path / "checkpoint")


def forge(checkpoint_dir):
    """An attacker who can edit the files can rewrite or remove the integrity manifest as well."""
    (checkpoint_dir / "manifest.json").unlink(missing_ok=True)


def plant_metadata(checkpoint_dir, marker):
    (checkpoint_dir / WEIGHTS_DIR / ".metadata").write_bytes(pickle.dumps(Planted(marker)))
    forge(checkpoint_dir)


def plant_byte_entry(checkpoint_dir, payload) -> str:
    """Append ``torch.save([payload])`` to a .distcp file and point one ``_extra_state`` entry at it."""
    weights = checkpoint_dir / WEIGHTS_DIR
    metadata = pickle.loads((weights / ".metadata").read_bytes())  # written by this test's own convert
    index = next(i for i in metadata.storage_data if "_extra_state" in i.fqn)
    buffer = io.BytesIO()
    torch.save([payload], buffer)
    data_file = weights / metadata.storage_data[index].relative_path
    offset = data_file.stat().st_size
    with data_file.open("ab") as handle:
        handle.write(buffer.getvalue())
    metadata.storage_data[index] = dataclasses.replace(metadata.storage_data[index], offset=offset,
                                                       length=len(buffer.getvalue()))
    (weights / ".metadata").write_bytes(pickle.dumps(metadata))
    forge(checkpoint_dir)
    return index.fqn


def as_byte_tensor(value) -> torch.Tensor:
    """How Transformer Engine stores a layer's FP8 state: the pickle's bytes as a uint8 tensor."""
    return torch.frombuffer(bytearray(pickle.dumps(value)), dtype=torch.uint8)


def test_real_checkpoint_passes_and_loads(checkpoint):
    check_distributed_checkpoint(checkpoint / WEIGHTS_DIR)
    chunks, metadata, _ = load_model(checkpoint)
    assert metadata.architecture == "Qwen3ForCausalLM" and len(chunks) == 1


def _load(checkpoint):
    load_model(checkpoint)


def _export(checkpoint):
    from ar2dlm.conversion.export import export

    export(checkpoint, checkpoint.parent / "exported")


@pytest.mark.parametrize("load", [_load, _export], ids=["load_model", "export"])
def test_planted_metadata_pickle_never_runs(load, checkpoint, tmp_path):
    marker = tmp_path / "marker"
    plant_metadata(checkpoint, marker)
    with pytest.raises(UserError, match=r"refusing to load .*weights/\.metadata: it references builtins\.exec"):
        load(checkpoint)
    assert not marker.exists()


def test_planted_extra_state_entry_never_runs(checkpoint, tmp_path):
    marker = tmp_path / "marker"
    key = plant_byte_entry(checkpoint, Planted(marker))
    with pytest.raises(UserError, match=rf"refusing to load .*\.distcp \(entry {key}\): it references exec"):
        load_model(checkpoint)
    assert not marker.exists()


def test_planted_transformer_engine_state_is_refused(checkpoint, tmp_path):
    marker = tmp_path / "marker"
    plant_byte_entry(checkpoint, as_byte_tensor({"recipe": Planted(marker)}))
    with pytest.raises(UserError, match=r"Transformer Engine state: it references builtins\.exec"):
        check_distributed_checkpoint(checkpoint / WEIGHTS_DIR)
    assert not marker.exists()


class _FormatHelper(NamedTuple):
    max_fwd: float
    max_bwd: float


class Format(enum.Enum):
    HYBRID = _FormatHelper(448, 57344)


@dataclasses.dataclass
class DelayedScaling:
    margin: int = 0
    fp8_format: Format = Format.HYBRID


def test_transformer_engine_fp8_state_passes(checkpoint, monkeypatch):
    recipe_module = "transformer_engine.common.recipe"
    with monkeypatch.context() as patch:  # pickle the stand-in recipe under Transformer Engine's names
        for name in ("transformer_engine", "transformer_engine.common", recipe_module):
            patch.setitem(sys.modules, name, types.ModuleType(name))
        for cls in (_FormatHelper, Format, DelayedScaling):
            patch.setattr(cls, "__module__", recipe_module)
            setattr(sys.modules[recipe_module], cls.__name__, cls)
        state = as_byte_tensor({"recipe": DelayedScaling(), "scale_fwd": torch.ones(3),
                                "amax_history_fwd": torch.zeros(4, 3), "extra_fp8_variables": {"num_gemms": 1}})
    plant_byte_entry(checkpoint, state)
    check_distributed_checkpoint(checkpoint / WEIGHTS_DIR)


def test_other_backend_is_refused(checkpoint):
    config_path = checkpoint / WEIGHTS_DIR / "metadata.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "sharded_backend": "zarr"}))
    with pytest.raises(UserError, match="metadata.json names the backends"):
        check_distributed_checkpoint(checkpoint / WEIGHTS_DIR)


@pytest.fixture
def train_config(checkpoint, tmp_path):
    from ar2dlm.config import compose_stage
    from ar2dlm.data.synthetic import examples, write_jsonl

    corpus = write_jsonl(tmp_path / "corpus.jsonl", list(examples(40, seed=0)))

    def cfg(*overrides):
        return compose_stage("train", [
            f"init={checkpoint}", f"output={tmp_path / 'run'}", "recipe=tiny", f"data.sources=[{{path: {corpus}}}]",
            "data.seq_length=32", "diffusion.block_size=8", "train.global_batch_size=2", "train.micro_batch_size=2",
            "train.steps=1", "checkpoint.save_interval=1", *overrides])

    return cfg


def test_train_init_with_planted_pickle_never_runs(train_config, checkpoint, tmp_path):
    from ar2dlm.training.loop import Trainer

    marker = tmp_path / "marker"
    plant_metadata(checkpoint, marker)
    with pytest.raises(UserError, match=r"weights/\.metadata: it references builtins\.exec"):
        Trainer(train_config())
    assert not marker.exists()


def test_training_checkpoint_passes_and_a_planted_one_is_refused_on_resume(train_config, tmp_path):
    from ar2dlm.training.loop import Trainer

    Trainer(train_config()).fit()
    saved = tmp_path / "run" / "checkpoints" / "step_0000001"
    check_distributed_checkpoint(saved / WEIGHTS_DIR)  # model and optimizer state
    marker = tmp_path / "marker"
    plant_metadata(saved, marker)
    with pytest.raises(UserError, match=r"step_0000001/weights/\.metadata: it references builtins\.exec"):
        Trainer(train_config("resume=true", "train.steps=2"))
    assert not marker.exists()
