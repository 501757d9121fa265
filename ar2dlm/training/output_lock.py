"""One writer per training output: rank 0 holds ``OUTPUT/.ar2dlm.lock`` for the whole run.

The lock is an ``fcntl.flock`` on that file. The kernel drops it when its holder dies, however it dies, so a
crashed run never blocks the next one; the file names the holder (host, pid, start time) for the message a
second run gets, and a name left in it by a dead holder is reported as reclaimed. Where the filesystem has
no flock (Lustre mounted without ``flock``, some NFS setups) the file itself is the lock, created with
O_EXCL: one naming a dead process of this host is reclaimed, any other is respected.

Nested use in one process (e.g. a pipeline that locks a folder and then trains into it) is a no-op.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from ar2dlm.errors import UserError
from ar2dlm.log import logger

LOCK_FILE = ".ar2dlm.lock"
_FLOCK_UNSUPPORTED = (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP)
_ATTEMPTS = 5  # a holder may release (and remove) the file between our open and our lock; then try again
_held: set[Path] = set()


@dataclass(frozen=True)
class Holder:
    host: str
    pid: int
    started: str

    @classmethod
    def this_process(cls) -> Holder:
        return cls(socket.gethostname(), os.getpid(), time.strftime("%Y-%m-%d %H:%M:%S %Z"))

    @classmethod
    def parse(cls, text: str) -> Holder | None:
        try:
            fields = json.loads(text)
            return cls(str(fields["host"]), int(fields["pid"]), str(fields["started"]))
        except (ValueError, TypeError, KeyError):
            return None

    def __str__(self) -> str:
        return f"pid {self.pid} on {self.host}, started {self.started}"

    def is_dead_here(self) -> bool:
        """True only for a process of this host that no longer exists."""
        if self.host != socket.gethostname():
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:  # alive, another user's
            return False
        return False


@contextmanager
def output_lock(output: str | Path) -> Iterator[None]:
    """Hold the lock of ``output`` (created if missing) for the block; ranks other than 0 do nothing.

    A UserError (exit code 2) when another live process holds it.
    """
    folder = Path(output).expanduser().resolve()
    path = folder / LOCK_FILE
    if os.environ.get("RANK", "0") != "0" or path in _held:
        yield
        return
    created = not folder.exists()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        release = _acquire(path)
    except OSError as error:  # not writable, read-only filesystem, ...
        _remove_if_empty(folder, created)
        raise UserError(f"output {folder}: cannot create its lock file {LOCK_FILE} ({error.strerror or error})"
                        ) from None
    except BaseException:
        _remove_if_empty(folder, created)
        raise
    _held.add(path)
    try:
        yield
    finally:
        _held.discard(path)
        release()
        _remove_if_empty(folder, created)


def _acquire(path: Path) -> Callable[[], None]:
    for _ in range(_ATTEMPTS):
        try:
            fd, created = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644), True
        except FileExistsError:
            try:
                fd, created = os.open(path, os.O_RDWR), False
            except FileNotFoundError:
                continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read(fd)
            os.close(fd)
            raise UserError(_in_use(path, holder)) from None
        except OSError as error:
            if error.errno not in _FLOCK_UNSUPPORTED:
                os.close(fd)
                raise
            if not created:
                os.close(fd)
            return _acquire_pid_file(path, fd if created else None, error)
        if not _same_file(fd, path):
            os.close(fd)
            continue
        _take_over(fd, path)
        return lambda: _release_flock(fd, path)
    raise UserError(_in_use(path, None))


def _take_over(fd: int, path: Path) -> None:
    previous = _read(fd)
    if previous is not None:
        _log_reclaimed(path, previous)
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(asdict(Holder.this_process())).encode(), 0)


def _release_flock(fd: int, path: Path) -> None:
    try:
        if _same_file(fd, path):
            path.unlink()  # while still locked, so that no one locks a file that is about to vanish
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _acquire_pid_file(path: Path, fd: int | None, error: OSError) -> Callable[[], None]:
    """The fallback without flock: whoever creates the file (O_EXCL) holds the lock; ``fd`` is set when the
    failed flock attempt was what created it."""
    logger.warning("%s: the filesystem does not support flock (%s); the lock file's existence is the lock "
                   "instead, and one left by a run killed on another host must be removed by hand",
                   path.parent, errno.errorcode.get(error.errno, error.errno))
    for _ in range(_ATTEMPTS):
        if fd is None:
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                holder = _read_path(path)
                if holder is None and not path.exists():
                    continue
                if holder is None or not holder.is_dead_here():
                    raise UserError(_in_use(path, holder, stale_hint=True)) from None
                _log_reclaimed(path, holder)
                path.unlink(missing_ok=True)
                continue
        me = Holder.this_process()
        os.write(fd, json.dumps(asdict(me)).encode())
        os.close(fd)
        return lambda: _release_pid_file(path, me)
    raise UserError(_in_use(path, None))


def _release_pid_file(path: Path, me: Holder) -> None:
    if _read_path(path) == me:
        path.unlink(missing_ok=True)


def _in_use(path: Path, holder: Holder | None, stale_hint: bool = False) -> str:
    who = f"another run ({holder})" if holder else "another run"
    hint = f"; if that run is gone, remove {path}" if stale_hint else ""
    return (f"output {path.parent} is in use by {who}: wait for it to finish, stop it, or choose another "
            f"output{hint}")


def _log_reclaimed(path: Path, holder: Holder) -> None:
    logger.warning("%s: reclaimed the lock of a run that is no longer running (%s)", path.parent, holder)


def _read(fd: int) -> Holder | None:
    return Holder.parse(os.pread(fd, 4096, 0).decode("utf-8", "replace"))


def _read_path(path: Path) -> Holder | None:
    try:
        return Holder.parse(path.read_text("utf-8", "replace"))
    except FileNotFoundError:
        return None


def _same_file(fd: int, path: Path) -> bool:
    try:
        on_disk = os.stat(path)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (mine.st_dev, mine.st_ino) == (on_disk.st_dev, on_disk.st_ino)


def _remove_if_empty(folder: Path, created: bool) -> None:
    """Leave no empty output folder behind when this lock was what created it."""
    if created:
        try:
            folder.rmdir()
        except OSError:
            pass
