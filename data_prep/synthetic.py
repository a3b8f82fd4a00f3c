"""Miniature datasets in each official layout, for tests and demos.

Every builder writes small random images and the annotation files in the
dataset's own format under ``root`` and returns ``root``. Class ids are the
official ones (e.g. cars196 classes 1..196), so split rules apply unchanged.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np


def write_image(path: Path, seed: int, size: tuple[int, int] = (12, 10)) -> Path:
    """A small random RGB image; the format follows the suffix (.jpg, .png, ...)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return path


def cars196_official(root, counts: dict[int, int]) -> Path:
    """``cars_annos.mat`` + ``car_ims/NNNNNN.jpg``; counts: class id -> images."""
    from scipy.io import savemat

    root = Path(root)
    fields = ["relative_im_path", "bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "test"]
    records = []
    for class_id, n in sorted(counts.items()):
        for _ in range(n):
            rel = f"car_ims/{len(records) + 1:06d}.jpg"
            write_image(root / rel, seed=len(records))
            records.append((rel, np.uint16(1), np.uint16(1), np.uint16(11), np.uint16(9), np.uint8(class_id),
                            np.uint8(len(records) % 2)))
    annotations = np.empty((1, len(records)), dtype=[(f, object) for f in fields])
    for i, rec in enumerate(records):
        annotations[0, i] = rec
    class_names = np.empty((1, 196), dtype=object)
    for i in range(196):
        class_names[0, i] = f"Make Model {i + 1:03d} 2012"
    savemat(root / "cars_annos.mat", {"annotations": annotations, "class_names": class_names})
    return root


def cars196_folders(root, counts: dict[int, int]) -> Path:
    """``NNN.Class_Name/*.jpg`` (the layout of ../shared/data/cars196)."""
    root = Path(root)
    seed = 0
    for class_id, n in sorted(counts.items()):
        for j in range(n):
            write_image(root / f"{class_id:03d}.Make_Model_{class_id:03d}_2012" / f"{seed:05d}.jpg", seed)
            seed += 1
    return root


def cub200(root, counts: dict[int, int]) -> Path:
    """CUB_200_2011: images.txt, image_class_labels.txt, classes.txt,
    train_test_split.txt and images/NNN.Name/*.jpg."""
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    names = {c: f"{c:03d}.Bird_{c:03d}" for c in range(1, 201)}
    images, labels, split = [], [], []
    for class_id, n in sorted(counts.items()):
        for j in range(n):
            image_id = len(images) + 1
            rel = f"{names[class_id]}/Bird_{class_id:03d}_{j:04d}.jpg"
            write_image(root / "images" / rel, image_id)
            images.append(f"{image_id} {rel}")
            labels.append(f"{image_id} {class_id}")
            split.append(f"{image_id} {image_id % 2}")
    (root / "images.txt").write_text("\n".join(images) + "\n")
    (root / "image_class_labels.txt").write_text("\n".join(labels) + "\n")
    (root / "train_test_split.txt").write_text("\n".join(split) + "\n")
    (root / "classes.txt").write_text("".join(f"{c} {n}\n" for c, n in names.items()))
    return root


def sop(root, train: dict[int, int], test: dict[int, int]) -> Path:
    """Ebay_train.txt / Ebay_test.txt and <super>_final/<product>_<n>.JPG."""
    root = Path(root)
    supers = ["bicycle", "chair"]
    image_id = 0
    for filename, counts in (("Ebay_train.txt", train), ("Ebay_test.txt", test)):
        lines = ["image_id class_id super_class_id path"]
        for class_id, n in sorted(counts.items()):
            super_id = class_id % 2 + 1
            for j in range(n):
                image_id += 1
                rel = f"{supers[super_id - 1]}_final/{100000 + class_id}_{j}.JPG"
                write_image(root / rel, image_id)
                lines.append(f"{image_id} {class_id} {super_id} {rel}")
        (root / filename).write_text("\n".join(lines) + "\n")
    return root


def inshop(root, train: dict[int, int], query: dict[int, int], gallery: dict[int, int],
           archive_layout: bool = False) -> Path:
    """list_eval_partition.txt + img/... (or Eval/ + Img/img/ when ``archive_layout``)."""
    root = Path(root)
    lines = []
    seed = 0
    for status, counts in (("train", train), ("query", query), ("gallery", gallery)):
        for item, n in sorted(counts.items()):
            for j in range(n):
                rel = f"img/WOMEN/Dresses/id_{item:08d}/{status[0]}{j:02d}_1_front.jpg"
                write_image(root / ("Img" if archive_layout else "") / rel, seed)
                seed += 1
                lines.append(f"{rel}  id_{item:08d}  {status}")
    partition = root / ("Eval" if archive_layout else "") / "list_eval_partition.txt"
    partition.parent.mkdir(parents=True, exist_ok=True)
    partition.write_text(f"{len(lines)}\nimage_name item_id evaluation_status\n" + "\n".join(lines) + "\n")
    return root


def vehicleid(root, train: dict[int, int], tests: dict[int, dict[int, int]]) -> Path:
    """train_test_split/train_list.txt, test_list_<size>.txt and image/<name>.jpg;
    ``tests``: test-set size (800, 1600, 2400) -> {vehicle id: images}."""
    root = Path(root)
    (root / "train_test_split").mkdir(parents=True, exist_ok=True)
    counter = 0

    def listing(counts):
        nonlocal counter
        lines = []
        for vehicle, n in sorted(counts.items()):
            for _ in range(n):
                counter += 1
                name = f"{counter:07d}"
                write_image(root / "image" / f"{name}.jpg", counter)
                lines.append(f"{name} {vehicle}")
        return "\n".join(lines) + "\n"

    (root / "train_test_split" / "train_list.txt").write_text(listing(train))
    for size, counts in tests.items():
        (root / "train_test_split" / f"test_list_{size}.txt").write_text(listing(counts))
    return root


def folder(root, counts: dict[str, int], split: str | None = None, suffix: str = ".png") -> Path:
    """<root>/[<split>/]<class>/<n><suffix>."""
    root = Path(root)
    base = root / split if split else root
    seed = sum(1 for _ in root.rglob("*")) if root.exists() else 0
    for name, n in sorted(counts.items()):
        for j in range(n):
            write_image(base / name / f"{j:03d}{suffix}", seed + j)
        seed += n
    return root


def _idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


def fashion_mnist(root, train_per_class: int = 3, test_per_class: int = 2, compress: bool = True, seed: int = 0):
    """The four IDX files (gzip like Debian's, or raw); returns {part: (images, labels)}."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    arrays = {}
    for part, per_class in (("train", train_per_class), ("t10k", test_per_class)):
        labels = np.tile(np.arange(10, dtype=np.uint8), per_class)
        images = rng.integers(0, 256, size=(len(labels), 28, 28), dtype=np.uint8)
        arrays[part] = (images, labels)
        for kind, arr, stem in (("images", images, "idx3"), ("labels", labels, "idx1")):
            data = _idx_bytes(arr)
            name = f"{part}-{kind}-{stem}-ubyte"
            if compress:
                (root / f"{name}.gz").write_bytes(gzip.compress(data))
            else:
                (root / name).write_bytes(data)
    return arrays
