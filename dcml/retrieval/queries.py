"""Query image bytes -> a decoded image, checked first, decoded as the gallery images were.

``dcml.algorithm.data.decode_image`` (JPEG draft included) does the decoding;
an empty or oversized file, something that is not an image, a truncated
image or one of absurd dimensions is a one-line DcmlError. Used by the
embedder (dcml.retrieval.embedder), search, the server and the CLI.
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from dcml.contracts.errors import DcmlError

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
