"""Readers on the real datasets of this machine (skipped where absent)."""

from __future__ import annotations

import gzip
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_prep import cars196, fashion_mnist

CARS_ROOT = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "cars196"
FASHION_ROOT = fashion_mnist.SYSTEM_ROOT

needs_cars = pytest.mark.skipif(not CARS_ROOT.is_dir(), reason=f"{CARS_ROOT} not present")
needs_fashion = pytest.mark.skipif(not (FASHION_ROOT / "train-images-idx3-ubyte.gz").is_file(),
                                   reason=f"{FASHION_ROOT} not present (apt-get install dataset-fashion-mnist)")


@needs_cars
def test_cars196_shared_class_folders():
    df, meta = cars196.read(CARS_ROOT)
    assert len(df) == 8144
    assert df["label"].nunique() == 196 and df["class_name"].nunique() == 196
    train, test = set(df.loc[df["split"] == "train", "label"]), set(df.loc[df["split"] == "test", "label"])
    assert train == set(range(1, 99)) and test == set(range(99, 197))
    assert not train & test
    assert df["image_id"].is_unique and df["path"].notna().all()
    assert df.groupby("label").size().between(24, 68).all()  # per data/README.md
    assert meta["root"] == str(CARS_ROOT)


@needs_fashion
def test_fashion_mnist_system_copy_official(monkeypatch):
    # Encoding 70,000 PNGs takes seconds; count with a stub, decode a subsample for real below.
    monkeypatch.setattr(fashion_mnist, "encode_png", lambda image: b"png")
    df, meta = fashion_mnist.read(None)  # found automatically
    assert meta["root"] == str(FASHION_ROOT) and meta["split_mode"] == "official"
    counts = df.groupby("split")["label"].agg(["size", "nunique"])
    assert counts.loc["train"].tolist() == [60000, 10] and counts.loc["test"].tolist() == [10000, 10]
    per_class = df.groupby(["split", "label"]).size()
    assert per_class["train"].eq(6000).all() and per_class["test"].eq(1000).all()


@needs_fashion
def test_fashion_mnist_system_copy_pixels():
    df, _ = fashion_mnist.read(FASHION_ROOT, max_per_class=3)
    assert len(df) == 60
    raw = gzip.decompress((FASHION_ROOT / "t10k-images-idx3-ubyte.gz").read_bytes())
    pixels = np.frombuffer(raw, np.uint8, offset=16).reshape(-1, 28, 28)
    for image_id, png in zip(df["image_id"], df["image_bytes"]):
        if image_id.startswith("t10k/"):
            decoded = np.array(Image.open(io.BytesIO(png)))
            np.testing.assert_array_equal(decoded, pixels[int(image_id.split("/")[1])])


@needs_fashion
def test_fashion_mnist_system_copy_class_disjoint(monkeypatch):
    # Only the split of all 70,000 images matters here.
    monkeypatch.setattr(fashion_mnist, "encode_png", lambda image: b"png")
    df, meta = fashion_mnist.read(FASHION_ROOT, "class-disjoint")
    assert len(df) == 70000 and meta["split_mode"] == "class-disjoint"
    assert set(df.loc[df["split"] == "train", "label"]) == {0, 1, 2, 3, 4}
    assert set(df.loc[df["split"] == "test", "label"]) == {5, 6, 7, 8, 9}
    assert df.groupby("label").size().eq(7000).all()
