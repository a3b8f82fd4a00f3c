import importlib.util
from pathlib import Path

import faiss.contrib.torch_utils  # noqa: F401 -- pytorch-metric-learning imports it in the same processes:
import pytest                      # faiss then may return torch tensors, and the index must still work
import torch

_spec = importlib.util.spec_from_file_location("gallery_data", Path(__file__).with_name("gallery_data.py"))
gallery_data = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gallery_data)


@pytest.fixture(scope="module")
def fm(tmp_path_factory):
    """(manifest of real Fashion-MNIST images, a small_cnn checkpoint): 6 x 8 train and 4 x 12 test images."""
    torch.set_num_threads(1)
    folder = tmp_path_factory.mktemp("index")
    return (gallery_data.fm_manifest(folder / "manifest.parquet"),
            gallery_data.checkpoint_file(folder / "model.pt", embedding_dim=16, num_slices=2))
