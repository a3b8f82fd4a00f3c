"""The manifest schema: round trip, validation on read, atomic writes."""

from __future__ import annotations

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dcml.contracts import io as dcml_io
from dcml.contracts import manifest
from dcml.contracts.errors import DcmlError

META = {"dataset": "tiny", "root": "/data/tiny", "fingerprint": "f" * 64, "split_mode": "official"}


def rows(**changes) -> pd.DataFrame:
    df = pd.DataFrame({
        "image_id": ["a/0", "a/1", "b/0", "b/1"],
        "path": ["a/0.jpg", "a/1.jpg", None, None],
        "image_bytes": [None, None, b"\x89PNG0", b"\x89PNG1"],
        "label": [3, 3, 7, 7],
        "class_name": ["ant", "ant", "bee", "bee"],
        "split": ["train", "train", "test", "test"],
    })
    for col, values in changes.items():
        df[col] = values
    return df


def write_raw(path, df: pd.DataFrame, meta: dict) -> None:
    """A Parquet file with dcml metadata, bypassing the manifest's own validation."""
    dcml_io.write_parquet(path, pa.Table.from_pandas(df, preserve_index=False), meta)


def test_round_trip_keeps_rows_and_metadata(tmp_path):
    dest = tmp_path / "m.parquet"
    manifest.write(dest, rows(), {**META, "record": {"stage": "ingest", "exec_id": "x1"}})
    m = manifest.read(dest)
    assert m.path == dest and m.dataset == "tiny" and str(m.root) == "/data/tiny"
    assert m.meta["schema_version"] == manifest.SCHEMA_VERSION and m.meta["record"]["exec_id"] == "x1"
    assert m.meta["fingerprint"] == "f" * 64 and m.meta["split_mode"] == "official"
    assert list(m.df.columns) == list(manifest.COLUMNS)
    assert m.df["image_id"].tolist() == ["a/0", "a/1", "b/0", "b/1"]
    assert m.df["label"].dtype == "int64" and m.df["label"].tolist() == [3, 3, 7, 7]
    assert m.df["path"].tolist()[:2] == ["a/0.jpg", "a/1.jpg"] and m.df["path"].isna().tolist()[2:] == [True, True]
    assert m.df["image_bytes"].tolist()[2:] == [b"\x89PNG0", b"\x89PNG1"]
    assert m.split("test")["image_id"].tolist() == ["b/0", "b/1"]
    assert dcml_io.read_parquet_meta(dest)["dataset"] == "tiny"  # plain Parquet with dcml metadata


def test_write_adds_a_missing_path_or_bytes_column(tmp_path):
    df = rows().drop(columns=["image_bytes"]).iloc[:2]
    manifest.write(tmp_path / "m.parquet", df, META)
    m = manifest.read(tmp_path / "m.parquet")
    assert m.df["image_bytes"].isna().all() and len(m.df) == 2


@pytest.mark.parametrize("df, meta, message", [
    (rows().drop(columns=["class_name"]), META, "manifest lacks column(s) class_name"),
    (rows(image_id=["a/0", "a/1", "a/0", "b/1"]), META, "image_id must be unique and non-null (duplicate 'a/0')"),
    (rows(split=["train", "train", "validation", "test"]), META, "unknown split value(s) ['validation']"),
    (rows(split=["train", "train", "test", "query"]), META, "mixes split 'test' with 'query'/'gallery'"),
    (rows(), {**META, "schema_version": 0}, "manifest schema_version is 0, expected 1"),
    (rows(), {k: v for k, v in META.items() if k != "fingerprint"}, "manifest metadata lacks 'fingerprint'"),
    (rows(label=["3", "3", "7", "7"]), META, "column 'label' must be integer"),
    (rows(class_name=["ant", "ant", "bee", "wasp"]), META, "label 7 maps to several class names"),
    (rows(label=[3, 3, 7, 8], class_name=["ant", "ant", "bee", "bee"]), META, "class name 'bee' has several labels"),
    (rows(image_bytes=[None, None, b"", b"x"]), META, "row 'b/0' has neither path nor image_bytes"),
    (rows(path=["a/0.jpg", "", None, None]), META, "row 'a/1' has neither path nor image_bytes"),
    (rows(path=["a/0.jpg", "../secret.jpg", None, None]), META, "path '../secret.jpg' escapes the dataset root"),
    (rows(path=["/etc/passwd", "a/1.jpg", None, None]), META, "path '/etc/passwd' escapes the dataset root"),
])
def test_read_rejects_a_broken_manifest_naming_the_file(tmp_path, df, meta, message):
    dest = tmp_path / "bad.parquet"
    write_raw(dest, df, {"schema_version": manifest.SCHEMA_VERSION, **meta})
    with pytest.raises(DcmlError) as err:
        manifest.read(dest)
    assert str(err.value).startswith(f"{dest}: ") and message in str(err.value)
    assert "\n" not in str(err.value)
    # write() applies the same checks, and then writes nothing.
    out = tmp_path / "new.parquet"
    if "label" in df.columns and pd.api.types.is_integer_dtype(df["label"]):
        with pytest.raises(DcmlError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
            manifest.write(out, df, meta)
        assert not out.exists()


def test_read_rejects_files_that_are_not_manifests(tmp_path):
    plain = tmp_path / "plain.parquet"
    pq.write_table(pa.Table.from_pandas(rows(), preserve_index=False), plain)
    with pytest.raises(DcmlError, match=r"plain.parquet: not a dcml manifest \(no dcml metadata\); create it with `dcml ingest`"):
        manifest.read(plain)
    junk = tmp_path / "junk.parquet"
    junk.write_bytes(b"not parquet at all")
    with pytest.raises(DcmlError, match="junk.parquet: not a readable Parquet file"):
        manifest.read(junk)
    with pytest.raises(DcmlError, match="missing.parquet: no such file"):
        manifest.read(tmp_path / "missing.parquet")


def test_query_gallery_manifest_is_valid(tmp_path):
    df = rows(split=["train", "train", "query", "gallery"])
    manifest.write(tmp_path / "m.parquet", df, META)
    assert manifest.read(tmp_path / "m.parquet").split("query", "gallery")["split"].tolist() == ["query", "gallery"]


def test_invalid_write_leaves_nothing(tmp_path):
    with pytest.raises(DcmlError, match="unknown split"):
        manifest.write(tmp_path / "m.parquet", rows(split=["train", "x", "test", "test"]), META)
    assert list(tmp_path.iterdir()) == []


def test_crash_while_writing_leaves_no_partial_file_and_keeps_the_old_one(tmp_path, monkeypatch):
    dest = tmp_path / "m.parquet"
    manifest.write(dest, rows(), META)
    before = dest.read_bytes()

    def crash(table, where, **kwargs):
        with open(where, "wb") as f:
            f.write(b"PAR1 half a file")
        raise OSError("disk full")

    monkeypatch.setattr(dcml_io.pq, "write_table", crash)
    with pytest.raises(OSError, match="disk full"):
        manifest.write(dest, rows(label=[1, 1, 2, 2]), META)
    assert dest.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m.parquet"]
    with pytest.raises(OSError):
        manifest.write(tmp_path / "new.parquet", rows(), META)
    assert not (tmp_path / "new.parquet").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["m.parquet"]
