"""Dataset name -> reader. Readers load lazily (scipy only for cars196, etc.).

Every reader is ``read(root, split_mode, max_per_class=None, **options)
-> (DataFrame with the manifest columns, metadata dict)`` where the metadata
holds ``dataset``, ``root`` (absolute), ``fingerprint`` and ``split_mode``.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from dcml.contracts.errors import DcmlError

# name -> module in data_prep
READERS: dict[str, str] = {
    "fashion-mnist": "data_prep.fashion_mnist",
    "cars196": "data_prep.cars196",
    "cub200": "data_prep.cub200",
    "sop": "data_prep.sop",
    "inshop": "data_prep.inshop",
    "vehicleid": "data_prep.vehicleid",
    "folder": "data_prep.folder",
}
ALIASES = {"fashion_mnist": "fashion-mnist", "fashionmnist": "fashion-mnist", "cars": "cars196",
           "cub": "cub200", "cub-200-2011": "cub200", "in-shop": "inshop", "vehicle-id": "vehicleid"}


def names() -> list[str]:
    return list(READERS)


def canonical(name: str) -> str:
    key = str(name).strip().lower()
    key = ALIASES.get(key, key)
    if key not in READERS:
        raise DcmlError(f"--dataset {name}: unknown dataset; use one of {', '.join(READERS)}")
    return key


def reader_module(name: str) -> ModuleType:
    """The module of dataset ``name`` (has NAME, DEFAULT_SPLIT_MODE and read())."""
    return importlib.import_module(READERS[canonical(name)])


def get_reader(name: str):
    """The ``read`` function of dataset ``name``."""
    return reader_module(name).read


def read_dataset(name: str, root=None, split_mode: str | None = None, max_per_class: int | None = None, **options):
    """Read dataset ``name``; ``split_mode`` None or "" means the dataset's default."""
    module = reader_module(name)
    return module.read(root, split_mode or module.DEFAULT_SPLIT_MODE, max_per_class=max_per_class, **options)
