"""Atomic file writes and the Parquet layout of vector tables.

Every artifact a stage produces is written to a temporary file next to its
destination and renamed into place, so a crash never leaves a half-written
manifest, feature table or checkpoint behind.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import tempfile
from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from dcml.contracts.errors import DcmlError

_UMASK = os.umask(0)
os.umask(_UMASK)

# Key under which dcml stores its JSON metadata in a Parquet schema.
PARQUET_META_KEY = b"dcml"


_CREATED: list[Path] = []  # folders this process created for its outputs (removed again if they stay empty)

_FIXES = {
    errno.ENOSPC: "free space on that disk or choose an output location on another one",
    errno.EDQUOT: "free space within your quota or choose another output location",
    errno.ENAMETOOLONG: "choose a shorter name",
    errno.EACCES: "choose a writable output location",
    errno.EPERM: "choose a writable output location",
    errno.EROFS: "choose an output location on a writable file system",
    errno.ENOTDIR: "a part of the path is a file; choose another output location",
    errno.EISDIR: "pass a file path, not a folder",
}


def os_error_line(exc: OSError) -> str:
    """A file-system error as dcml's one line: ``<path>: <problem>; <fix>``."""
    where = exc.filename if exc.filename is not None else "output"
    where = str(where)
    if len(where) > 240:  # an over-long path: its start and its end say which one
        where = where[:120] + "..." + where[-60:]
    fix = _FIXES.get(exc.errno, "check the path and its permissions")
    return f"{where}: {exc.strerror or exc}; {fix}"


def _make_parents(folder: Path) -> list[Path]:
    """``folder.mkdir(parents=True)``; returns the folders it created, which are also
    remembered for :func:`remove_created_folders`."""
    missing = []
    for p in [folder, *folder.parents]:
        if p.is_dir():
            break
        missing.append(p)
    created = []
    for p in reversed(missing):
        try:
            p.mkdir()
        except FileExistsError:
            continue
        created.append(p)
    _CREATED.extend(created)
    return created


def remove_created_folders(folders: list[Path] | None = None) -> None:
    """After a failure: remove ``folders`` (default: every folder this process created for
    its outputs) where they are still empty -- nothing partial is left, not even a folder."""
    todo = _CREATED if folders is None else folders
    for p in reversed(list(todo)):
        try:
            p.rmdir()
        except OSError:
            continue
        if p in _CREATED:
            _CREATED.remove(p)
    if folders is None:
        _CREATED.clear()


def check_writable(dest: str | os.PathLike, folder: bool = False) -> Path:
    """Fail now, in one line, if an output cannot be written at ``dest``.

    Checked before a stage does any work: the name and path fit the file
    system's limits, the parent folder exists or can be created, a file can be
    created in it, and ``dest`` is not a folder (a file when ``folder``: the
    output is a folder written by :func:`atomic_dir`). Returns ``dest``.
    """
    dest = Path(dest)
    parent = dest.parent if str(dest.parent) else Path(".")
    existing = next((p for p in [parent, *parent.parents] if _exists(p)), Path("/"))
    try:
        name_max = os.pathconf(existing, "PC_NAME_MAX")
        path_max = os.pathconf(existing, "PC_PATH_MAX")
    except (OSError, ValueError):
        name_max, path_max = 255, 4096
    for part in dest.parts:  # the file's own name or any folder on the way
        name_bytes = len(os.fsencode(part))
        if name_bytes > name_max:
            what = "the name" if part == dest.name else "a folder name in the path"
            raise DcmlError(f"{part[:40]}...: {what} is {name_bytes} bytes, over this file system's "
                            f"{name_max}-byte limit; choose a shorter name")
    if len(os.fsencode(str(dest.absolute()))) >= path_max:
        raise DcmlError(f"{str(dest)[:60]}...: the path is over this system's {path_max}-byte limit; "
                        "choose a shorter output location")
    if dest.exists() and dest.is_dir() != folder:
        kind = "a folder" if dest.is_dir() else "a file"
        raise DcmlError(f"{dest}: is {kind}; pass {'a folder' if folder else 'a file'} path for this output")
    created: list[Path] = []
    try:
        created = _make_parents(parent)
        fd, probe = tempfile.mkstemp(prefix=".dcml-probe-", dir=parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        remove_created_folders(created)
        raise DcmlError(f"{parent}: cannot write here ({exc.strerror or exc}); "
                        f"{_FIXES.get(exc.errno, 'choose a writable output location')}") from None
    return dest


def _exists(p: Path) -> bool:
    try:
        return p.exists()
    except OSError:  # a name too long, no permission to look: treated as not there
        return False


@contextlib.contextmanager
def atomic_path(dest: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``dest``; rename it onto ``dest`` on success.

    The temporary name keeps at most 40 characters of ``dest``'s, so any name
    the file system allows for ``dest`` works.
    """
    dest = Path(dest)
    created = _make_parents(dest.parent)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name[:40]}.", suffix=".tmp", dir=dest.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # mkstemp creates 0600; artifacts are read by other users/containers.
        os.chmod(tmp_path, 0o666 & ~_UMASK)
        os.replace(tmp_path, dest)
    except BaseException as exc:
        tmp_path.unlink(missing_ok=True)
        remove_created_folders(created)
        _name_the_output(exc, dest)
        raise


@contextlib.contextmanager
def atomic_dir(dest: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder beside ``dest``; on success it replaces ``dest``.

    A folder cannot be renamed over a non-empty one, so an existing ``dest`` is
    first renamed aside and removed after the swap: readers see the old folder
    or the new one, never a mix.
    """
    import shutil

    dest = Path(dest)
    created = _make_parents(dest.parent)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name[:40]}.", suffix=".tmp", dir=dest.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_UMASK)
        old = None
        if dest.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{dest.name[:40]}.", suffix=".old", dir=dest.parent))
            os.replace(dest, old / dest.name)
        os.replace(tmp, dest)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        remove_created_folders(created)
        _name_the_output(exc, dest)
        raise


def _name_the_output(exc: BaseException, dest: Path) -> None:
    """A write that failed with no file name (a full disk in the middle of a write) names the output."""
    if isinstance(exc, OSError) and exc.filename is None and exc.errno is not None:
        exc.filename = str(dest)


def write_json(dest: str | os.PathLike, obj) -> None:
    with atomic_path(dest) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def write_parquet(dest: str | os.PathLike, table: pa.Table, meta: dict) -> None:
    """Write ``table`` with dcml's JSON ``meta`` in the schema metadata, atomically."""
    schema_meta = dict(table.schema.metadata or {})
    schema_meta[PARQUET_META_KEY] = json.dumps(meta, sort_keys=True, default=_json_default).encode()
    table = table.replace_schema_metadata(schema_meta)
    with atomic_path(dest) as tmp:
        pq.write_table(table, tmp)


def read_parquet_meta(path: str | os.PathLike) -> dict:
    """The dcml metadata of a Parquet file ({} when it has none)."""
    path = Path(path)
    if not path.is_file():
        raise DcmlError(f"{path}: no such file; pass the output of the previous stage")
    try:
        schema = pq.read_schema(path)
    except Exception as exc:  # pyarrow raises several types for non-Parquet files
        raise DcmlError(f"{path}: not a readable Parquet file ({exc}); re-create it with the stage that writes it") from None
    raw = (schema.metadata or {}).get(PARQUET_META_KEY)
    return json.loads(raw) if raw else {}


def vectors_table(meta_df: pd.DataFrame, vectors: np.ndarray, column: str) -> pa.Table:
    """A table of ``meta_df``'s columns plus ``column``: one float32 vector per row."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if vectors.ndim != 2 or len(vectors) != len(meta_df):
        raise ValueError(f"vectors shape {vectors.shape} does not match {len(meta_df)} rows")
    table = pa.Table.from_pandas(meta_df.reset_index(drop=True), preserve_index=False)
    values = pa.array(vectors.reshape(-1), type=pa.float32())
    return table.append_column(column, pa.FixedSizeListArray.from_arrays(values, vectors.shape[1]))


def write_vectors(dest, meta_df: pd.DataFrame, vectors: np.ndarray, column: str, meta: dict) -> None:
    """Write a feature or embedding table (e.g. column ``feature`` or ``embedding``)."""
    write_parquet(dest, vectors_table(meta_df, vectors, column), {**meta, "vector_column": column, "dim": int(vectors.shape[1])})


def read_vectors(path, column: str | None = None) -> tuple[pd.DataFrame, np.ndarray, dict]:
    """Read a vector table: (other columns, float32 matrix, dcml metadata).

    Accepts fixed-size or variable-size list columns of equal length, so
    embeddings written by other tools work too.
    """
    meta = read_parquet_meta(path)
    column = column or meta.get("vector_column") or "embedding"
    table = pq.read_table(path)
    if column not in table.column_names:
        raise DcmlError(f"{path}: no column '{column}' (has {', '.join(table.column_names)}); write vectors as a list<float> column named '{column}'")
    col = table.column(column).combine_chunks()
    n = len(col)
    if pa.types.is_fixed_size_list(col.type):
        dim = col.type.list_size
        flat = col.flatten().to_numpy(zero_copy_only=False)
    elif pa.types.is_list(col.type) or pa.types.is_large_list(col.type):
        lengths = col.value_lengths().to_numpy(zero_copy_only=False)
        if n and (lengths != lengths[0]).any():
            raise DcmlError(f"{path}: column '{column}' has vectors of different lengths; every row needs the same dimension")
        dim = int(lengths[0]) if n else 0
        flat = col.flatten().to_numpy(zero_copy_only=False)
    else:
        raise DcmlError(f"{path}: column '{column}' is {col.type}, not a list of floats")
    if meta.get("dim") is not None and n and int(meta["dim"]) != dim:
        raise DcmlError(f"{path}: column '{column}' holds {dim}-d vectors but the file's metadata says "
                        f"{meta['dim']}-d; the file was altered or mixed up, re-create it with the stage that wrote it")
    vectors = np.asarray(flat, dtype=np.float32).reshape(n, dim)
    others = table.drop_columns([column]).to_pandas()
    return others, vectors, meta


SEAL = ".dcml-seal.json"


def seal(folder: str | os.PathLike) -> None:
    """Record the size and sha256 of every file in an output folder (``.dcml-seal.json``).

    A local run's cache serves a stage's earlier outputs only while their
    seal still holds (:func:`check_seal`): a file deleted, truncated or
    changed since makes the stage run again instead of failing later.
    """
    from dcml.contracts.digests import sha256_file

    folder = Path(folder)
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != SEAL):
        files[path.relative_to(folder).as_posix()] = [path.stat().st_size, sha256_file(path)]
    write_json(folder / SEAL, {"files": files})


def check_seal(folder: str | os.PathLike) -> str | None:
    """None when ``folder`` holds exactly what its seal lists, else what is wrong."""
    from dcml.contracts.digests import sha256_file

    folder = Path(folder)
    try:
        files = json.loads((folder / SEAL).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"{folder}: no readable {SEAL}"
    for rel, (size, digest) in files.items():
        path = folder / rel
        if not path.is_file():
            return f"{path}: missing"
        if path.stat().st_size != size or sha256_file(path) != digest:
            return f"{path}: changed since it was written"
    return None
