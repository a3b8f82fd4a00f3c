"""`dcml serve`: an HTTP search service over an index folder (FastAPI app, uvicorn server).

Routes:

* ``GET /``: a page to pick or drop a query image and see its neighbours;
* ``POST /search?k=10``: multipart upload (field ``image``) -> JSON top-k
  (id, image_id, label, class_name, score, url of the thumbnail);
* ``GET /images/{id}``: the JPEG thumbnail of gallery item ``id`` (only ids of
  the index; nothing else on disk can be named);
* ``GET /healthz``: status and what the index holds.

A bad upload (not an image, truncated, absurd dimensions, missing field) is a
4xx with a one-line ``detail``; the server keeps serving. Requests larger
than the bound, or uploads without a Content-Length, are refused before
their body is read.
"""

from __future__ import annotations

import time
from functools import lru_cache
from importlib import resources
from pathlib import Path

import click
from fastapi import FastAPI, File, HTTPException, Query, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response

from dcml.contracts.errors import DcmlError
from dcml.retrieval.search import MAX_QUERY_BYTES

# The query image plus the multipart envelope.
MAX_REQUEST_BYTES = MAX_QUERY_BYTES + (64 << 10)
MAX_K = 100
THUMBNAIL_SIDE = 192
PAGE = "static/search.html"


class BodyLimit:
    """ASGI middleware: refuse a request body above ``limit`` bytes (413), or of unknown length (411)."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["method"] in ("POST", "PUT", "PATCH"):
            headers = dict(scope["headers"])
            length = headers.get(b"content-length")
            if length is None or not length.isdigit():
                return await _reply(send, 411, "the request has no Content-Length; send the upload with its length")
            if int(length) > self.limit:
                return await _reply(send, 413, f"the request is {int(length) / 2**20:.1f} MiB, more than the "
                                               f"{self.limit / 2**20:.1f} MiB allowed; send a smaller image")
        await self.app(scope, receive, send)


async def _reply(send, status: int, detail: str) -> None:
    import json

    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


def create_app(index_dir, device: str = "cpu", max_request_bytes: int = MAX_REQUEST_BYTES):
    """The FastAPI application serving ``index_dir`` (its model loaded once, here)."""
    from dcml.algorithm.data import decode_image
    from dcml.retrieval.pictures import thumbnail_jpeg
    from dcml.retrieval.search import Searcher

    searcher = Searcher(index_dir, device=device)
    gallery = searcher.gallery
    page = resources.files("dcml_app").joinpath(PAGE).read_text(encoding="utf-8")
    app = FastAPI(title="dcml search", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(DcmlError)
    async def bad_query(_, exc: DcmlError):
        return JSONResponse({"detail": str(exc)}, status_code=400)

    @app.exception_handler(RequestValidationError)
    async def bad_request(_, exc: RequestValidationError):
        parts = [f"{'.'.join(str(p) for p in e.get('loc', ()) if p not in ('body', 'query'))}: {e.get('msg')}"
                 for e in exc.errors()]
        return JSONResponse({"detail": "; ".join(parts) + "; upload the query image as multipart/form-data field "
                                       f"'image' and pass k between 1 and {MAX_K}"}, status_code=422)

    @app.get("/", response_class=HTMLResponse)
    def index_page():
        return page

    @app.get("/healthz")
    def healthz():
        return {"status": "ok", "images": gallery.size, "dim": int(gallery.index.d), "index_type": gallery.meta["type"],
                "exact": gallery.meta["exact"], "recall@10": gallery.meta["recall@10"], "max_k": MAX_K,
                "max_upload_bytes": MAX_QUERY_BYTES}

    @app.post("/search")
    def search(image: UploadFile = File(...), k: int = Query(10, ge=1, le=MAX_K)):
        t0 = time.perf_counter()
        data = image.file.read(MAX_QUERY_BYTES + 1)
        picture = searcher.decode(data, image.filename or "upload")
        hits = searcher.search([picture], k)[0]
        for hit in hits:
            hit.pop("path")  # the server's file system is nobody's business
            hit["url"] = f"/images/{hit['id']}"
        return {"k": k, "took_ms": round(1000 * (time.perf_counter() - t0), 1), "neighbours": hits}

    @lru_cache(maxsize=4096)
    def thumbnail_of(item_id: int) -> bytes:
        return thumbnail_jpeg(decode_image(gallery.image_source(item_id)), THUMBNAIL_SIDE)

    @app.get("/images/{item_id}")
    def image(item_id: str):
        if not item_id.isdigit() or int(item_id) >= gallery.size:
            raise HTTPException(404, f"no image {item_id!r} in the index (ids are 0..{gallery.size - 1})")
        try:
            body = thumbnail_of(int(item_id))
        except (OSError, ValueError, SyntaxError) as exc:
            raise HTTPException(404, f"gallery image {item_id} cannot be read ({exc})") from None
        return Response(body, media_type="image/jpeg", headers={"Cache-Control": "public, max-age=86400"})

    return BodyLimit(app, max_request_bytes)


@click.command(name="serve", help="Serve an index folder: search API, thumbnails and a web page.")
@click.option("--index", "index_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Index folder written by `dcml index`.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=8080, show_default=True, type=click.IntRange(1, 65535))
@click.option("--device", default="cpu", show_default=True, help="cpu | cuda | cuda:N.")
@click.option("--max-connections", default=64, show_default=True, type=click.IntRange(1),
              help="Concurrent connections beyond which requests get 503.")
def serve_cli(index_dir, host, port, device, max_connections):
    import uvicorn

    app = create_app(index_dir, device=device)
    click.echo(f"dcml serve: {index_dir} on http://{host}:{port}/ (Ctrl-C stops)")
    uvicorn.run(app, host=host, port=port, log_level="warning", limit_concurrency=max_connections,
                timeout_keep_alive=5)
