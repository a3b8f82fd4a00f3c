"""A model ready to embed images: PIL images, image files (bad ones skipped and reported), manifests.

Every image goes through what the gallery went through: dcml's decoding
(``dcml.retrieval.queries.decode_query``: JPEG draft, colour mode, the same
size and pixel limits) and the model's eval transform. Embeddings come out
L2-normalised (unit length, so a dot product is the cosine score search
reports) unless ``normalize=False`` (then as the model returns them: each
slice unit-norm).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from dcml.contracts.errors import DcmlError
from dcml.retrieval.index import normalized

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
BATCH = 32


def image_files(folder: str | os.PathLike, recursive: bool = True) -> list[Path]:
    """The image files (by suffix) in ``folder`` and, with ``recursive``, its subfolders; sorted."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DcmlError(f"{folder}: no such folder; pass a folder of images")
    found = folder.rglob("*") if recursive else folder.iterdir()
    files = sorted(p for p in found if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                   and not any(part.startswith(".") for part in p.relative_to(folder).parts))
    if not files:
        where = "in it or its subfolders" if recursive else "directly in it (--recursive looks into subfolders)"
        raise DcmlError(f"{folder}: no image files ({', '.join(IMAGE_SUFFIXES)}) {where}; pass a folder of images")
    return files


@dataclass
class Embedded:
    """What embedding a list of files gave: the files that worked, their vectors, and the failures."""

    paths: list[str]
    vectors: np.ndarray
    failed: list[tuple[str, str]] = field(default_factory=list)  # (path, one-line reason)


COMPILED_ATOL = 1e-4  # a traced model's embeddings against the model's (unit-norm slices; folded BatchNorm)


def compiled_forward(net, transform, device) -> tuple[object, str | None]:
    """(``net`` traced and frozen with TorchScript, None), or (``net``, why not) when tracing fails or the
    traced module's embeddings of a test batch differ from the model's by more than COMPILED_ATOL."""
    import torch

    size = net.config["image_size"]
    channels = 1 if transform.mode == "L" else 3
    example = torch.randn(3, channels, size, size, generator=torch.Generator().manual_seed(0)).to(device)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TracerWarnings on the model's Python-side checks
            traced = torch.jit.freeze(torch.jit.trace(net.eval(), example[:2], check_trace=False))
            with torch.inference_mode():
                gap = float((traced(example) - net(example)).abs().max())  # another batch size than traced
    except Exception as exc:  # noqa: BLE001 - any tracing failure: the model runs as it is
        return net, f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
    if not gap <= COMPILED_ATOL:
        return net, f"the traced model's embeddings differ from the model's by {gap:.2e}"
    return traced, None


class Embedder:
    """A dcml model with its eval transform (``net`` from ``dcml.model_files.load_model``).

    ``compiled``: the forward pass runs as a traced and frozen TorchScript module
    (:func:`compiled_forward`): the same embeddings within float rounding, run by
    TorchScript's interpreter outside Python, so a server's request threads (HTTP,
    decoding) work beside it (bench_retrieval: 8 clients 1.98x one client, 1.29x
    without). When tracing fails, or its output differs from the
    model's, the model runs as it is and ``compile_error`` says why.
    """

    def __init__(self, net, device="cpu", compiled: bool = False):
        from dcml.algorithm.data import build_transform

        self.net, self.device = net, device
        self.transform = build_transform(net.config, train=False)
        self.forward, self.compile_error = net, None
        if compiled:
            self.forward, self.compile_error = compiled_forward(net, self.transform, device)

    @classmethod
    def load(cls, model_file: str | os.PathLike, device=None, compiled: bool = False) -> "Embedder":
        from dcml.algorithm.inference import resolve_device
        from dcml.model_files import load_model

        device = resolve_device(device)
        net, _ = load_model(model_file, device=device)
        return cls(net, device, compiled)

    @property
    def dim(self) -> int:
        return int(self.net.embedding_dim)

    def decode(self, data: bytes, name: str) -> Image.Image:
        from dcml.retrieval.queries import decode_query

        return decode_query(data, name, self.transform.mode, self.transform.draft_size)

    def read(self, path: str | os.PathLike) -> Image.Image:
        from dcml.retrieval.queries import read_query_file

        return self.decode(read_query_file(path), str(path))

    def embed_images(self, images: list[Image.Image], normalize: bool = True) -> np.ndarray:
        """Embeddings [len(images), dim] of decoded images (eval transform, no autograd)."""
        import torch

        if not images:
            return np.empty((0, self.dim), dtype=np.float32)
        chunks = (images[start:start + BATCH] for start in range(0, len(images), BATCH))
        vectors = np.concatenate([self.embed_pixels(torch.stack([self.transform(img) for img in chunk]), False)
                                  for chunk in chunks])
        return normalized(vectors, "embeddings") if normalize else vectors

    def embed_pixels(self, pixels, normalize: bool = True) -> np.ndarray:
        """Embeddings [N, dim] of images already through ``transform`` (stacked: [N, C, S, S]), in one pass."""
        import torch

        with torch.inference_mode():
            vectors = self.forward(pixels.to(self.device)).float().cpu().numpy()
        return normalized(vectors, "embeddings") if normalize else vectors

    def embed_files(self, paths, strict: bool = False, normalize: bool = True, desc: str | None = None) -> Embedded:
        """Embed image files; a file that cannot be read or decoded is listed in ``failed`` and skipped
        (``strict``: its DcmlError is raised instead). A progress bar on a terminal when ``desc`` is given."""
        return self.embed_each([(str(p), lambda p=p: self.read(p)) for p in paths], strict, normalize, desc)

    def embed_rows(self, manifest, rows, strict: bool = False, normalize: bool = True,
                   desc: str | None = None) -> Embedded:
        """Embed manifest ``rows`` one image at a time, bad images skipped and reported (``paths``: image_ids)."""
        from dcml.algorithm.data import ManifestImageDataset

        dataset = ManifestImageDataset(manifest, rows.reset_index(drop=True), self.transform)
        ids = rows["image_id"].astype(str).tolist()
        return self.embed_each([(ids[i], lambda i=i: dataset.load_image(i)) for i in range(len(ids))], strict,
                               normalize, desc)

    def embed_each(self, named, strict: bool = False, normalize: bool = True, desc: str | None = None) -> Embedded:
        """Embed [(name, load() -> PIL image)] in batches; a load raising DcmlError is skipped and reported."""
        from dcml.contracts.events import progress

        done, vectors, failed = [], [], []
        batches = range(0, len(named), BATCH)
        if desc:
            batches = progress(batches, total=len(batches), desc=desc, unit="batch")
        for start in batches:
            images = []
            for name, load in named[start:start + BATCH]:
                try:
                    images.append(load())
                except DcmlError as exc:
                    if strict:
                        raise
                    failed.append((name, str(exc)))
                    continue
                done.append(name)
            if images:
                vectors.append(self.embed_images(images, normalize))
        matrix = np.concatenate(vectors) if vectors else np.empty((0, self.dim), dtype=np.float32)
        return Embedded(done, matrix, failed)

    def embed_manifest(self, manifest, rows, batch_size: int = 128, num_workers: int = 0, desc: str | None = None,
                       normalize: bool = True) -> np.ndarray:
        """Embeddings of manifest ``rows`` (a DataLoader over the manifest's images; bad images are errors)."""
        from dcml.algorithm.inference import compute_vectors

        vectors = compute_vectors(self.net, manifest, rows, kind="embedding", batch_size=batch_size,
                                  device=self.device, num_workers=num_workers, desc=desc)
        return normalized(vectors, str(getattr(manifest, "path", "manifest"))) if normalize and len(vectors) else vectors
