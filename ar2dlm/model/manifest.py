"""Checkpoint integrity: a manifest of every file's size and SHA-256, written with a checkpoint and checked on load.

    DIR/manifest.json   {"format": "ar2dlm-manifest", "algorithm": "sha256",
                         "files": {"weights/__0_0.distcp": {"size": 123, "sha256": "..."}, ...}}

Sizes are always recorded and checked. Checksums cost one read of the checkpoint (about 1-2 GB/s per
core); ``checksums=False`` records sizes only, for checkpoints too large to hash at every save.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from ar2dlm.errors import UserError
from ar2dlm.log import logger

MANIFEST_FILE = "manifest.json"
FORMAT = "ar2dlm-manifest"
ALGORITHM = "sha256"


class DamagedCheckpointError(UserError):
    """A checkpoint file is missing, truncated or changed since it was written."""


def file_sha256(path: Path) -> str:
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, ALGORITHM).hexdigest()


def _checkpoint_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST_FILE)


def write_manifest(directory: Path, checksums: bool = True) -> dict:
    """Record every file under ``directory``; returns the manifest."""
    files = {}
    for path in _checkpoint_files(directory):
        entry = {"size": path.stat().st_size}
        if checksums:
            entry[ALGORITHM] = file_sha256(path)
        files[path.relative_to(directory).as_posix()] = entry
    manifest = {"format": FORMAT, "algorithm": ALGORITHM if checksums else None, "files": files}
    (directory / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def read_manifest(directory: Path) -> dict | None:
    path = directory / MANIFEST_FILE
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DamagedCheckpointError(f"checkpoint {directory} is damaged: {path} cannot be parsed ({error})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or not isinstance(manifest.get("files"), dict):
        raise DamagedCheckpointError(f"checkpoint {directory} is damaged: {path} is not an ar2dlm manifest")
    return manifest


def verify_manifest(directory: str | Path, checksums: bool = True) -> bool:
    """Check every file the manifest lists; raises :class:`DamagedCheckpointError` naming the first bad file.

    Returns False (with a warning) for a checkpoint written before manifests existed. ``checksums=False``
    checks sizes only.
    """
    directory = Path(directory).expanduser()
    manifest = read_manifest(directory)
    if manifest is None:
        logger.warning("checkpoint %s has no %s (written by an older ar2dlm): its files are not verified",
                       directory, MANIFEST_FILE)
        return False
    for name, entry in manifest["files"].items():
        path = directory / name
        if not path.is_file():
            raise DamagedCheckpointError(f"checkpoint {directory} is damaged: {name} is missing")
        size = path.stat().st_size
        if size != entry.get("size"):
            raise DamagedCheckpointError(f"checkpoint {directory} is damaged: {name} has {size} bytes, "
                                         f"{entry.get('size')} were written (truncated or replaced)")
        expected = entry.get(ALGORITHM)
        if checksums and expected and file_sha256(path) != expected:
            raise DamagedCheckpointError(f"checkpoint {directory} is damaged: the content of {name} differs from "
                                         f"what was written ({ALGORITHM} mismatch)")
    return True

