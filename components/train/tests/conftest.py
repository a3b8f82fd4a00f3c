import importlib.util
from pathlib import Path

import pytest
import torch

_spec = importlib.util.spec_from_file_location("fmnist_data", Path(__file__).with_name("fmnist_data.py"))
fmnist_data = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fmnist_data)


@pytest.fixture(scope="module")
def fm_manifest(tmp_path_factory):
    """A manifest of 6 x 16 real Fashion-MNIST training images and 4 x 10 test images."""
    torch.set_num_threads(1)
    return fmnist_data.make_manifest(tmp_path_factory.mktemp("fm") / "manifest.parquet", per_class=16, test_per_class=10)
