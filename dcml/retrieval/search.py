"""Query images -> top-k gallery items, through the gallery model's own preprocessing.

A query is decoded exactly as a gallery image is (``dcml.algorithm.data.decode_image``,
JPEG draft included), transformed with the model's eval transform, embedded,
L2-normalised and searched in the index folder's faiss index. Query bytes
are checked first (dcml.retrieval.queries).
"""

from __future__ import annotations

import os

import numpy as np

from PIL import Image

from dcml.contracts.errors import DcmlError
from dcml.retrieval.index import GalleryIndex

MAX_K = 1000  # neighbours per query, the same bound for `dcml search`, the API and `dcml serve`


class Searcher:
    """An index folder with its model, ready to answer query images."""

    def __init__(self, index_dir: str | os.PathLike, device=None, rerank=None, compiled: bool = False):
        from dcml.retrieval.embedder import Embedder

        self.gallery = GalleryIndex.open(index_dir)
        self.gallery.rerank = rerank  # dcml.retrieval.rerank.QueryExpansion or None
        self.embedder = Embedder.load(self.gallery.model_file, device, compiled)  # compiled: see Embedder
        self.model, self.device, self.transform = self.embedder.net, self.embedder.device, self.embedder.transform
        dim = int(self.gallery.index.d)
        if self.embedder.dim != dim:
            raise DcmlError(f"{self.gallery.path}: its model embeds into {self.embedder.dim} dimensions but "
                            f"the index holds {dim}; rebuild it with `dcml index`")

    def decode(self, data: bytes, name: str) -> Image.Image:
        return self.embedder.decode(data, name)

    def embed(self, images: list[Image.Image]) -> np.ndarray:
        """Normalised embeddings [len(images), dim] (the eval transform, no autograd)."""
        return self.embedder.embed_images(images)

    def search(self, images: list[Image.Image], k: int = 10) -> list[list[dict]]:
        """Top-k hits per image (see GalleryIndex.search)."""
        return self.gallery.search(self.embed(images), k)
