"""One writer at a time per index folder: an operating-system file lock beside it.

Every read-modify-write of an index folder (``dcml index --append / --remove /
--overwrite``, :class:`dcml.Index` ``add`` / ``remove`` / ``choose_threshold`` /
``save``) holds an exclusive lock on ``.<folder name>.lock`` beside the folder
(not inside it: a write swaps the whole folder). The lock is ``flock`` (through
the ``filelock`` package), so the kernel releases it when its holder ends, even
by ``kill -9``: a lock is never stale, and the empty file it leaves behind is
harmless (it stays so that waiters share one inode).

A second writer waits, saying so once on stderr, for up to
``$DCML_INDEX_LOCK_TIMEOUT`` seconds (default 600), then fails in one line.
Readers (``dcml search``, ``dcml serve``) never take it: a write replaces the
folder atomically, so they see the old index or the new one.

Which index a writer changes: each write stores a fresh ``write_id`` in
``index.json``. A writer that opened the folder before another one wrote it
sees a different ``write_id`` once it holds the lock, and reads the folder
again before changing anything (:func:`changed_since`), so ids are never handed
out twice and no update is lost.
"""

from __future__ import annotations

import json
import os
import sys
import uuid
from pathlib import Path

from dcml.contracts.errors import DcmlError

WAIT_ENV = "DCML_INDEX_LOCK_TIMEOUT"
DEFAULT_WAIT_S = 600.0


def lock_path(index_dir: str | os.PathLike) -> Path:
    """The lock file of an index folder: ``.<name>.lock`` in the folder's parent."""
    index_dir = Path(os.path.abspath(index_dir))
    return index_dir.with_name(f".{index_dir.name[:200]}.lock")


def wait_seconds() -> float:
    """How long a writer waits for the lock: ``$DCML_INDEX_LOCK_TIMEOUT`` seconds (default 600)."""
    text = os.environ.get(WAIT_ENV, "")
    try:
        value = float(text) if text else DEFAULT_WAIT_S
    except ValueError:
        value = -1.0
    if not value >= 0:  # also NaN
        raise DcmlError(f"{WAIT_ENV}={text!r}: expected seconds (a number >= 0)")
    return value


def new_write_id() -> str:
    return uuid.uuid4().hex


def write_id_on_disk(index_dir: str | os.PathLike) -> str | None:
    """The ``write_id`` of the folder's ``index.json`` (None when it has none or is not there)."""
    try:
        meta = json.loads((Path(index_dir) / "index.json").read_text())
    except (OSError, ValueError):
        return None
    return meta.get("write_id") if isinstance(meta, dict) else None


def changed_since(index_dir: str | os.PathLike, write_id: str | None) -> bool:
    """Whether the folder was written since the one with ``write_id`` was read."""
    return write_id_on_disk(index_dir) != write_id


def _take(lock, seconds: float) -> bool:
    from filelock import Timeout

    try:
        lock.acquire(timeout=seconds)
    except Timeout:
        return False
    return True


class WriteLock:
    """The exclusive write lock of one index folder (``acquire`` waits, bounded; ``release``)."""

    def __init__(self, index_dir: str | os.PathLike):
        self.index_dir = Path(os.path.abspath(index_dir))
        self.path = lock_path(self.index_dir)
        self._lock = None

    @property
    def held(self) -> bool:
        return self._lock is not None and self._lock.is_locked

    def acquire(self) -> "WriteLock":
        from filelock import FileLock

        from dcml.contracts.io import os_error_line

        if self.held:
            return self
        lock = FileLock(str(self.path), thread_local=False)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if not _take(lock, 0):
                wait = wait_seconds()
                if wait > 0:
                    print(f"{self.index_dir}: another process is writing this index; waiting for it "
                          f"(up to {wait:g} s, {WAIT_ENV})", file=sys.stderr, flush=True)
                if not _take(lock, wait):
                    raise DcmlError(f"{self.index_dir}: another process has been writing this index for over "
                                    f"{wait:g} s (lock {self.path}); wait for it to finish or stop it, or raise "
                                    f"{WAIT_ENV}")
        except OSError as exc:
            raise DcmlError(f"cannot lock the index for writing: {os_error_line(exc)}") from None
        self._lock = lock
        return self

    def release(self) -> None:
        if self._lock is not None:
            self._lock.release(force=True)
            self._lock = None

    def __enter__(self) -> "WriteLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


class Writer:
    """What an in-memory index needs to write safely: the folder it was read from (None: built here), the
    write lock it holds, and whether it holds changes not saved yet (``dirty``)."""

    def __init__(self, opened_from: str | os.PathLike | None = None):
        self.opened_from = None if opened_from is None else Path(os.path.abspath(opened_from))
        self.lock: WriteLock | None = None
        self.dirty = False

    def hold(self, dest: str | os.PathLike) -> None:
        """Hold ``dest``'s write lock (waiting for another writer, bounded)."""
        dest = Path(os.path.abspath(dest))
        if self.lock is None or self.lock.index_dir != dest or not self.lock.held:
            self.release()
            self.lock = WriteLock(dest).acquire()

    def stale(self, dest: str | os.PathLike, write_id: str | None) -> bool:
        """Whether ``dest`` is the folder this index was read from and another process wrote it since."""
        return self.opened_from == Path(os.path.abspath(dest)) and changed_since(dest, write_id)

    def saved(self, dest: str | os.PathLike) -> None:
        self.opened_from, self.dirty = Path(os.path.abspath(dest)), False
        self.release()

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None
