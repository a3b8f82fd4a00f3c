"""Micro-batching for `dcml serve`: concurrent single-image queries embedded in one forward pass.

Each ``POST /search`` request thread reads and decodes its image and puts it
through the model's eval transform (so this work of many requests runs
beside the model's), then hands it to the :class:`QueryBatcher` and waits.
One worker thread takes what is queued, up to ``max_batch`` queries, embeds
them together (the model's batched forward pass: cheaper per image than one
at a time) and searches the index with the batch's vectors, each query with
its own k.

How long the worker waits for a batch to fill: while other requests are
still reading or decoding their image (their query is on the way), at most
``window`` seconds after it took the first query; never when no other
request is under way, so a lone client pays no waiting. ``max_batch=1``
turns batching off. Queries against different generations of a live index
(an append while queries wait) are embedded and searched per generation.

Batching changes no answer: a query's neighbours and scores are those of
searching it alone (within float rounding: a batched forward pass and a
batched faiss search sum in another order).
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field

BATCH_WINDOW_MS = 5.0
BATCH_MAX = 32


@dataclass
class _Query:
    searcher: object  # dcml.retrieval.search.Searcher: its model and gallery
    pixels: object  # the image through the model's eval transform: a [C, S, S] tensor
    k: int
    answer: Future = field(default_factory=Future)


class QueryBatcher:
    """Queries from many threads, answered in batches by one worker thread (started by :meth:`start`)."""

    def __init__(self, window_ms: float = BATCH_WINDOW_MS, max_batch: int = BATCH_MAX):
        self.window, self.max_batch = window_ms / 1000, max_batch
        self._cond = threading.Condition()
        self._queue: list[_Query] = []
        self._coming = 0  # requests reading or decoding their image
        self._thread: threading.Thread | None = None
        self.queries = self.batches = self.largest = 0

    def start(self) -> "QueryBatcher":
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name="dcml-query-batcher", daemon=True)
            self._thread.start()
        return self

    @property
    def queued(self) -> int:
        with self._cond:
            return len(self._queue)

    @property
    def decoding(self) -> int:
        """Requests reading or decoding their image, whose queries the worker may wait for."""
        with self._cond:
            return self._coming

    def stats(self) -> dict:
        with self._cond:
            return {"window_ms": round(self.window * 1000, 3), "max_batch": self.max_batch, "queries": self.queries,
                    "batches": self.batches, "largest_batch": self.largest}

    def search(self, searcher, load_image, k: int) -> list[dict]:
        """Top-k hits (GalleryIndex.search) of the image ``load_image()`` returns, searched in a batch.

        ``load_image`` and the eval transform run in the calling thread; what they raise is raised here
        and nothing is queued.
        """
        with self._cond:
            self._coming += 1
        try:
            query = _Query(searcher, searcher.transform(load_image()), k)
        except BaseException:
            self._arrived(None)
            raise
        self._arrived(query)
        return query.answer.result()

    def _arrived(self, query: _Query | None) -> None:
        """A request's image is decoded (``query``) or failed (None): it is no longer on the way."""
        with self._cond:
            self._coming -= 1
            if query is not None:
                self._queue.append(query)
            self._cond.notify_all()

    def _work(self) -> None:
        while True:
            self._answer(self._next_batch())

    def _next_batch(self) -> list[_Query]:
        with self._cond:
            while not self._queue:
                self._cond.wait()
            deadline = time.monotonic() + self.window
            while len(self._queue) < self.max_batch and self._coming > 0:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            batch, self._queue = self._queue[:self.max_batch], self._queue[self.max_batch:]
            self.queries += len(batch)
            self.batches += 1
            self.largest = max(self.largest, len(batch))
            return batch

    @staticmethod
    def _answer(batch: list[_Query]) -> None:
        import torch

        generations: dict[int, list[_Query]] = {}
        for query in batch:
            generations.setdefault(id(query.searcher), []).append(query)
        for queries in generations.values():
            searcher = queries[0].searcher
            try:
                vectors = searcher.embedder.embed_pixels(torch.stack([q.pixels for q in queries]))
                for k in sorted({q.k for q in queries}):
                    rows = [i for i, q in enumerate(queries) if q.k == k]
                    for i, hits in zip(rows, searcher.gallery.search(vectors[rows], k)):
                        queries[i].answer.set_result(hits)
            except Exception as exc:  # noqa: BLE001 - the waiting requests get the error, the worker lives on
                for query in queries:
                    if not query.answer.done():
                        query.answer.set_exception(exc)
