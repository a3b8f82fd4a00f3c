"""Fashion-MNIST (Xiao et al. 2017): 70,000 28x28 grey images, 10 classes.

Reads the four IDX files (gzip-compressed as Debian's
``dataset-fashion-mnist`` installs them in /usr/share/datasets/fashion-mnist,
or uncompressed) with gzip + numpy, and embeds each image as PNG bytes in the
manifest (``path`` is null), so later stages need no copy of the IDX files.

Split modes: ``official`` = the 60,000 train / 10,000 test images;
``class-disjoint`` = all 70,000 images, classes 0-4 train and 5-9 test.
Without --root the Debian directory is used, else a copy in
~/.cache/dcml/fashion-mnist, else torchvision downloads one there.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import zlib
from pathlib import Path

import numpy as np
import pandas as pd

from dcml.contracts.errors import DcmlError
from data_prep import common

NAME = "fashion-mnist"
DEFAULT_SPLIT_MODE = common.OFFICIAL
SYSTEM_ROOT = Path("/usr/share/datasets/fashion-mnist")
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
# IDX file stems per part of the official split.
PARTS = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "t10k": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
LAST_TRAIN_CLASS_DISJOINT = 4
INSTALL_HINT = "install it with `apt-get install dataset-fashion-mnist` (or `make fashion-mnist`), or pass --root"


def cache_root() -> Path:
    return Path.home() / ".cache" / "dcml" / "fashion-mnist"


def default_roots() -> list[Path]:
    return [SYSTEM_ROOT, cache_root()]


def _idx_file(directory: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        if (directory / name).is_file():
            return directory / name
    return None


def idx_dir(root: Path) -> Path | None:
    """The folder under ``root`` that holds all four IDX files (torchvision
    keeps them in FashionMNIST/raw/), or None."""
    for directory in (root, root / "FashionMNIST" / "raw"):
        if all(_idx_file(directory, stem) for pair in PARTS.values() for stem in pair):
            return directory
    return None


def download(dest: Path | None = None) -> Path:
    """Fetch Fashion-MNIST with torchvision's downloader; the folder with the IDX files."""
    dest = Path(dest or cache_root())
    try:
        from torchvision.datasets import FashionMNIST

        for train in (True, False):
            FashionMNIST(str(dest), train=train, download=True)
    except Exception as exc:  # network errors come in many types
        raise DcmlError(f"{dest}: downloading Fashion-MNIST with torchvision failed "
                        f"({type(exc).__name__}: {' '.join(str(exc).split())[:200]}); {INSTALL_HINT}") from None
    found = idx_dir(dest)
    if found is None:
        raise DcmlError(f"{dest}: torchvision's download left no IDX files; {INSTALL_HINT}")
    return found


def locate(root=None, allow_download: bool = True) -> Path:
    """The folder with the IDX files: ``root`` if given, else the Debian
    location, else the cache, else a fresh torchvision download."""
    if root is not None and str(root) != "":
        root = common.require_root(root, NAME)
        found = idx_dir(root)
        if found is None:
            raise DcmlError(f"{root}: not a recognised fashion-mnist layout (expected train-images-idx3-ubyte.gz, "
                            "train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz); "
                            "point --root at the folder that holds them")
        return found
    for candidate in default_roots():
        found = idx_dir(candidate) if candidate.is_dir() else None
        if found is not None:
            return found
    if not allow_download:
        raise DcmlError(f"{SYSTEM_ROOT}: Fashion-MNIST not found (nor in {cache_root()}); {INSTALL_HINT}")
    return download(cache_root())


def read_idx(path: Path) -> np.ndarray:
    """An unsigned-byte IDX array (optionally gzip-compressed)."""
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, zlib.error) as exc:
        raise DcmlError(f"{path}: corrupt or truncated gzip file ({exc}); reinstall the dataset "
                        "(apt-get install --reinstall dataset-fashion-mnist)") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DcmlError(f"{path}: not an unsigned-byte IDX file; restore the original Fashion-MNIST file")
    ndim = raw[3]
    header = 4 + 4 * ndim
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    if len(raw) != header + int(np.prod(dims)):
        raise DcmlError(f"{path}: truncated IDX file ({len(raw) - header} bytes of data for shape {dims}); "
                        "reinstall the dataset (apt-get install --reinstall dataset-fashion-mnist)")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def load_arrays(directory: Path) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], str]:
    """{part: (images [N, 28, 28], labels [N])} and a fingerprint of the
    decompressed files (independent of how they were compressed)."""
    arrays, items = {}, []
    for part, (image_stem, label_stem) in PARTS.items():
        image_file, label_file = _idx_file(directory, image_stem), _idx_file(directory, label_stem)
        images, labels = read_idx(image_file), read_idx(label_file)
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise DcmlError(f"{label_file}: {len(labels)} labels for images of shape {images.shape}; "
                            "the image and label files do not belong together, reinstall the dataset")
        if labels.max(initial=0) >= len(CLASSES):
            raise DcmlError(f"{label_file}: label {labels.max()} outside 0-9; restore the original file")
        arrays[part] = (images, labels)
        for stem, arr in ((image_stem, images), (label_stem, labels)):
            items += [stem, str(arr.shape), hashlib.sha256(arr.tobytes()).hexdigest()]
    return arrays, common.fingerprint(items)


def encode_png(image: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8)).save(buf, format="PNG")  # 2-D uint8 -> mode L
    return buf.getvalue()


def read(root=None, split_mode: str = DEFAULT_SPLIT_MODE, max_per_class: int | None = None):
    """Read Fashion-MNIST -> (manifest rows with PNG bytes, metadata)."""
    from tqdm import tqdm

    common.check_split_mode(split_mode, NAME)
    directory = locate(root)
    arrays, fingerprint = load_arrays(directory)
    frames = []
    for part, (_, labels) in arrays.items():
        frame = pd.DataFrame({"image_id": [f"{part}/{i:05d}" for i in range(len(labels))],
                              "label": labels.astype("int64")})
        if split_mode == common.OFFICIAL:
            frame["split"] = "train" if part == "train" else "test"
        else:
            frame["split"] = np.where(frame["label"] <= LAST_TRAIN_CLASS_DISJOINT, "train", "test")
        frames.append(frame)
    df = pd.concat(frames, ignore_index=True)
    df["class_name"] = df["label"].map(dict(enumerate(CLASSES)))
    df, meta = common.finish(df, dataset=NAME, root=directory, split_mode=split_mode, max_per_class=max_per_class,
                             source=_idx_file(directory, PARTS["train"][1]), fingerprint_value=fingerprint)
    # Encode only the rows kept (after --max-per-class).
    blobs = []
    for image_id in tqdm(df["image_id"], desc="encode PNG", unit="img", disable=None, mininterval=1.0):
        part, index = image_id.split("/")
        blobs.append(encode_png(arrays[part][0][int(index)]))
    df["image_bytes"] = blobs
    return df, meta
