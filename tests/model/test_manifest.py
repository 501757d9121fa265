"""The checkpoint manifest: every damaged file is named; an intact checkpoint verifies."""

import json

import pytest

from ar2dlm.model.manifest import MANIFEST_FILE, DamagedCheckpointError, verify_manifest, write_manifest


@pytest.fixture
def checkpoint(tmp_path):
    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / "__0_0.distcp").write_bytes(bytes(range(256)) * 64)
    (tmp_path / "ar2dlm.json").write_text('{"format": "ar2dlm-checkpoint"}\n')
    write_manifest(tmp_path)
    return tmp_path


def test_an_intact_checkpoint_verifies_and_the_manifest_lists_every_file(checkpoint):
    manifest = json.loads((checkpoint / MANIFEST_FILE).read_text())
    assert sorted(manifest["files"]) == ["ar2dlm.json", "weights/__0_0.distcp"]
    assert manifest["files"]["weights/__0_0.distcp"]["size"] == 256 * 64
    assert verify_manifest(checkpoint) is True


def _flip_one_byte(path):
    data = bytearray(path.read_bytes())
    data[100] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(("damage", "message"), [
    (lambda c: _flip_one_byte(c / "weights" / "__0_0.distcp"), r"content of weights/__0_0\.distcp differs"),
    (lambda c: (c / "weights" / "__0_0.distcp").write_bytes(b"short"), r"weights/__0_0\.distcp has 5 bytes, 16384"),
    (lambda c: (c / "ar2dlm.json").unlink(), "ar2dlm.json is missing"),
    (lambda c: (c / MANIFEST_FILE).write_text("{not json"), "manifest.json cannot be parsed"),
    (lambda c: (c / MANIFEST_FILE).write_text("[]"), "is not an ar2dlm manifest"),
])
def test_each_kind_of_damage_is_one_error_naming_the_file(checkpoint, damage, message):
    damage(checkpoint)
    with pytest.raises(DamagedCheckpointError, match=message):
        verify_manifest(checkpoint)


def test_sizes_only_skips_the_checksum_but_not_the_size(checkpoint):
    _flip_one_byte(checkpoint / "weights" / "__0_0.distcp")
    assert verify_manifest(checkpoint, checksums=False) is True
    (checkpoint / "weights" / "__0_0.distcp").write_bytes(b"short")
    with pytest.raises(DamagedCheckpointError, match="has 5 bytes"):
        verify_manifest(checkpoint, checksums=False)


def test_a_manifest_written_without_checksums_still_checks_sizes(tmp_path):
    (tmp_path / "a.bin").write_bytes(b"12345")
    write_manifest(tmp_path, checksums=False)
    assert "sha256" not in json.loads((tmp_path / MANIFEST_FILE).read_text())["files"]["a.bin"]
    (tmp_path / "a.bin").write_bytes(b"1234")
    with pytest.raises(DamagedCheckpointError, match="a.bin has 4 bytes, 5 were written"):
        verify_manifest(tmp_path)


def test_a_checkpoint_from_before_manifests_loads_with_a_warning(tmp_path, caplog):
    (tmp_path / "a.bin").write_bytes(b"1")
    with caplog.at_level("WARNING", logger="ar2dlm"):
        assert verify_manifest(tmp_path) is False
    assert "not verified" in caplog.text
