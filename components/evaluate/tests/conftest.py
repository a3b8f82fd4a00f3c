import gzip
import io
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from dcml.contracts import manifest as manifest_lib

torch.set_num_threads(1)

FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


def _fashion_mnist_test_images():
    images = FASHION_MNIST / "t10k-images-idx3-ubyte.gz"
    if not images.is_file():
        pytest.skip(f"{FASHION_MNIST}: Fashion-MNIST not installed")
    pixels = np.frombuffer(gzip.decompress(images.read_bytes()), np.uint8, offset=16).reshape(-1, 28, 28)
    labels = np.frombuffer(gzip.decompress((FASHION_MNIST / "t10k-labels-idx1-ubyte.gz").read_bytes()),
                           np.uint8, offset=8).astype(np.int64)
    return pixels, labels


def _png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def fmnist_manifest(tmp_path):
    """Manifest factory: real Fashion-MNIST images (embedded PNGs), 6 classes x per_class,
    split 'test' or, with query_gallery=True, alternately 'query' / 'gallery'."""

    def make(per_class=8, query_gallery=False, name="manifest.parquet"):
        pixels, labels = _fashion_mnist_test_images()
        rows = []
        for label in range(6):
            for j, i in enumerate(np.flatnonzero(labels == label)[:per_class]):
                split = ("query" if j % 2 == 0 else "gallery") if query_gallery else "test"
                rows.append({"image_id": f"fm{i}", "path": None, "image_bytes": _png(pixels[i]), "label": label,
                             "class_name": f"class{label}", "split": split})
        # Training rows are never evaluated.
        rows.append({"image_id": "train0", "path": None, "image_bytes": _png(pixels[-1]), "label": 9,
                     "class_name": "class9", "split": "train"})
        dest = tmp_path / name
        manifest_lib.write(dest, pd.DataFrame(rows), {"dataset": "fmnist-tiny", "root": str(tmp_path),
                                                      "fingerprint": "cd" * 32})
        return dest

    return make
