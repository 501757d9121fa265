"""A model trained at one block size and decoded at another (diffusion.decode_block_size, docs/design.md §2.7):
the checkpoint and the export record the decoding block, also for checkpoints that predate the metadata."""

from __future__ import annotations

import json
import shutil

from ar2dlm.conversion.export import export
from ar2dlm.model.checkpoint import METADATA_FILE, read_metadata
from ar2dlm.model.manifest import write_manifest


def test_the_export_decodes_with_the_decode_block_size(run_setup, tmp_path):
    from ar2dlm.training.loop import Trainer

    cfg, output = run_setup
    Trainer(cfg("train.steps=1", "checkpoint.save_interval=1", "diffusion.block_size=8",
                "diffusion.decode_block_size=4")).fit()
    checkpoint = output / "checkpoints" / "step_0000001"
    metadata = read_metadata(checkpoint)
    assert (metadata.block_size, metadata.extra) == (4, {"train_block_size": 8})
    export(checkpoint, tmp_path / "exported")
    config = json.loads((tmp_path / "exported" / "config.json").read_text())
    assert config["block_size"] == 4 and config["dllm"]["block_size"] == 4

    old = tmp_path / "old"  # written before ar2dlm.json held the trained settings: they come from the run config
    shutil.copytree(checkpoint, old)
    raw = json.loads((old / METADATA_FILE).read_text())
    del raw["clean_pattern"]
    (old / METADATA_FILE).write_text(json.dumps({**raw, "block_size": 32, "extra": {}}))
    write_manifest(old)
    assert export(old, tmp_path / "exported_old").block_size == 4
