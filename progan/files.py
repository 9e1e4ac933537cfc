"""Files that appear whole or not at all, and folders that one process works in at a time.

`atomic_file`, the project's one atomic writer: a temporary file beside the target,
optionally fsynced, then renamed over it, so a reader (or a crash) never sees half a file.
The file gets the mode a plain `open` would give it (0666 less the umask), not `mkstemp`'s
0600: datasets and runs are often shared with colleagues.

`FolderLock`, an exclusive lock on a folder (a run, a dataset being prepared), released by
the kernel when the process dies, however it dies.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO


def current_umask() -> int:
    """The process's umask, read without changing it (Linux's /proc), else by setting it
    back at once."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextmanager
def atomic_file(path: str | os.PathLike, fsync: bool = False) -> Iterator[BinaryIO]:
    """A binary file that appears at `path` only once complete (see the module doc);
    removed on an error."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~current_umask())
        with os.fdopen(fd, "wb") as f:
            yield f
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class FolderBusyError(RuntimeError):
    """Another process holds the folder's lock."""


class FolderLock:
    """An exclusive lock on `<folder>/.lock`, held by this process while it works there.

    `flock`, or POSIX record locks (`lockf`) on file systems without it (some network file
    systems answer ENOSYS or EOPNOTSUPP). The lock file says who holds it.
    `busy(holder)` builds the error for a folder already held.
    """

    NAME = ".lock"

    def __init__(self, folder: Path, busy: type[Exception] = FolderBusyError) -> None:
        self.path, self.busy = Path(folder) / self.NAME, busy
        self.fd: int | None = None

    def message(self, holder: str) -> str:
        """The refusal, for a subclass to word."""
        return f"{self.path.parent} is in use by {holder}"

    def acquire(self) -> FolderLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            _lock(fd, self.path)
        except BlockingIOError:
            holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise self.busy(self.message(holder)) from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode())
        self.fd = fd
        return self

    def wait(self, timeout_s: float, poll_s: float = 0.2) -> FolderLock:
        """`acquire`, waiting up to `timeout_s` for a holder to let go (then `busy`)."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                return self.acquire()
            except self.busy:
                if time.monotonic() > deadline:
                    raise
                time.sleep(poll_s)

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing drops both kinds of lock
            self.fd = None

    def __enter__(self) -> FolderLock:
        return self if self.fd is not None else self.acquire()  # held already after `wait`

    def __exit__(self, *exc: object) -> None:
        self.release()


UNSUPPORTED = {errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOLCK, errno.EINVAL}


def _lock(fd: int, path: Path) -> None:
    """flock, else lockf where flock is not supported; BlockingIOError if held."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return
    except OSError as err:
        if isinstance(err, BlockingIOError) or err.errno not in UNSUPPORTED:
            raise
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        if err.errno in (errno.EACCES, errno.EAGAIN):
            raise BlockingIOError(err.errno, str(err)) from None
        if err.errno in UNSUPPORTED:
            raise OSError(
                err.errno,
                f"cannot lock {path}: its file system supports no file locks; put it on "
                "a local disk or a file system with locks",
            ) from None
        raise
