"""`dcml serve`: an HTTP search service over an index folder (FastAPI app, uvicorn server).

Routes (OpenAPI documentation at ``/docs``, schema at ``/openapi.json``):

* ``GET /``: a page to pick or drop a query image and see its neighbours
  (image id, score, match; click one for a larger view);
* ``POST /search?k=10``: multipart upload (field ``image``) -> JSON top-k
  (id, image_id, label, class_name, score, match, url of the thumbnail) and
  ``decision``: what ``match`` means (threshold, false- and true-match rates
  measured when it was chosen; null when the index has none);
* ``POST /search/batch?k=10``: up to :data:`MAX_BATCH` images (field
  ``images``, repeated) -> one result per image, in order; an unreadable one
  gets its ``error`` and the others their neighbours;
* ``GET /images/{id}?size=192``: the JPEG of gallery item ``id`` at most
  ``size`` pixels a side (only ids of the index; nothing else on disk can be named);
* ``GET /healthz``: status, what the index holds and how queries are batched;
* ``GET /docs``: Swagger UI, its scripts served from here (``fastapi-offline``'s
  copy), so the page works without Internet access.

Concurrent ``/search`` queries are embedded together (dcml_app.batching: at
most ``--batch-max`` queries, waiting at most ``--batch-window-ms`` for
queries already being received); each query's answer is the one it gets alone.
The server log has one line per request (time, client, request line, status,
bytes, milliseconds).

k is at most :data:`dcml.retrieval.search.MAX_K` here as in ``dcml search``.
The index folder is watched: when ``dcml index --append / --remove`` (or
``dcml.Index.save``) replaces it, the next request is answered from the new
one (its ``index.json`` changed), without a restart; the model is re-loaded
only when the index's model changed.

A bad upload (not an image, truncated, absurd dimensions, missing field) is a
4xx with a one-line ``detail``; the server keeps serving. Requests larger
than the bound, or uploads without a Content-Length, are refused before
their body is read.
"""

from __future__ import annotations

import copy
import errno
import os
import socket
import sys
import threading
import time
from functools import lru_cache
from importlib import resources
from pathlib import Path

import click
from fastapi import File, HTTPException, Query, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response

from dcml.contracts.errors import DcmlError
from dcml.retrieval.queries import MAX_QUERY_BYTES
from dcml.retrieval.rerank import DEFAULT as RERANK_DEFAULT, HELP as RERANK_HELP, QueryExpansion
from dcml.retrieval.search import MAX_K
from dcml_app.batching import BATCH_MAX, BATCH_WINDOW_MS, QueryBatcher

# The query image plus the multipart envelope.
MAX_REQUEST_BYTES = MAX_QUERY_BYTES + (64 << 10)
MAX_BATCH = 16
MAX_BATCH_BYTES = 64 << 20  # a batch request, all its images together
THUMBNAIL_SIDE = 192
MAX_IMAGE_SIDE = 1024
PAGE = "static/search.html"
DOCS_ASSETS = "/docs-assets"  # Swagger UI's script and style, served from the fastapi-offline package


class BodyLimit:
    """ASGI middleware: refuse a request body above its route's limit (413), or of unknown length (411)."""

    def __init__(self, app, limit: int, limits: dict[str, int] | None = None):
        self.app, self.limit, self.limits = app, limit, limits or {}

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["method"] in ("POST", "PUT", "PATCH"):
            headers = dict(scope["headers"])
            length = headers.get(b"content-length")
            limit = self.limits.get(scope.get("path", ""), self.limit)
            if length is None or not length.isdigit():
                return await _reply(send, 411, "the request has no Content-Length; send the upload with its length")
            if int(length) > limit:
                return await _reply(send, 413, f"the request is {int(length) / 2**20:.1f} MiB, more than the "
                                               f"{limit / 2**20:.1f} MiB allowed; send a smaller image")
        await self.app(scope, receive, send)


class AccessLog:
    """ASGI middleware: one line per HTTP request, once answered, through ``write``:
    time (UTC), client, request line, status, response bytes, milliseconds."""

    def __init__(self, app, write):
        self.app, self.write = app, write

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0, answer = time.perf_counter(), {"status": 0, "bytes": 0}

        async def logged_send(message):
            if message["type"] == "http.response.start":
                answer["status"] = message["status"]
            elif message["type"] == "http.response.body":
                answer["bytes"] += len(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, receive, logged_send)
        finally:
            query = scope.get("query_string", b"").decode("latin-1")
            target = scope.get("path", "") + (f"?{query}" if query else "")
            client = scope.get("client") or ("-", 0)
            self.write(f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())} {client[0]} "
                       f"\"{scope['method']} {target}\" {answer['status'] or '-'} {answer['bytes']} B "
                       f"{1000 * (time.perf_counter() - t0):.1f} ms")


async def _reply(send, status: int, detail: str) -> None:
    import json

    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


class LiveIndex:
    """The served index folder, opened again when dcml replaces it (its ``index.json`` changes).

    A folder being swapped (briefly missing) or unreadable keeps the current one serving.
    """

    def __init__(self, index_dir, device=None, rerank=None, compiled: bool = True):
        from dcml.retrieval.search import Searcher

        self.dir, self.device, self.rerank, self.compiled = Path(index_dir), device, rerank, compiled
        self.searcher = Searcher(index_dir, device=device, rerank=rerank, compiled=compiled)
        self.signature = self._signature()
        self.generation = 1
        self._lock = threading.Lock()

    def _signature(self):
        from dcml.retrieval.index import META_FILE

        st = os.stat(self.dir / META_FILE)
        return st.st_ino, st.st_mtime_ns, st.st_size

    def current(self):
        """The Searcher of the folder as it is now."""
        try:
            signature = self._signature()
        except OSError:
            return self.searcher
        if signature == self.signature:
            return self.searcher
        with self._lock:
            if signature != self.signature:
                self._reload(signature)
        return self.searcher

    def _reload(self, signature) -> None:
        from dcml.retrieval.index import GalleryIndex
        from dcml.retrieval.search import Searcher

        try:
            gallery = GalleryIndex.open(self.dir)
            if gallery.meta["model"]["sha256"] != self.searcher.gallery.meta["model"]["sha256"]:
                searcher = Searcher(self.dir, device=self.device, rerank=self.rerank, compiled=self.compiled)
            else:
                searcher = copy.copy(self.searcher)
                searcher.gallery = gallery
                gallery.rerank = self.rerank
        except (DcmlError, OSError):  # caught mid-swap: the next request looks again
            return
        self.searcher, self.signature = searcher, signature
        self.generation += 1


def _hits_for_the_web(hits: list[dict]) -> list[dict]:
    for hit in hits:
        hit.pop("path")  # the server's file system is nobody's business
        hit["url"] = f"/images/{hit['id']}"
    return hits


def _decision(searcher) -> dict | None:
    """What ``match`` means in an answer: threshold and measured rates (dcml.retrieval.verify.decision), and
    ``text``, the line `dcml search` prints (the page shows it as it is)."""
    from dcml.retrieval.verify import decision, describe

    rule = decision(searcher.gallery.meta.get("verification"))
    return {**rule, "text": describe(rule)} if rule else None


def create_app(index_dir, device: str | None = None, max_request_bytes: int = MAX_REQUEST_BYTES,
               batch_window_ms: float = BATCH_WINDOW_MS, batch_max: int = BATCH_MAX, access_log=None,
               rerank: str | None = None, compiled: bool = True):
    """The ASGI application serving ``index_dir`` (its model loaded once, here); ``access_log``: a
    callable given one line per request (none logged without it); ``compiled``: the model runs traced
    (dcml.retrieval.embedder.Embedder; falls back to the model as it is, ``/healthz`` says which)."""
    from fastapi_offline import FastAPIOffline

    from dcml.algorithm.data import decode_image
    from dcml.retrieval.pictures import thumbnail_jpeg

    live = LiveIndex(index_dir, device, QueryExpansion.parse(rerank), compiled)
    if compiled and live.searcher.embedder.compile_error:
        print(f"dcml serve: the model runs uncompiled ({live.searcher.embedder.compile_error})", file=sys.stderr)
    batcher = QueryBatcher(batch_window_ms, batch_max).start()
    page = resources.files("dcml_app").joinpath(PAGE).read_text(encoding="utf-8")
    app = FastAPIOffline(title="dcml search", version="1", docs_url="/docs", redoc_url=None,
                         openapi_url="/openapi.json", static_url=DOCS_ASSETS,
                         description=f"Image search over a dcml index folder. k is 1..{MAX_K} (as in `dcml "
                                     f"search`); a batch holds at most {MAX_BATCH} images; an image may have "
                                     f"{MAX_QUERY_BYTES >> 20} MiB. `match` is true when a hit's score reaches the "
                                     "index's match threshold (null when the index has none).")

    @app.exception_handler(DcmlError)
    async def bad_query(_, exc: DcmlError):
        return JSONResponse({"detail": str(exc)}, status_code=400)

    @app.exception_handler(RequestValidationError)
    async def bad_request(_, exc: RequestValidationError):
        parts = [f"{'.'.join(str(p) for p in e.get('loc', ()) if p not in ('body', 'query'))}: {e.get('msg')}"
                 for e in exc.errors()]
        return JSONResponse({"detail": "; ".join(parts) + "; upload the query image as multipart/form-data field "
                                       f"'image' ('images' for /search/batch) and pass k between 1 and {MAX_K}"},
                            status_code=422)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def index_page():
        return page

    @app.get("/healthz", summary="Status and what the index holds")
    def healthz():
        searcher = live.current()
        gallery = searcher.gallery
        return {"status": "ok", "images": gallery.size, "dim": int(gallery.index.d), "index_type": gallery.meta["type"],
                "exact": gallery.meta["exact"], "recall@10": gallery.meta["recall@10"],
                "match_threshold": gallery.threshold, "generation": live.generation, "max_k": MAX_K,
                "max_batch": MAX_BATCH, "max_upload_bytes": MAX_QUERY_BYTES, "batching": batcher.stats(),
                "compiled": searcher.embedder.forward is not searcher.embedder.net}

    @app.post("/search", summary="Top-k gallery images of one query image")
    def search(image: UploadFile = File(..., description="The query image (JPEG, PNG, ...)."),
               k: int = Query(10, ge=1, le=MAX_K, description=f"Neighbours, 1..{MAX_K}.")):
        t0 = time.perf_counter()
        searcher = live.current()
        hits = _hits_for_the_web(batcher.search(
            searcher, lambda: searcher.decode(image.file.read(MAX_QUERY_BYTES + 1), image.filename or "upload"), k))
        return {"k": k, "took_ms": round(1000 * (time.perf_counter() - t0), 1), "decision": _decision(searcher),
                "neighbours": hits}

    @app.post("/search/batch", summary=f"Top-k gallery images of up to {MAX_BATCH} query images")
    def search_batch(images: list[UploadFile] = File(..., description="The query images, field repeated."),
                     k: int = Query(10, ge=1, le=MAX_K, description=f"Neighbours, 1..{MAX_K}.")):
        t0 = time.perf_counter()
        if len(images) > MAX_BATCH:
            raise HTTPException(413, f"{len(images)} images is more than the {MAX_BATCH} a batch may hold; "
                                     "split the request")
        searcher = live.current()
        results, decoded = [], []
        for i, upload in enumerate(images):
            name = upload.filename or f"upload {i}"
            try:
                decoded.append(searcher.decode(upload.file.read(MAX_QUERY_BYTES + 1), name))
                results.append({"query": name})
            except DcmlError as exc:
                results.append({"query": name, "error": str(exc)})
        found = iter(searcher.search(decoded, k) if decoded else [])
        for result in results:
            if "error" not in result:
                result["neighbours"] = _hits_for_the_web(next(found))
        return {"k": k, "took_ms": round(1000 * (time.perf_counter() - t0), 1), "decision": _decision(searcher),
                "results": results}

    @lru_cache(maxsize=4096)
    def picture_of(item_id: int, side: int) -> bytes:
        # ids are never reused (dcml.retrieval.index), so an id's picture never changes
        return thumbnail_jpeg(decode_image(live.current().gallery.image_source(item_id)), side)

    @app.get("/images/{item_id}", summary="A gallery image (JPEG), at most `size` pixels a side")
    def image(item_id: str, size: int = Query(THUMBNAIL_SIDE, ge=16, le=MAX_IMAGE_SIDE)):
        gallery = live.current().gallery
        if not item_id.isdigit() or not gallery.has(int(item_id)):
            raise HTTPException(404, f"no image {item_id!r} in the index")
        try:
            body = picture_of(int(item_id), size)
        except (OSError, ValueError, SyntaxError) as exc:
            raise HTTPException(404, f"gallery image {item_id} cannot be read ({exc})") from None
        return Response(body, media_type="image/jpeg", headers={"Cache-Control": "public, max-age=86400"})

    app = BodyLimit(app, max_request_bytes, {"/search/batch": MAX_BATCH_BYTES})
    return AccessLog(app, access_log) if access_log else app


def listening_socket(host: str, port: int) -> socket.socket:
    """A socket bound to host:port and listening; an address in use is a one-line DcmlError."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # Connections accepted from a socket handed to uvicorn kept Nagle's algorithm on: every answer on a
    # kept-alive connection waited for the client's delayed ACK (measured: /healthz 44 ms instead of 0.9 ms,
    # /search 64 ms instead of 20 ms). Accepted sockets inherit this option from the listening one.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise DcmlError(f"--port {port}: {host}:{port} is already in use; pick another --port or stop what "
                            "listens there") from None
        raise DcmlError(f"--host {host} --port {port}: cannot listen there ({exc.strerror}); pick another address "
                        "or port") from None
    return sock


@click.command(name="serve", help="Serve an index folder: search API (OpenAPI docs at /docs), thumbnails and a "
               f"web page. k is at most {MAX_K}, as in `dcml search`. Appends and removals made with `dcml index` "
               "on the folder are served without a restart.")
@click.option("--index", "index_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Index folder written by `dcml index`.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=8080, show_default=True, type=click.IntRange(1, 65535))
@click.option("--device", default=None, help="cpu | cuda | cuda:N (default: cuda when available).")
@click.option("--max-connections", default=64, show_default=True, type=click.IntRange(1),
              help="Concurrent connections beyond which requests get 503.")
@click.option("--batch-window-ms", default=BATCH_WINDOW_MS, show_default=True, type=click.FloatRange(0, 1000),
              help="Longest a /search query waits for concurrent ones being received, to be embedded together "
                   "(never when no other query is under way).")
@click.option("--batch-max", default=BATCH_MAX, show_default=True, type=click.IntRange(1, 256),
              help="Most /search queries embedded together; 1 turns batching off.")
@click.option("--access-log/--no-access-log", default=True, show_default=True,
              help="One line per request on stderr.")
@click.option("--rerank", default=RERANK_DEFAULT, show_default=True, help=RERANK_HELP)
@click.option("--compile/--no-compile", "compiled", default=True, show_default=True,
              help="Run the model traced and frozen (TorchScript): same embeddings, and the request threads work "
                   "beside it (measured on 2 CPU cores: 8 clients 1.98x one client, 1.29x without; BENCHMARKS).")
def serve_cli(index_dir, host, port, device, max_connections, batch_window_ms, batch_max, access_log, rerank,
              compiled):
    import uvicorn

    from dcml.algorithm.inference import resolve_device

    resolve_device(device)
    QueryExpansion.parse(rerank)  # checked before the port is taken
    sock = listening_socket(host, port)
    try:
        app = create_app(index_dir, device=device, batch_window_ms=batch_window_ms, batch_max=batch_max,
                         access_log=(lambda line: click.echo(line, err=True)) if access_log else None, rerank=rerank,
                         compiled=compiled)
    except BaseException:
        sock.close()
        raise
    click.echo(f"dcml serve: {index_dir} on http://{host}:{port}/ (API docs: /docs; Ctrl-C stops)")
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False,
                                           limit_concurrency=max_connections, timeout_keep_alive=5))
    server.run(sockets=[sock])
