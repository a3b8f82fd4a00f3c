"""What `dcml run` checks before the first stage starts: every place it will write, and
settings the data cannot support (one line each, exit status 2, nothing run)."""

from __future__ import annotations

import os
from pathlib import Path

from dcml.contracts.errors import DcmlError

# SQLite opens a database only while its full path, plus "-journal", fits its 512-byte buffer (unix VFS
# MAX_PATHNAME): measured, a 504-byte path opens and writes, a 505-byte one fails with "unable to open
# database file" -- after the whole run, at the MLflow step, were it not checked here.
SQLITE_PATH_MAX = 504
# Bytes a run adds below its output folder at most (pipelines/<run id>/<pipeline run>/<task>/<artifact>/<file>).
RUN_PATH_HEADROOM = 320


def check_places(output_dir: Path, tracking_uri: str, resume_dir: Path | None = None) -> None:
    """The run folder, the shared cache, the resume folder and the MLflow store (sqlite
    database and artifacts) can all be written, so a run never trains for an hour and then
    fails at its last step. When a check fails, the folders made for it are removed again
    (by the `dcml` command's error exit)."""
    from dcml.contracts.io import check_writable
    from dcml.tracking.store import sqlite_path

    output_dir = Path(output_dir)
    places = [output_dir / "pipelines", output_dir / "cache", resume_dir or output_dir / "resume"]
    db = sqlite_path(tracking_uri)
    check_path_lengths(output_dir, db)
    if db is not None:
        places += [db.parent, db.parent / "artifacts"]
    for folder in places:
        try:
            check_writable(folder / ".dcml-check", folder=False)
        except DcmlError as exc:
            what = "MLflow store" if db is not None and folder in (db.parent, db.parent / "artifacts") else "run output"
            raise DcmlError(f"{what}: {exc}") from None
    if db is not None and db.exists() and not db.is_file():
        raise DcmlError(f"{db}: the MLflow database path is a folder; pass --tracking-uri sqlite:///<file>.db")


def training_classes(rows, val_fraction: float) -> int:
    """How many classes the training split will hold after the validation classes are carved
    out (the same carve as ingestion: dcml.contracts.manifest.carve_validation)."""
    from dcml.contracts import manifest

    _, info = manifest.carve_validation(rows, float(val_fraction or 0.0))
    return int(info["train_classes"])


def check_clusters(num_clusters: int, classes: int, dataset: str) -> None:
    """K clusters need at least K training classes (a cluster holds whole classes' images and
    a pair loss needs two of them): more is refused with the count."""
    if int(num_clusters) > classes:
        raise DcmlError(f"num_clusters={num_clusters}: the training split of {dataset} has only {classes} classes "
                        "(after the validation classes), so some clusters would hold no class to train on; "
                        f"use num_clusters <= {classes}")


def check_path_lengths(output_dir: Path, db: Path | None) -> None:
    """The run's deepest files fit the system's path limit, and the MLflow sqlite database's full path fits
    SQLite's (:data:`SQLITE_PATH_MAX`; a relative one counts from the working folder, as SQLite counts it)."""
    try:
        path_max = os.pathconf("/", "PC_PATH_MAX")
    except (OSError, ValueError):
        path_max = 4096
    deepest = len(os.fsencode(os.path.abspath(output_dir))) + RUN_PATH_HEADROOM
    if deepest >= path_max:
        raise DcmlError(f"run output: {str(output_dir)[:60]}...: the run's files would lie up to {deepest} bytes "
                        f"deep, over this system's {path_max}-byte path limit; pass a shorter --output-dir")
    if db is not None:
        full = len(os.fsencode(os.path.abspath(db)))
        if full > SQLITE_PATH_MAX:
            raise DcmlError(f"MLflow store: {str(db)[:60]}...: the database's full path is {full} bytes, over "
                            f"SQLite's {SQLITE_PATH_MAX}-byte limit (it could not be opened after the run); pass "
                            "--tracking-uri sqlite:///<shorter path>/mlflow.db or run from a shorter folder")

