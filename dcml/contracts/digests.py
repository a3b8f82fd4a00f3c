"""Content digests of files, cheap on re-runs: sha256 cached by (path, size, mtime, ctime, inode).

A dataset's fingerprint must change when any image's bytes change, same name
and size included, yet hashing tens of thousands of images on every run is
slow. The first run hashes every file; the digest is kept in a small sqlite
table in the user's cache folder (``$DCML_CACHE_DIR``, else
``$XDG_CACHE_HOME/dcml``, else ``~/.cache/dcml``) under the file's real path
with its size, modification and status-change times (ns) and inode. Later
runs re-hash only files whose stat differs. The status-change time cannot be
set by tools that restore a modification time, so an edit is always seen.
Concurrent processes share the table safely (sqlite WAL, busy timeout).
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
from pathlib import Path
from typing import Iterable

CHUNK = 1 << 20


def cache_dir() -> Path:
    explicit = os.environ.get("DCML_CACHE_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "dcml"


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _open() -> sqlite3.Connection | None:
    try:
        folder = cache_dir()
        folder.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(folder / "file-digests.sqlite", timeout=60)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("CREATE TABLE IF NOT EXISTS digests (path TEXT PRIMARY KEY, size INTEGER, mtime_ns INTEGER, "
                   "ctime_ns INTEGER, inode INTEGER, sha256 TEXT)")
        return db
    except (OSError, sqlite3.Error):
        return None  # no writable cache folder: hash every time


def file_digests(paths: Iterable[str | os.PathLike]) -> dict[str, str]:
    """sha256 of each file (by the path given), from the cache where the file's stat is unchanged."""
    paths = [str(p) for p in paths]
    db = _open()
    out: dict[str, str] = {}
    fresh = []
    try:
        for path in paths:
            real = os.path.realpath(path)
            st = os.stat(real)
            key = (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)
            row = db.execute("SELECT size, mtime_ns, ctime_ns, inode, sha256 FROM digests WHERE path = ?",
                             (real,)).fetchone() if db else None
            if row and tuple(row[:4]) == key:
                out[path] = row[4]
                continue
            out[path] = sha256_file(real)
            fresh.append((real, *key, out[path]))
        if db and fresh:
            with db:
                db.executemany("INSERT OR REPLACE INTO digests VALUES (?, ?, ?, ?, ?, ?)", fresh)
    finally:
        if db:
            db.close()
    return out
