"""The one manifest format every stage reads.

A manifest is a Parquet file with one row per image:

| column      | type    | meaning                                               |
|-------------|---------|-------------------------------------------------------|
| image_id    | string  | unique within the manifest                            |
| path        | string  | relative to the dataset root (null when embedded)     |
| image_bytes | binary  | the encoded image (null when ``path`` is used)        |
| label       | int64   | class id, unique per class_name                       |
| class_name  | string  | human-readable class                                  |
| split       | string  | ``train``/``test`` or ``train``/``query``/``gallery``, |
|             |         | plus ``val`` (validation classes carved out of train) |

and file-level metadata (Parquet schema metadata, key ``dcml``):
``schema_version``, ``dataset``, ``root`` (absolute), ``fingerprint`` (sha256
over the source listing), ``split_mode`` and the stage ``record``.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pyarrow as pa

from dcml.contracts.errors import DcmlError
from dcml.contracts.io import read_parquet_meta, write_parquet

SCHEMA_VERSION = 1
SPLITS = ("train", "val", "test", "query", "gallery")
COLUMNS = ("image_id", "path", "image_bytes", "label", "class_name", "split")

ARROW_SCHEMA = pa.schema([
    ("image_id", pa.string()),
    ("path", pa.string()),
    ("image_bytes", pa.binary()),
    ("label", pa.int64()),
    ("class_name", pa.string()),
    ("split", pa.string()),
])


@dataclass
class Manifest:
    """A validated manifest: its rows and its file-level metadata."""

    df: pd.DataFrame
    meta: dict
    path: Path | None = None

    @property
    def root(self) -> Path:
        return Path(self.meta["root"])

    @property
    def dataset(self) -> str:
        return self.meta["dataset"]

    def split(self, *names: str) -> pd.DataFrame:
        return self.df[self.df["split"].isin(names)].reset_index(drop=True)


def carve_validation(df: pd.DataFrame, fraction: float, source: str = "manifest") -> tuple[pd.DataFrame, dict]:
    """Move ``fraction`` of the training classes (all their images) to split ``val``.

    The classes are picked by a hash of their names, so the choice is fixed
    for a dataset (the same for every seed and run) and spread over the class
    list instead of one end of it. Validation needs at least two classes; a
    fraction that yields fewer (or leaves fewer than two training classes)
    carves nothing and says so in the returned summary.
    """
    if not (0.0 <= fraction < 1.0):
        raise DcmlError(f"val_fraction={fraction}: must be in [0, 1) (0 = no validation split)")
    train_names = sorted(df.loc[df["split"] == "train", "class_name"].unique())
    wanted = int(round(fraction * len(train_names)))
    info = {"val_fraction": fraction, "val_classes": 0, "train_classes": len(train_names)}
    if fraction == 0:
        return df, info
    if wanted < 2 or len(train_names) - wanted < 2:
        info["note"] = (f"no validation split ({fraction:.0%} of {len(train_names)} training classes is under the "
                        "2 classes validation needs)")
        return df, info
    ranked = sorted(train_names, key=lambda name: hashlib.sha256(f"dcml-val/{name}".encode()).hexdigest())
    chosen = set(ranked[:wanted])
    df = df.copy()
    df.loc[(df["split"] == "train") & df["class_name"].isin(chosen), "split"] = "val"
    info.update(val_classes=wanted, train_classes=len(train_names) - wanted)
    return df, info


def fingerprint(items) -> str:
    """sha256 over an iterable of strings/bytes (e.g. a sorted file listing with sizes)."""
    h = hashlib.sha256()
    for item in items:
        h.update(item if isinstance(item, bytes) else str(item).encode())
        h.update(b"\0")
    return h.hexdigest()


def validate(df: pd.DataFrame, meta: dict, source: str = "manifest") -> None:
    """Raise DcmlError naming ``source`` when df/meta break the schema."""
    fix = "re-create it with `dcml ingest`"
    if meta.get("schema_version") != SCHEMA_VERSION:
        raise DcmlError(f"{source}: manifest schema_version is {meta.get('schema_version')!r}, expected {SCHEMA_VERSION}; {fix}")
    for key in ("dataset", "root", "fingerprint"):
        if not meta.get(key):
            raise DcmlError(f"{source}: manifest metadata lacks '{key}'; {fix}")
    missing = [c for c in COLUMNS if c not in df.columns]
    if missing:
        raise DcmlError(f"{source}: manifest lacks column(s) {', '.join(missing)}; {fix}")
    if df["image_id"].isna().any() or df["image_id"].duplicated().any():
        dup = df["image_id"][df["image_id"].duplicated()].iloc[0] if df["image_id"].duplicated().any() else None
        raise DcmlError(f"{source}: image_id must be unique and non-null (duplicate {dup!r}); {fix}")
    if not pd.api.types.is_integer_dtype(df["label"]):
        raise DcmlError(f"{source}: column 'label' must be integer, got {df['label'].dtype}; {fix}")
    for col in ("class_name", "split"):
        if df[col].isna().any():
            raise DcmlError(f"{source}: column '{col}' is null for image {df['image_id'][df[col].isna()].iloc[0]!r}; {fix}")
    bad_split = sorted(set(df["split"].unique()) - set(SPLITS))
    if bad_split:
        raise DcmlError(f"{source}: unknown split value(s) {bad_split}; use {', '.join(SPLITS)}")
    present = set(df["split"].unique())
    if "test" in present and present & {"query", "gallery"}:
        raise DcmlError(f"{source}: mixes split 'test' with 'query'/'gallery'; use train/test or train/query/gallery")
    has_path = df["path"].map(lambda p: isinstance(p, str) and p != "").astype(bool)
    has_bytes = df["image_bytes"].map(lambda b: isinstance(b, (bytes, bytearray, memoryview)) and len(b) > 0).astype(bool)
    neither = ~(has_path | has_bytes)
    if neither.any():
        raise DcmlError(f"{source}: row {df['image_id'][neither].iloc[0]!r} has neither path nor image_bytes; {fix}")
    paths = df["path"][has_path].astype(str)
    # Paths stay inside the dataset root: no absolute paths, no '..' segments.
    escaping = paths.str.startswith(("/", "\\")) | paths.str.contains(r"(?:^|[/\\])\.\.(?:[/\\]|$)", regex=True) \
        | paths.str.match(r"^[A-Za-z]:")
    if escaping.any():
        raise DcmlError(f"{source}: path {paths[escaping].iloc[0]!r} escapes the dataset root; "
                        f"paths must be relative to the root without '..'; {fix}")
    per_label = df.groupby("label")["class_name"].nunique()
    if (per_label > 1).any():
        raise DcmlError(f"{source}: label {per_label[per_label > 1].index[0]} maps to several class names; {fix}")
    per_name = df.groupby("class_name")["label"].nunique()
    if (per_name > 1).any():
        raise DcmlError(f"{source}: class name {per_name[per_name > 1].index[0]!r} has several labels; {fix}")


def write(dest: str | os.PathLike, df: pd.DataFrame, meta: dict) -> None:
    """Validate and write a manifest atomically."""
    df = df.reset_index(drop=True)
    for col in ("path", "image_bytes"):
        if col not in df.columns:
            df[col] = None
    missing = [c for c in COLUMNS if c not in df.columns]
    if missing:
        raise DcmlError(f"{dest}: manifest lacks column(s) {', '.join(missing)}; re-create it with `dcml ingest`")
    df = df[list(COLUMNS)].astype({"label": "int64"})
    meta = {"schema_version": SCHEMA_VERSION, **meta}
    validate(df, meta, str(dest))
    table = pa.Table.from_pandas(df, schema=ARROW_SCHEMA, preserve_index=False)
    write_parquet(dest, table, meta)


def read(path: str | os.PathLike) -> Manifest:
    """Read and validate a manifest; a bad file is a one-line DcmlError."""
    path = Path(path)
    meta = read_parquet_meta(path)
    if not meta:
        raise DcmlError(f"{path}: not a dcml manifest (no dcml metadata); create it with `dcml ingest`")
    df = pd.read_parquet(path)
    validate(df, meta, str(path))
    return Manifest(df=df, meta=meta, path=path)
