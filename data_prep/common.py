"""Helpers every dataset reader shares: root checks, safe file listing,
subsampling, per-class checks, fingerprints and image verification."""

from __future__ import annotations

import io
import os
import re
import stat
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path, PurePosixPath

import pandas as pd

from dcml.contracts.errors import DcmlError
from dcml.contracts.digests import file_digests
from dcml.contracts.manifest import SPLITS, fingerprint

OFFICIAL = "official"
CLASS_DISJOINT = "class-disjoint"
SPLIT_MODES = (OFFICIAL, CLASS_DISJOINT)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})


def require_root(root, dataset: str) -> Path:
    """``root`` as an absolute Path; a one-line error when it is not a directory."""
    if root is None or str(root) == "":
        raise DcmlError(f"{dataset}: no dataset root given; pass --root DIR pointing at the {dataset} folder")
    path = Path(root).expanduser().absolute()
    if not path.exists():
        raise DcmlError(f"{path}: dataset root does not exist; pass --root pointing at the {dataset} folder")
    if not path.is_dir():
        raise DcmlError(f"{path}: dataset root is not a directory; pass --root pointing at the {dataset} folder")
    return path


def check_split_mode(split_mode: str, dataset: str, allowed=SPLIT_MODES) -> str:
    if split_mode not in allowed:
        raise DcmlError(f"--split-mode {split_mode}: not supported for {dataset}; use one of {', '.join(allowed)}")
    return split_mode


def find_marked_root(root: Path, *marker_sets: tuple[str, ...]) -> Path | None:
    """``root`` or else its only sub-folder that contains every path of one marker set.

    Archives usually unpack into one named folder (CUB_200_2011/,
    Stanford_Online_Products/), so --root may point at its parent.
    """
    def marked(d: Path) -> bool:
        return any(all((d / m).exists() for m in markers) for markers in marker_sets)

    if marked(root):
        return root
    hits = [d for d in sorted(root.iterdir()) if d.is_dir() and not d.name.startswith(".") and marked(d)]
    return hits[0] if len(hits) == 1 else None


class RootGuard:
    """Stats files named relative to a dataset root, refusing paths that leave it.

    An annotation line with an absolute path or ``..``, or a symlink whose
    target lies outside the root, would let a manifest read arbitrary files
    on whatever machine later opens it.
    """

    def __init__(self, root: Path):
        self.root = Path(root)
        self.real = os.path.realpath(self.root)
        self._real_dirs: dict[str, str] = {}

    def _inside(self, real: str) -> bool:
        return real == self.real or real.startswith(self.real.rstrip(os.sep) + os.sep)

    def _real_dir(self, parent: str) -> str:
        real = self._real_dirs.get(parent)
        if real is None:
            real = os.path.realpath(parent)
            if not self._inside(real):
                raise DcmlError(f"{parent}: resolves to {real}, outside the dataset root {self.root}; "
                                "copy the data into the root or pass a --root that contains it")
            self._real_dirs[parent] = real
        return real

    def check_relative(self, rel: str, source) -> str:
        pure = PurePosixPath(rel.replace("\\", "/"))
        if not rel or pure.is_absolute() or ".." in pure.parts or re.match(r"^[A-Za-z]:", rel):
            raise DcmlError(f"{source}: path {rel!r} escapes the dataset root (absolute or '..'); "
                            f"list image paths relative to {self.root}")
        return pure.as_posix()

    def size(self, rel: str, source) -> int:
        """Size in bytes of root/rel, a regular file inside the root."""
        rel = self.check_relative(rel, source)
        full = os.path.join(self.root, rel)
        parent, name = os.path.split(full)
        real = os.path.join(self._real_dir(parent), name)
        try:
            st = os.lstat(real)
            if stat.S_ISLNK(st.st_mode):
                real = os.path.realpath(real)
                if not self._inside(real):
                    raise DcmlError(f"{full}: symlink resolves to {real}, outside the dataset root {self.root}; "
                                    "copy the file into the root or pass a --root that contains it")
                st = os.stat(real)
        except FileNotFoundError:
            raise DcmlError(f"{full}: listed in {source} but missing; restore the file or remove it from {source}") from None
        if not stat.S_ISREG(st.st_mode):
            raise DcmlError(f"{full}: listed in {source} but is not a regular file; replace it with the image file")
        return st.st_size

    def walk_images(self, directory: Path) -> list[str]:
        """Image files under ``directory`` (recursively, following symlinks
        that stay inside the root), as sorted root-relative posix paths."""
        found: list[str] = []
        seen: set[str] = set()

        def visit(d: str):
            real = self._real_dir(d)
            if real in seen:  # a symlink loop inside the root
                return
            seen.add(real)
            with os.scandir(d) as entries:
                for entry in sorted(entries, key=lambda e: e.name):
                    if entry.name.startswith("."):
                        continue
                    if entry.is_dir():
                        visit(entry.path)
                    elif os.path.splitext(entry.name)[1].lower() in IMAGE_EXTENSIONS and entry.is_file():
                        found.append(Path(entry.path).relative_to(self.root).as_posix())

        visit(str(directory))
        return found


def read_lines(path: Path) -> list[tuple[int, str]]:
    """Non-empty lines of an annotation file with 1-based line numbers."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise DcmlError(f"{path}: not a UTF-8 text file; restore the original annotation file") from None
    return [(i, line.strip()) for i, line in enumerate(text.splitlines(), 1) if line.strip()]


def subsample(df: pd.DataFrame, max_per_class: int | None) -> pd.DataFrame:
    """At most ``max_per_class`` images per (split, class): the first by sorted image_id."""
    if not max_per_class:
        return df
    if max_per_class < 2:
        raise DcmlError(f"--max-per-class {max_per_class}: every class needs at least 2 images; use 2 or more")
    df = df.sort_values("image_id", kind="stable")
    return df.groupby(["split", "label"], sort=False, group_keys=False).head(max_per_class)


def check_classes(df: pd.DataFrame, source, class_sources: dict | None = None) -> None:
    """Every class needs >= 2 images in each split it appears in (a positive
    pair); query and gallery count together since queries search the gallery.
    ``class_sources`` (label -> folder) names a class folder instead of ``source``."""
    groups = df["split"].replace({"query": "query+gallery", "gallery": "query+gallery"})
    counts = df.groupby([groups, "label"]).size()
    small = counts[counts < 2]
    if len(small):
        split, label = small.index[0]
        name = df.loc[df["label"] == label, "class_name"].iloc[0]
        source = (class_sources or {}).get(label, source)
        raise DcmlError(f"{source}: class {name!r} (label {label}) has {small.iloc[0]} image in split '{split}' "
                        f"({len(small)} such class(es)); every class needs at least 2 images per split: "
                        "add images or remove the class")


def check_unique(df: pd.DataFrame, source) -> None:
    dup = df["image_id"].duplicated()
    if dup.any():
        raise DcmlError(f"{source}: image {df['image_id'][dup].iloc[0]!r} is listed more than once; remove the duplicate line")


def content_fingerprint(root, entries, annotation_files=()) -> str:
    """sha256 over the sorted (relative path, content sha256) listing and the annotation files' bytes.

    Any change to any image's bytes changes it, same name and size included;
    the per-file digests are cached (dcml.contracts.digests), so a re-run over
    unchanged files only stats them.
    """
    rels = sorted(rel for rel, _ in entries)
    digests = file_digests(os.path.join(root, rel) for rel in rels)
    items: list = []
    for rel in rels:
        items += [rel, digests[os.path.join(root, rel)]]
    for path in annotation_files:
        items += [Path(path).name, Path(path).read_bytes()]
    return fingerprint(items)


def finish(df: pd.DataFrame, *, dataset: str, root: Path, split_mode: str, max_per_class: int | None,
           source, fingerprint_value: str, class_sources: dict | None = None) -> tuple[pd.DataFrame, dict]:
    """Subsample, check and order the rows; build the manifest metadata."""
    check_unique(df, source)
    df = subsample(df, max_per_class)
    check_classes(df, source, class_sources)
    for col in ("path", "image_bytes"):
        if col not in df.columns:
            df[col] = None
    split_order = {name: i for i, name in enumerate(SPLITS)}
    df = df.sort_values(["split", "label", "image_id"], key=lambda col: col.map(split_order) if col.name == "split" else col,
                        kind="stable").reset_index(drop=True)
    df = df[["image_id", "path", "image_bytes", "label", "class_name", "split"]].astype({"label": "int64"})
    meta = {"dataset": dataset, "root": str(Path(root).absolute()), "fingerprint": fingerprint_value,
            "split_mode": split_mode}
    return df, meta


def _image_problem(root: Path, path, data) -> str | None:
    from PIL import Image

    from dcml.algorithm.data import bomb_message

    try:
        src = io.BytesIO(data) if path is None else os.path.join(root, path)
        with Image.open(src) as im:
            im.load()
    except Image.DecompressionBombError as exc:
        return bomb_message(exc)  # starts with "image too large"
    except Exception as exc:  # any decoder failure is the file's
        return " ".join(str(exc).split()) or type(exc).__name__
    return None


def check_images(df: pd.DataFrame, root: Path, workers: int | None = None) -> None:
    """Decode every image fully (PIL open + load); the first bad one is a DcmlError.

    A thread pool overlaps file reads and PIL's decoders (which release the GIL).
    """
    from PIL import ImageFile
    from tqdm import tqdm

    from dcml.algorithm.data import set_pixel_limit

    set_pixel_limit()

    # A truncated file must fail here, whatever another module set globally.
    previous, ImageFile.LOAD_TRUNCATED_IMAGES = ImageFile.LOAD_TRUNCATED_IMAGES, False
    try:
        workers = workers or min(4, os.cpu_count() or 1)
        paths = df["path"].tolist()
        blobs = df["image_bytes"].tolist()
        with ThreadPoolExecutor(max_workers=workers) as pool:
            results = pool.map(lambda pb: _image_problem(root, *pb), zip(paths, blobs))
            for i, problem in enumerate(tqdm(results, total=len(df), desc="check images", unit="img",
                                             disable=None, mininterval=1.0)):
                if problem:
                    pool.shutdown(wait=False, cancel_futures=True)  # no need to decode the rest
                    where = os.path.join(root, paths[i]) if paths[i] is not None else f"{root} (image {df['image_id'].iloc[i]})"
                    if problem.startswith("image too large"):
                        raise DcmlError(f"{where}: {problem}")
                    raise DcmlError(f"{where}: corrupt or truncated image ({problem}); "
                                    "replace the file or remove it from the dataset")
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = previous


def class_halves(names) -> tuple[set, set]:
    """Sorted classes split into a first half (train) and a second half (test)."""
    names = sorted(names)
    cut = (len(names) + 1) // 2
    return set(names[:cut]), set(names[cut:])
