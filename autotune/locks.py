"""Advisory locks on files: one run per ``--out`` directory, one planner measuring per device.

``flock`` locks belong to an open file description, so the kernel drops them when the holder
exits, however it exits (SIGKILL included): a stale lock never blocks anyone. The holder's pid
is written into the file, so a refusal can name who holds it. A lock may be shared (the ranks
of one run): the exclusive holder turns it into a shared one (:meth:`HeldLock.share`), the
others join it (``acquire(..., shared=True)``), and nobody else takes it while any one lives.
"""

from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path

from autotune.errors import UserError


class HeldLock:
    """A lock held until :meth:`release` (or the process exits)."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd: int | None = fd

    def share(self) -> None:
        """Turn this exclusive lock into a shared one, for processes that join it. (flock(2)
        converts without waiting; another process could take it in between only by asking
        for it in that instant, and then this raises.)"""
        assert self._fd is not None
        fcntl.flock(self._fd, fcntl.LOCK_SH | fcntl.LOCK_NB)

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> HeldLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def holder(path: Path) -> str:
    """The pids written by the lock's holders ("N" or "N, M, ..."), or "?" when unreadable."""
    try:
        return ", ".join(path.read_text().split()) or "?"
    except OSError:
        return "?"


def _open(path: Path, flags: int) -> int:
    """Open the lock file, creating it readable and writable by everyone (0o666, whatever the
    umask): a machine-wide lock is taken by every user. An existing file is opened without
    O_CREAT, which Linux's fs.protected_regular refuses on another user's file in a sticky
    folder such as /tmp."""
    while True:
        try:
            return os.open(path, flags)
        except FileNotFoundError:
            pass
        try:
            fd = os.open(path, flags | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:  # another process created it in between: open theirs
            continue
        os.fchmod(fd, 0o666)
        return fd


def acquire(path: str | os.PathLike, what: str, *, shared: bool = False) -> HeldLock:
    """Take the lock ``path`` without waiting: exclusive, or ``shared`` (joining one that its
    exclusive holder shared, see :meth:`HeldLock.share`); a lock held by another process is a
    one-line UserError: ``{what} is in use by another autotune process (pid N; lock PATH)``.
    The exclusive holder writes its pid into the file, a shared one adds its own.

    ``inheritable`` is off: a child process (torchrun, a trial) does not keep the lock alive
    after its parent is gone."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd = _open(p, os.O_RDWR | os.O_CLOEXEC | (os.O_APPEND if shared else 0))
    try:
        fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
    except OSError as e:
        os.close(fd)
        if e.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
            raise UserError(f"{what} is in use by another autotune process (pid {holder(p)}; lock {p})") from None
        raise
    if not shared:
        os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return HeldLock(p, fd)
