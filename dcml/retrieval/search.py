"""Query images -> top-k gallery items, through the gallery model's own preprocessing.

A query is decoded exactly as a gallery image is (``dcml.algorithm.data.decode_image``,
JPEG draft included), transformed with the model's eval transform, embedded,
L2-normalised and searched in the index folder's faiss index. Query bytes
are checked first: an empty or oversized file, something that is not an
image, a truncated image or one of absurd dimensions is a one-line DcmlError.
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from dcml.contracts.errors import DcmlError
from dcml.retrieval.index import GalleryIndex, normalized

MAX_QUERY_BYTES = 20 << 20
MAX_QUERY_PIXELS = 40_000_000


def read_query_file(path: str | os.PathLike) -> bytes:
    """The bytes of a query image file, refusing a missing, empty or oversized one."""
    path = Path(path)
    if not path.is_file():
        raise DcmlError(f"{path}: no such image file; pass the path of a JPEG or PNG image")
    size = path.stat().st_size
    if size > MAX_QUERY_BYTES:
        raise DcmlError(f"{path}: {size / 2**20:.1f} MiB is more than the {MAX_QUERY_BYTES >> 20} MiB a query image "
                        "may have; downscale or re-compress it")
    return path.read_bytes()


def decode_query(data: bytes, name: str, mode: str | None = None, draft_size: int | None = None) -> Image.Image:
    """Decode query ``data`` (named ``name`` in errors) as the gallery images were decoded."""
    from dcml.algorithm.data import decode_image

    if not data:
        raise DcmlError(f"{name}: empty file; pass a JPEG or PNG image")
    if len(data) > MAX_QUERY_BYTES:
        raise DcmlError(f"{name}: {len(data) / 2**20:.1f} MiB is more than the {MAX_QUERY_BYTES >> 20} MiB a query "
                        "image may have; downscale or re-compress it")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own, lower limit applies
        width, height = _decoded(name, lambda: Image.open(io.BytesIO(data)).size)  # the header only
        if width * height > MAX_QUERY_PIXELS:
            raise DcmlError(f"{name}: {width} x {height} pixels is more than the {MAX_QUERY_PIXELS / 1e6:.0f} "
                            "megapixels a query image may have; downscale it")
        return _decoded(name, lambda: decode_image(io.BytesIO(data), mode, draft_size))


def _decoded(name: str, decode):
    """``decode()``, any decoder failure turned into a one-line DcmlError (the upload's fault, never a crash)."""
    try:
        return decode()
    except UnidentifiedImageError:
        raise DcmlError(f"{name}: not an image (no image format recognised); pass a JPEG, PNG, WebP, BMP, GIF "
                        "or TIFF file") from None
    except Image.DecompressionBombError as exc:
        raise DcmlError(f"{name}: absurdly large image ({exc}); downscale it") from None
    except Exception as exc:  # truncated, corrupt or unsupported: whatever the decoder raises
        detail = " ".join(str(exc).split())[:160] or type(exc).__name__
        raise DcmlError(f"{name}: truncated or corrupt image ({detail}); pass a complete image file") from None


class Searcher:
    """An index folder with its model, ready to answer query images."""

    def __init__(self, index_dir: str | os.PathLike, device: str = "cpu"):
        from dcml.algorithm.data import build_transform
        from dcml.model_files import load_model

        self.gallery = GalleryIndex.open(index_dir)
        from dcml.algorithm.inference import device_for

        device = device_for(device)
        self.model, _ = load_model(self.gallery.model_file, device=device)
        self.device = device
        self.transform = build_transform(self.model.config, train=False)
        dim = int(self.gallery.index.d)
        if self.model.embedding_dim != dim:
            raise DcmlError(f"{self.gallery.path}: its model embeds into {self.model.embedding_dim} dimensions but "
                            f"the index holds {dim}; rebuild it with `dcml index`")

    def decode(self, data: bytes, name: str) -> Image.Image:
        return decode_query(data, name, self.transform.mode, self.transform.draft_size)

    def embed(self, images: list[Image.Image]) -> np.ndarray:
        """Normalised embeddings [len(images), dim] (the eval transform, no autograd)."""
        import torch

        batch = torch.stack([self.transform(img) for img in images]).to(self.device)
        with torch.inference_mode():
            vectors = self.model(batch).float().cpu().numpy()
        return normalized(vectors, "query embeddings")

    def search(self, images: list[Image.Image], k: int = 10) -> list[list[dict]]:
        """Top-k hits per image (see GalleryIndex.search)."""
        return self.gallery.search(self.embed(images), k)
