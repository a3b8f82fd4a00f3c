"""Image datasets over a manifest, and the train / eval transforms per backbone.

``build_transform(model_config, train)`` returns an :class:`ImageTransform`: a
callable PIL image -> normalised float tensor [C, S, S] that also tells the
dataset which PIL mode to decode into ("RGB" for 3-channel backbones, "L" for a
1-channel small_cnn) and, for eval, the size down to which a JPEG may be
decoded (PIL draft mode: the decoder skips DCT detail it would throw away
anyway, the main cost of the data path on large photos).
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset
from torchvision.transforms import v2

from dcml.contracts.errors import DcmlError
from dcml.algorithm.models import CONFIG_KEYS, default_config

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HALF = (0.5, 0.5, 0.5)

# Per-backbone input normalisation (what the pretrained weights expect).
NORMALIZATION = {
    "resnet18": (IMAGENET_MEAN, IMAGENET_STD),
    "resnet50": (IMAGENET_MEAN, IMAGENET_STD),
    "efficientnet_lite0": (HALF, HALF),  # the lite weights were trained on [-1, 1] inputs
    "small_cnn": (HALF, HALF),
}


def eval_resize_size(image_size: int) -> int:
    """The Resize side before CenterCrop at eval (256 for 224, as the reference)."""
    return int(round(image_size * 256 / 224))


class FitSize:
    """Resize the shorter side to ``size`` and centre-crop, unless already size x size."""

    def __init__(self, size: int):
        self.size = size
        self.resize = v2.Compose([v2.Resize(size, antialias=True), v2.CenterCrop(size)])

    def __call__(self, img):
        if isinstance(img, Image.Image) and img.size == (self.size, self.size):
            return img
        return self.resize(img)

    def __repr__(self):
        return f"FitSize({self.size})"


class ImageTransform:
    """PIL image -> normalised tensor, plus the decode hints the dataset uses."""

    def __init__(self, mode: str, pipeline, draft_size: int | None):
        self.mode = mode
        self.pipeline = pipeline
        self.draft_size = draft_size

    def __call__(self, img: Image.Image) -> torch.Tensor:
        if img.mode != self.mode:
            # Grey -> RGB repeats the channel; RGB -> L is ITU-R 601 luma.
            img = img.convert(self.mode)
        return self.pipeline(img)

    def __repr__(self):
        return f"ImageTransform(mode={self.mode!r}, draft_size={self.draft_size}, pipeline={self.pipeline})"


def _full_config(model_config: dict) -> dict:
    # Fill what a partial config leaves out (e.g. in_channels=1 for small_cnn).
    return default_config(**{k: model_config[k] for k in CONFIG_KEYS if k in model_config})


def normalization(model_config: dict) -> tuple[list[float], list[float]]:
    """(mean, std) per input channel that the model's transform subtracts and divides by."""
    config = _full_config(model_config)
    mean, std = NORMALIZATION[config["backbone"]]
    channels = config["in_channels"]
    return list(mean[:channels]), list(std[:channels])


def build_transform(model_config: dict, train: bool, normalize: bool = True) -> ImageTransform:
    """Train: RandomResizedCrop + flip; eval: Resize(S*256/224) + CenterCrop(S).

    small_cnn on 28 px images: train RandomCrop(28, padding=2) + flip, eval
    leaves the image as is (other sizes are first fitted to image_size).
    ``normalize=False`` stops at pixel values in [0, 1] (:func:`normalization`
    gives what the full transform then applies).
    """
    config = _full_config(model_config)
    backbone = config["backbone"]
    size = config["image_size"]
    mode = "L" if config["in_channels"] == 1 else "RGB"
    to_tensor = [v2.PILToTensor(), v2.ToDtype(torch.float32, scale=True)]
    if normalize:
        to_tensor.append(v2.Normalize(*normalization(config)))
    if backbone == "small_cnn":
        if train:
            ops = [FitSize(size), v2.RandomCrop(size, padding=max(1, size // 14)), v2.RandomHorizontalFlip()]
        else:
            ops = [FitSize(size)]
        draft = None if train else size
    elif train:
        # Train decodes at full resolution so small random crops keep their detail.
        ops = [v2.RandomResizedCrop(size, antialias=True), v2.RandomHorizontalFlip()]
        draft = None
    else:
        ops = [v2.Resize(eval_resize_size(size), antialias=True), v2.CenterCrop(size)]
        draft = eval_resize_size(size)
    return ImageTransform(mode, v2.Compose(ops + to_tensor), draft)


MAX_PIXELS_ENV = "DCML_MAX_IMAGE_PIXELS"


def set_pixel_limit() -> int:
    """PIL's decompression-bomb limit: $DCML_MAX_IMAGE_PIXELS, else PIL's own.

    PIL warns above MAX_IMAGE_PIXELS (about 89 Mpx) and refuses images of more
    than twice that; dcml turns the refusal into a one-line error (the warning
    into nothing).
    """
    value = os.environ.get(MAX_PIXELS_ENV)
    if value:
        try:
            Image.MAX_IMAGE_PIXELS = int(value)
        except ValueError:
            raise DcmlError(f"{MAX_PIXELS_ENV}={value!r}: expected a whole number of pixels, e.g. 400000000") from None
    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
    return int(Image.MAX_IMAGE_PIXELS or 0)


def bomb_message(exc: Exception) -> str:
    limit = 2 * int(Image.MAX_IMAGE_PIXELS or 0)
    return (f"image too large to decode safely ({' '.join(str(exc).split())[:120]}); the limit is {limit:,} pixels "
            f"(a guard against decompression bombs): shrink the image, or raise the limit with "
            f"{MAX_PIXELS_ENV}=<pixels> (it is twice that value) if you trust the file")


def _is_set(value) -> bool:
    return value is not None and not (isinstance(value, float) and np.isnan(value))


def decode_image(src, mode: str | None = None, draft_size: int | None = None) -> Image.Image:
    """Open and decode an image file or file object, JPEG-drafted to ``draft_size`` when set.

    The one decoding path of gallery and query images; PIL's own exceptions
    propagate (each caller says what to do about them).
    """
    img = Image.open(src)
    if draft_size and img.format == "JPEG":
        img.draft(mode or img.mode, (draft_size, draft_size))
    img.load()
    return img


def inside_root(path: Path, root: Path) -> Path:
    """``path`` when it still lies inside the dataset ``root`` once links are followed, as ingestion checked
    (data_prep.common.RootGuard); checked again at every read, so a symlink to a file outside the root
    swapped in after ingestion is refused instead of followed. A few stat calls per image."""
    real, top = os.path.realpath(path), os.path.realpath(root)
    if real != top and not real.startswith(top.rstrip(os.sep) + os.sep):
        raise DcmlError(f"{path}: resolves to {real}, outside the dataset root {root} (a link changed since "
                        "ingestion?); put the file itself in the root and re-run `dcml ingest`")
    return path


class ManifestImageDataset(Dataset):
    """Items ``(image_tensor, label, row_index)`` for ``rows`` of a manifest.

    ``row_index`` is the position in ``rows`` (0..len-1). Images are read from
    ``manifest.root / path`` or decoded from ``image_bytes``.
    """

    def __init__(self, manifest, rows: pd.DataFrame, transform):
        missing = [c for c in ("image_id", "label") if c not in rows.columns]
        if missing or ("path" not in rows.columns and "image_bytes" not in rows.columns):
            where = manifest.path or "manifest"
            raise DcmlError(f"{where}: rows lack column(s) {missing or ['path/image_bytes']}; pass rows of the manifest's DataFrame")
        self.root = Path(manifest.root)
        self.source = str(manifest.path or "manifest")
        set_pixel_limit()
        n = len(rows)
        self.image_ids = rows["image_id"].astype(str).tolist()
        self.paths = rows["path"].tolist() if "path" in rows.columns else [None] * n
        self.blobs = rows["image_bytes"].tolist() if "image_bytes" in rows.columns else [None] * n
        self.labels = rows["label"].to_numpy(dtype=np.int64)
        self.transform = transform
        self.mode = getattr(transform, "mode", None)
        self.draft_size = getattr(transform, "draft_size", None)

    def __len__(self) -> int:
        return len(self.labels)

    def load_image(self, i: int) -> Image.Image:
        """Decode image ``i`` (PIL), JPEG-drafted to the transform's size when allowed.

        Any failure to decode it, a decompression-bomb refusal included, is a
        one-line DcmlError naming the file.
        """
        path = self.paths[i]
        if _is_set(path):
            where = self.root / path
            src = inside_root(where, self.root)
        elif _is_set(self.blobs[i]):
            where = f"{self.source}: image_bytes of {self.image_ids[i]!r}"
            src = io.BytesIO(self.blobs[i])
        else:
            raise DcmlError(f"{self.source}: row {self.image_ids[i]!r} has neither path nor image_bytes; re-create the manifest with `dcml ingest`")
        try:
            img = decode_image(src, self.mode, self.draft_size)
        except FileNotFoundError:
            raise DcmlError(f"{where}: image file not found; check the manifest root ({self.root}) or re-run `dcml ingest`") from None
        except Image.DecompressionBombError as exc:
            raise DcmlError(f"{where}: {bomb_message(exc)}") from None
        except Exception as exc:  # any decoder failure (truncated, corrupt, unsupported) is the file's fault
            detail = " ".join(str(exc).split())[:200] or type(exc).__name__
            raise DcmlError(f"{where}: cannot decode image ({detail}); remove or replace the file and re-run `dcml ingest`") from None
        return img

    def __getitem__(self, i: int):
        img = self.load_image(i)
        x = self.transform(img) if self.transform is not None else img
        return x, int(self.labels[i]), i
