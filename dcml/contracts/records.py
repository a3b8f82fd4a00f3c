"""Stage records: what a stage did, carried inside the artifact it wrote.

Every stage output (Parquet metadata, checkpoint dict, metrics JSON) holds a
record: stage name, a unique execution id, parameters, metrics, per-epoch
history, timing, and the records of the inputs it read. The final artifact of a
pipeline therefore holds the lineage of the whole run, and the MLflow tracker
(dcml.tracking) builds the run tree from it after the fact. Keeping MLflow out
of the stages keeps run-unique values out of cached steps' inputs; a stage
served from the cache shows up with an execution id MLflow has already seen.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

import dcml
from dcml import __version__


def git_commit() -> str:
    """The commit the code runs from: $DCML_GIT_COMMIT (set in images) or git."""
    env = os.environ.get("DCML_GIT_COMMIT")
    if env:
        return env
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"],
            cwd=Path(__file__).resolve().parent, capture_output=True, text=True, timeout=5,
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


class StageTimer:
    """Start a record when a stage starts; ``finish`` fills timing and lineage."""

    def __init__(self, stage: str, params: dict, name: str | None = None):
        self.stage = stage
        self.name = name or stage
        self.params = dict(params)
        self.started = datetime.now(timezone.utc).isoformat(timespec="seconds")
        self._t0 = time.perf_counter()

    def finish(self, inputs: dict[str, str | os.PathLike | None] | None = None,
               metrics: dict | None = None, history: list[dict] | None = None,
               extra: dict | None = None) -> dict:
        upstream = {}
        for key, path in (inputs or {}).items():
            if path is None:
                continue
            if isinstance(path, (list, tuple)):
                upstream[key] = [read(p) for p in path]
            else:
                upstream[key] = read(path)
        return {
            "stage": self.stage,
            "name": self.name,
            "exec_id": uuid.uuid4().hex,
            "params": self.params,
            "metrics": dict(metrics or {}),
            "history": list(history or []),
            "started": self.started,
            "duration_s": round(time.perf_counter() - self._t0, 3),
            "host": socket.gethostname(),
            "dcml_version": __version__,
            "git_commit": git_commit(),
            "image_tag": os.environ.get("DCML_IMAGE_TAG", ""),  # set in the images
            "runner": dcml.RUNNER,  # the local `dcml run` that executed it (None elsewhere)
            "extra": dict(extra or {}),
            "inputs": upstream,
        }


# The primary file inside each kind of pipeline artifact directory (an index folder
# also holds its model.pt, so index.json comes first).
ARTIFACT_FILES = (
    "index.json", "manifest.parquet", "features.parquet", "clusters.parquet", "model.pt",
    "metrics.json", "embeddings.parquet", "record.json",
)


def read(path: str | os.PathLike) -> dict:
    """The record stored in a stage artifact ({} when it carries none)."""
    path = Path(path)
    if not path.exists():
        return {}
    if path.is_dir():
        # A KFP artifact directory holds one primary file (see ARTIFACT_FILES).
        for candidate in ARTIFACT_FILES:
            if (path / candidate).is_file():
                return read(path / candidate)
        return {}
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        from dcml.contracts.io import read_parquet_meta

        return read_parquet_meta(path).get("record", {})
    if suffix == ".json":
        try:
            return json.loads(path.read_text()).get("record", {})
        except (json.JSONDecodeError, AttributeError):
            return {}
    if suffix in (".pt", ".pth", ".ckpt"):
        import torch

        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        raw = ckpt.get("record") if isinstance(ckpt, dict) else None
        return json.loads(raw) if raw else {}
    return {}


def walk(record: dict):
    """Yield every record in a lineage once (by exec_id), upstream first."""
    seen: set[str] = set()

    def _visit(rec):
        if not rec:
            return
        for value in rec.get("inputs", {}).values():
            for sub in value if isinstance(value, list) else [value]:
                yield from _visit(sub)
        if rec.get("exec_id") not in seen:
            seen.add(rec.get("exec_id"))
            yield rec

    yield from _visit(record)
