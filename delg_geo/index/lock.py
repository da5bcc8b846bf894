"""One writer per index folder, and readers that never see a half-swapped index.

Two ``flock`` locks, both files inside the index folder:

* ``.writer.lock``: held by ``index build/add/compact/calibrate/adapt`` for the whole command.
  A second writer fails at once with a message naming the holder (pid, command, start time,
  host), which the holder writes into ``.writer.json`` for as long as it holds the lock. The kernel drops a ``flock`` when its process
  dies, so a lock left by a killed process is simply taken over.
* ``.swap.lock``: held exclusively only while new files are moved into place, and shared by a
  reader while it reads the manifest and opens the files. A reader thus opens the old index or the
  new one, never a mix.

Where the folder cannot be written (a read-only index), readers go without the swap lock: no
writer can change such a folder either.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import sys
import time
from pathlib import Path

from delg_geo.core.errors import DelgGeoError

WRITER_LOCK = ".writer.lock"
WRITER_INFO = ".writer.json"  # who holds the writer lock; removed when the lock is released
SWAP_LOCK = ".swap.lock"


class IndexBusyError(DelgGeoError):
    """Another process is writing this index."""


def _holder(path: Path) -> str:
    try:
        d = json.loads(path.read_text())
        return (f"pid {d.get('pid')} on {d.get('host')}, `{d.get('command')}`, started {d.get('started')}")
    except (OSError, ValueError, AttributeError):
        return "another process"


_HELD: dict[str, int] = {}  # the writer locks this process holds (a build calibrates under its own lock)


@contextlib.contextmanager
def writer_lock(index_dir: str | Path, command: str | None = None):
    """Hold the index folder's writer lock (the folder is created if missing); raise
    :class:`IndexBusyError` naming the holder when another process has it. Re-entrant within a
    process."""
    import fcntl

    index_dir = Path(index_dir)
    key = str(index_dir.resolve())
    if key in _HELD:
        _HELD[key] += 1
        try:
            yield {"pid": os.getpid()}
        finally:
            _HELD[key] -= 1
        return
    created = not index_dir.exists()
    with storage_errors(index_dir, resumable=False):
        index_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(index_dir / WRITER_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            raise IndexBusyError(
                f"{index_dir} is being written by {_holder(index_dir / WRITER_INFO)}; wait for it to finish "
                "(one writer per index), or stop that process") from None
        info = dict(pid=os.getpid(), host=socket.gethostname(), command=command or " ".join(["delg-geo"] + sys.argv[1:]),
                    started=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        with storage_errors(index_dir, resumable=False):
            (index_dir / WRITER_INFO).write_text(json.dumps(info))
        swap_fd = _swap_fd(index_dir, create=True)
        if swap_fd is not None:
            os.close(swap_fd)
        _HELD[key] = 1
        yield info
    finally:
        if _HELD.pop(key, None) is not None:
            with contextlib.suppress(OSError):
                (index_dir / WRITER_INFO).unlink()
        os.close(fd)  # closing the descriptor releases the lock
        if created:  # a failed first write leaves no folder holding only locks
            with contextlib.suppress(OSError):
                if set(os.listdir(index_dir)) <= {WRITER_LOCK, SWAP_LOCK, WRITER_INFO}:
                    for name in (WRITER_LOCK, SWAP_LOCK, WRITER_INFO):
                        (index_dir / name).unlink(missing_ok=True)
                    index_dir.rmdir()


def _swap_fd(index_dir: Path, create: bool) -> int | None:
    try:
        return os.open(index_dir / SWAP_LOCK, os.O_RDWR | (os.O_CREAT if create else 0), 0o644)
    except OSError as e:
        if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOENT):
            return None
        raise


@contextlib.contextmanager
def _swap_lock(index_dir: Path, exclusive: bool):
    import fcntl

    # a writer creates the file when it takes its lock; a reader never writes into the index
    fd = _swap_fd(Path(index_dir), create=exclusive)
    try:
        if fd is not None:
            fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        yield
    finally:
        if fd is not None:
            os.close(fd)


def swapping(index_dir: str | Path):
    """Held while a writer moves files into ``index_dir``: readers wait until it is done."""
    return _swap_lock(Path(index_dir), exclusive=True)


def reading(index_dir: str | Path):
    """Held by a reader while it reads the manifest and opens the files."""
    return _swap_lock(Path(index_dir), exclusive=False)


_STORAGE = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is exceeded",
    errno.EROFS: "the folder is on a read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
}


@contextlib.contextmanager
def storage_errors(index_dir: str | Path, resumable: bool = True):
    """Turn a full disk, a read-only folder or a permission error into one line naming the folder
    and what to do (with ``resumable``, the work done so far is kept for ``--resume``)."""
    try:
        yield
    except OSError as e:
        why = _STORAGE.get(e.errno)
        if why is None:
            raise
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            what = ("free some space and continue with the same command and --resume" if resumable
                    else "free some space, then run the command again")
        else:
            what = "choose a folder you can write to, or fix its permissions"
        raise DelgGeoError(f"cannot write the index {index_dir}: {why} ({e.filename or index_dir}); {what}") from None
