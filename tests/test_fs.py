"""ar2dlm.fs: a full disk is recognised however torch wraps it."""

import errno

from torch.distributed.checkpoint.api import CheckpointException

from ar2dlm.fs import is_no_space_error, tree_size


def _raised_from(cause):
    try:
        raise RuntimeError("writer failed") from cause
    except RuntimeError as error:
        return error


def test_no_space_is_found_directly_in_causes_and_in_torch_checkpoint_failures():
    no_space = OSError(errno.ENOSPC, "No space left on device")
    assert is_no_space_error(no_space)
    assert is_no_space_error(_raised_from(no_space))
    assert is_no_space_error(CheckpointException("save failed", {1: (no_space, None)}))


def test_other_errors_are_not_taken_for_a_full_disk():
    assert not is_no_space_error(OSError(errno.EACCES, "Permission denied"))
    assert not is_no_space_error(_raised_from(ValueError("bad shape")))
    assert not is_no_space_error(CheckpointException("save failed", {0: (KeyError("x"), None)}))


def test_tree_size_counts_file_bytes(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x").write_bytes(b"123")
    (tmp_path / "y").write_bytes(b"45")
    assert tree_size(tmp_path) == 5 and tree_size(tmp_path / "missing") == 0
