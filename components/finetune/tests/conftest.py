import importlib.util
from pathlib import Path

import pytest
import torch

_spec = importlib.util.spec_from_file_location(
    "fmnist_data", Path(__file__).resolve().parents[2] / "train" / "tests" / "fmnist_data.py")
fmnist_data = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fmnist_data)


@pytest.fixture(scope="module")
def fm_manifest(tmp_path_factory):
    """A manifest of 4 x 12 real Fashion-MNIST training images and 3 x 8 test images."""
    torch.set_num_threads(1)
    return fmnist_data.make_manifest(tmp_path_factory.mktemp("fm") / "manifest.parquet", per_class=12,
                                     train_classes=(0, 1, 2, 3), test_classes=(7, 8, 9), test_per_class=8)
