"""`dcml serve` against a real running server: HTTP API with a real client, the page in headless Chromium."""

from __future__ import annotations

import base64
import importlib.util
import io
import os
import re
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
from PIL import Image

from dcml.contracts import manifest as manifest_lib

REPO = Path(__file__).resolve().parents[1]
# Where the page's screenshot is kept (a test artifact, outside git).
ARTIFACTS = Path(os.environ.get("DCML_TEST_ARTIFACTS", REPO / "runs" / "test-artifacts"))

_spec = importlib.util.spec_from_file_location(
    "gallery_data", REPO / "components" / "index" / "tests" / "gallery_data.py")
gallery_data = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gallery_data)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(url: str, process, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args[0]} exited with {process.returncode}")
        try:
            requests.get(url, timeout=2)
            return
        except (requests.ConnectionError, requests.Timeout):  # the socket listens before the app is loaded
            time.sleep(0.3)
    raise RuntimeError(f"{url} did not answer within {seconds} s")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(base URL, manifest, server log file) of `dcml serve` over a JPEG gallery, in its own process."""
    folder = tmp_path_factory.mktemp("serve")
    manifest, _, _ = gallery_data.indexed_jpeg_gallery(folder)
    port = free_port()
    log = folder / "server.log"
    with open(log, "w") as out:
        process = subprocess.Popen([sys.executable, "-m", "dcml_app.cli", "serve", "--index", str(folder / "index"),
                                    "--port", str(port)], cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"},
                                   stdout=out, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(f"{url}/healthz", process)
        yield url, manifest_lib.read(manifest), log
    finally:
        process.terminate()
        process.wait(timeout=30)


@pytest.fixture(scope="module")
def server(served):
    """(base URL, manifest) of the module's `dcml serve`."""
    return served[:2]


def gallery_file(man, i: int) -> Path:
    return man.root / man.df["path"][i]


def start_server(index_dir: Path, port: int):
    return subprocess.Popen([sys.executable, "-m", "dcml_app.cli", "serve", "--index", str(index_dir),
                             "--port", str(port)], cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def post_image(url: str, path: Path, k: int = 5) -> dict:
    response = requests.post(f"{url}/search", params={"k": k}, timeout=30,
                             files={"image": (path.name, path.read_bytes(), "image/jpeg")})
    assert response.status_code == 200, response.text
    return response.json()


def wait_until(check, seconds: float = 60):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError("the server did not pick the change up")


def test_health_and_page(server):
    url, man = server
    health = requests.get(f"{url}/healthz", timeout=10).json()
    assert health["status"] == "ok" and health["images"] == len(man.df) == 40 and health["dim"] == 16
    assert health["index_type"] == "flat" and health["exact"] is True
    assert health["compiled"] is True  # the model runs traced (dcml.retrieval.embedder.compiled_forward)
    page = requests.get(url, timeout=10)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert 'id="file"' in page.text and 'id="drop"' in page.text and "/search" in page.text


def test_search_returns_the_query_first_with_k_neighbours(server):
    url, man = server
    for i in (0, 25):
        path = gallery_file(man, i)
        response = requests.post(f"{url}/search", params={"k": 5}, timeout=30,
                                 files={"image": (path.name, path.read_bytes(), "image/jpeg")})
        assert response.status_code == 200, response.text
        body = response.json()
        hits = body["neighbours"]
        assert body["k"] == 5 and len(hits) == 5
        assert hits[0]["id"] == i and hits[0]["image_id"] == man.df["image_id"][i]
        assert hits[0]["score"] == pytest.approx(1.0, abs=1e-5) and hits[0]["label"] == man.df["label"][i]
        assert all(h["url"] == f"/images/{h['id']}" and "path" not in h for h in hits)


def test_openapi_docs_batch_endpoint_and_one_k_limit(server):
    from dcml.retrieval.search import MAX_K
    from dcml_app.retrieval import search_cli
    from dcml_app.serve import MAX_BATCH

    url, man = server
    docs = requests.get(f"{url}/docs", timeout=10)
    assert docs.status_code == 200 and "swagger" in docs.text.lower()
    schema = requests.get(f"{url}/openapi.json", timeout=10).json()
    assert {"/search", "/search/batch", "/healthz", "/images/{item_id}"} <= set(schema["paths"])
    # One k limit: the CLI's option, the API's bound and what /healthz says.
    k_option = next(o for o in search_cli.params if o.name == "k")
    assert k_option.type.max == MAX_K == requests.get(f"{url}/healthz", timeout=10).json()["max_k"] == 1000
    path = gallery_file(man, 5)
    assert len(post_image(url, path, k=MAX_K)["neighbours"]) == 40  # k above the gallery size: all of it
    too_many = requests.post(f"{url}/search", params={"k": MAX_K + 1}, timeout=30,
                             files={"image": (path.name, path.read_bytes(), "image/jpeg")})
    assert too_many.status_code == 422 and f"less than or equal to {MAX_K}" in too_many.json()["detail"]
    # A batch: results in order, a bad image gets its error, the good ones their neighbours.
    files = [("images", ("a.jpg", gallery_file(man, 2).read_bytes(), "image/jpeg")),
             ("images", ("bad.png", b"not an image", "image/png")),
             ("images", ("b.jpg", gallery_file(man, 33).read_bytes(), "image/jpeg"))]
    body = requests.post(f"{url}/search/batch", params={"k": 3}, files=files, timeout=30).json()
    results = body["results"]
    assert [r["query"] for r in results] == ["a.jpg", "bad.png", "b.jpg"]
    assert results[0]["neighbours"][0]["id"] == 2 and results[2]["neighbours"][0]["id"] == 33
    assert len(results[0]["neighbours"]) == 3 and "not an image" in results[1]["error"] and "neighbours" not in results[1]
    over = [("images", (f"{i}.jpg", b"x", "image/jpeg")) for i in range(MAX_BATCH + 1)]
    refused = requests.post(f"{url}/search/batch", files=over, timeout=30)
    assert refused.status_code == 413 and f"the {MAX_BATCH} a batch may hold" in refused.json()["detail"]


def test_a_port_in_use_is_one_line_exit_2_without_a_banner(server):
    url, _ = server
    port = url.rsplit(":", 1)[1]
    index_dir = server[1].path.parent / "index"
    done = subprocess.run([sys.executable, "-m", "dcml_app.cli", "serve", "--index", str(index_dir), "--port", port],
                          cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2 and done.stdout == "", done.stdout
    err = done.stderr.strip()
    assert err == f"error: --port {port}: 127.0.0.1:{port} is already in use; pick another --port or stop what " \
                  "listens there", err


def test_appends_and_removals_are_served_without_a_restart(tmp_path):
    from dcml_app.cli import main as dcml_main

    manifest, model, _ = gallery_data.indexed_jpeg_gallery(tmp_path)
    man = manifest_lib.read(manifest)
    first = tmp_path / "first.parquet"
    manifest_lib.write(first, man.df.head(20), man.meta)
    index_dir = tmp_path / "live-index"
    dcml_main(["index", "--model", str(model), "--manifest", str(first), "--out", str(index_dir)])
    port = free_port()
    process = start_server(index_dir, port)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(f"{url}/healthz", process)
        health = requests.get(f"{url}/healthz", timeout=10).json()
        assert health["images"] == 20 and health["generation"] == 1
        assert requests.get(f"{url}/images/30", timeout=10).status_code == 404
        # Append the other 20 images while the server runs.
        dcml_main(["index", "--manifest", str(manifest), "--out", str(index_dir), "--append"])
        wait_until(lambda: requests.get(f"{url}/healthz", timeout=10).json()["images"] == 40)
        assert requests.get(f"{url}/images/30", timeout=10).status_code == 200
        assert post_image(url, gallery_file(man, 30))["neighbours"][0]["id"] == 30
        # Remove one: gone from results and thumbnails, the other ids unchanged.
        dcml_main(["index", "--out", str(index_dir), "--remove", "30", "--remove", "4"])
        wait_until(lambda: requests.get(f"{url}/healthz", timeout=10).json()["images"] == 38)
        assert requests.get(f"{url}/images/30", timeout=10).status_code == 404
        hits = post_image(url, gallery_file(man, 30), k=40)["neighbours"]
        assert len(hits) == 38 and not {30, 4} & {h["id"] for h in hits}
        assert post_image(url, gallery_file(man, 31))["neighbours"][0]["id"] == 31
        assert requests.get(f"{url}/healthz", timeout=10).json()["generation"] == 3
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_bad_uploads_get_a_clear_4xx_and_the_server_keeps_serving(server):
    url, man = server
    good = gallery_file(man, 3).read_bytes()

    def post(data=None, **kw):
        files = None if data is None else {"image": ("q.png", data, "image/png")}
        return requests.post(f"{url}/search", files=files, timeout=30, **kw)

    cases = [
        (post(b"this is not an image"), 400, "not an image"),
        (post(good[:len(good) // 3]), 400, "truncated or corrupt image"),
        (post(b""), 400, "empty file"),
        (requests.post(f"{url}/search", data={"other": "x"}, timeout=30), 422, "image: Field required"),
        (post(good, params={"k": 0}), 422, "k: Input should be greater than or equal to 1"),
        (post(b"\0" * (21 << 20)), 413, "more than the"),
        (requests.post(f"{url}/search", data=iter([good]), timeout=30), 411, "no Content-Length"),
    ]
    for response, status, message in cases:
        assert response.status_code == status, (status, response.text)
        detail = response.json()["detail"]
        assert message in detail and "\n" not in detail, detail
    big = io.BytesIO()
    Image.new("L", (8000, 6000)).save(big, format="PNG")
    huge = post(big.getvalue())
    assert huge.status_code == 400 and "megapixels" in huge.json()["detail"]
    # Still serving, with the right answers.
    assert requests.get(f"{url}/healthz", timeout=10).json()["status"] == "ok"
    assert post(good).json()["neighbours"][0]["id"] == 3


def test_thumbnails_only_for_ids_of_the_index(server):
    url, man = server
    response = requests.get(f"{url}/images/7", timeout=10)
    assert response.status_code == 200 and response.headers["content-type"] == "image/jpeg"
    thumb = Image.open(io.BytesIO(response.content))
    assert thumb.size == Image.open(gallery_file(man, 7)).size  # 40 x 30: smaller than a thumbnail already
    for bad in ("40", "-1", "abc", "..%2F..%2F..%2Fetc%2Fpasswd", "%2Fetc%2Fpasswd", "7.0"):
        response = requests.get(f"{url}/images/{bad}", timeout=10)
        assert response.status_code == 404, bad
        assert "root:" not in response.text
    # A raw path with dot segments (no client normalisation) is no way out either.
    with socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])), timeout=10) as s:
        s.sendall(b"GET /images/../../../../etc/passwd HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        raw = b""
        while chunk := s.recv(65536):
            raw += chunk
    assert raw.startswith(b"HTTP/1.1 404") and b"root:" not in raw


def open_page(tab, url: str) -> int:
    """Open the search page in ``tab`` (once it shows the index's 40 images); the node id of its file input."""
    tab("Page.enable")
    tab("DOM.enable")
    tab("Page.navigate", url=url)
    tab.wait("document.readyState === 'complete' && document.getElementById('info').textContent.includes('40')")
    return tab("DOM.querySelector", nodeId=tab("DOM.getDocument")["root"]["nodeId"], selector="#file")["nodeId"]


def test_page_in_headless_chromium_picks_or_drops_a_query_and_shows_its_neighbours(server, devtools_page, tmp_path):
    url, man = server
    tab = devtools_page
    node = open_page(tab, url)
    # Pick the query with the file chooser, as a person would.
    query = gallery_file(man, 12)
    tab("DOM.setFileInputFiles", nodeId=node, files=[str(query)])
    tab.wait("document.body.dataset.state === 'done'")
    cards = tab.evaluate("[...document.querySelectorAll('.hit')].map(c => ({text: c.innerText, "
                         "loaded: c.querySelector('img').complete && c.querySelector('img').naturalWidth > 0}))")
    assert len(cards) == 10 and all(c["loaded"] for c in cards)
    assert cards[0]["text"].startswith("#1 score 1.000") and man.df["class_name"][12] in cards[0]["text"]
    assert f"id 12 · {man.df['image_id'][12]}" in cards[0]["text"]
    # Click a neighbour: a larger view of it opens (a bigger picture than the 40 x 30 thumbnail allows
    # would be upscaled: the view shows the image at least 256 px wide), a click closes it.
    tab.evaluate("document.querySelector('.hit img').click()")
    tab.wait("document.getElementById('large').classList.contains('open') && "
             "document.getElementById('large-img').complete && document.getElementById('large-img').naturalWidth > 0")
    assert tab.evaluate("document.getElementById('large-img').getBoundingClientRect().width") >= 256
    assert man.df["image_id"][12] in tab.evaluate("document.getElementById('large-caption').textContent")
    tab.evaluate("document.getElementById('large').click()")
    assert not tab.evaluate("document.getElementById('large').classList.contains('open')")
    assert tab.evaluate("document.getElementById('error').textContent") == ""
    shot = base64.b64decode(tab("Page.captureScreenshot", format="png")["data"])
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / "serve_page.png").write_bytes(shot)
    picture = Image.open(io.BytesIO(shot))
    assert picture.size[0] >= 1000
    # A bad file through the same page: the message shows, the page stays usable.
    bad = tmp_path / "notes.png"
    bad.write_text("not a picture")
    tab("DOM.setFileInputFiles", nodeId=node, files=[str(bad)])
    tab.wait("document.body.dataset.state === 'error'")
    assert "400: " in tab.evaluate("document.getElementById('error').textContent")
    # Drop another query onto the page: its neighbours replace the old ones.
    box = tab.evaluate("(({x, y, width, height}) => [x + width / 2, y + height / 2])"
                       "(document.getElementById('drop').getBoundingClientRect())")
    dropped = gallery_file(man, 31)
    data = {"items": [], "files": [str(dropped)], "dragOperationsMask": 1}
    for kind in ("dragEnter", "dragOver", "drop"):
        tab("Input.dispatchDragEvent", type=kind, x=box[0], y=box[1], data=data)
    tab.wait("document.body.dataset.state === 'done'")
    first = tab.evaluate("document.querySelector('.hit').innerText")
    assert first.startswith("#1 score 1.000") and man.df["class_name"][31] in first
    assert tab.evaluate("document.getElementById('error').textContent") == ""


def assert_same_hits(got: list[dict], alone: list[dict], tol: float = 1e-4) -> None:
    """``got`` (a batched answer) is ``alone`` (the query searched by itself): the same scores rank by rank and
    each id with its own score; only an id tied with the last place may differ (float rounding decides ties)."""
    assert len(got) == len(alone)
    for g, a in zip(got, alone):
        assert g["score"] == pytest.approx(a["score"], abs=tol)
    scores = {h["id"]: h["score"] for h in alone}
    for hit in got:
        assert hit["score"] == pytest.approx(scores.get(hit["id"], alone[-1]["score"]), abs=tol), (got, alone)


def searched_alone(searcher, path: Path, k: int) -> list[dict]:
    return searcher.search([searcher.decode(path.read_bytes(), path.name)], k)[0]


def decoded(searcher, man, i: int):
    return searcher.decode(gallery_file(man, i).read_bytes(), "q.jpg")


def test_queued_queries_are_embedded_together_and_answered_as_alone(tmp_path):
    from dcml.contracts.errors import DcmlError
    from dcml.retrieval.search import Searcher
    from dcml_app.batching import QueryBatcher

    manifest, _, index_dir = gallery_data.indexed_jpeg_gallery(tmp_path)
    man = manifest_lib.read(manifest)
    searcher = Searcher(index_dir)
    batcher = QueryBatcher(window_ms=5, max_batch=4)
    cases = list(zip(range(0, 40, 4), (3, 40, 5, 3, 40, 5, 3, 40, 5, 3)))
    answers = {}

    def ask(i, k):
        data = gallery_file(man, i).read_bytes()
        answers[i, k] = batcher.search(searcher, lambda: searcher.decode(data, "q.jpg"), k)

    threads = [threading.Thread(target=ask, args=case) for case in cases]
    for thread in threads:
        thread.start()
    wait_until(lambda: batcher.queued == len(cases))  # all waiting before the worker starts: batches of 4, 4, 2
    batcher.start()
    for thread in threads:
        thread.join(timeout=60)
    assert batcher.stats() == {"window_ms": 5.0, "max_batch": 4, "queries": 10, "batches": 3, "largest_batch": 4}
    assert sorted(answers) == sorted(cases)
    for (i, k), hits in answers.items():
        assert hits[0]["id"] == i and len(hits) == min(k, 40)
        assert_same_hits(hits, searched_alone(searcher, gallery_file(man, i), k))
    # An image that cannot be decoded: its error in its own thread, nothing queued.
    with pytest.raises(DcmlError, match="not an image"):
        batcher.search(searcher, lambda: searcher.decode(b"no picture", "bad.png"), 3)
    assert batcher.queued == 0 and batcher.stats()["queries"] == 10


def test_a_query_waits_only_for_queries_under_way(tmp_path):
    from dcml.retrieval.search import Searcher
    from dcml_app.batching import QueryBatcher

    manifest, _, index_dir = gallery_data.indexed_jpeg_gallery(tmp_path)
    man = manifest_lib.read(manifest)
    searcher = Searcher(index_dir)
    # A window far longer than the joins below allow: a query alone does not wait for it ...
    batcher = QueryBatcher(window_ms=120_000, max_batch=8).start()
    lone = threading.Thread(target=batcher.search, args=(searcher, lambda: decoded(searcher, man, 1), 5))
    lone.start()
    lone.join(timeout=60)
    assert not lone.is_alive() and batcher.stats()["batches"] == 1
    # ... a query whose image is still being decoded is waited for: both go in one batch.
    release = threading.Event()
    slow = threading.Thread(target=batcher.search, args=(
        searcher, lambda: release.wait(60) and decoded(searcher, man, 2), 5))
    slow.start()
    wait_until(lambda: batcher.decoding == 1)
    quick = threading.Thread(target=batcher.search, args=(searcher, lambda: decoded(searcher, man, 3), 5))
    quick.start()
    wait_until(lambda: batcher.queued == 1)
    release.set()
    for thread in (slow, quick):
        thread.join(timeout=60)
        assert not thread.is_alive()
    stats = batcher.stats()
    assert (stats["queries"], stats["batches"], stats["largest_batch"]) == (3, 2, 2)


def test_concurrent_http_queries_get_the_answers_of_unbatched_search(server):
    from dcml.retrieval.search import Searcher

    url, man = server
    searcher = Searcher(man.path.parent / "index")
    before = requests.get(f"{url}/healthz", timeout=10).json()["batching"]
    assert before["window_ms"] == 5.0 and before["max_batch"] == 32  # the defaults
    cases = [(i, k) for i in range(0, 40, 3) for k in (3, 7, 40)]
    with ThreadPoolExecutor(12) as pool:  # real concurrent clients, each its own connection
        answers = list(pool.map(lambda case: post_image(url, gallery_file(man, case[0]), k=case[1]), cases))
    for (i, k), answer in zip(cases, answers):
        assert answer["k"] == k and answer["neighbours"][0]["id"] == i
        assert_same_hits(answer["neighbours"], searched_alone(searcher, gallery_file(man, i), k))
    after = requests.get(f"{url}/healthz", timeout=10).json()["batching"]
    assert after["queries"] - before["queries"] == len(cases)
    # Twelve clients at once: some queries shared a forward pass (fewer batches than queries).
    assert 1 <= after["batches"] - before["batches"] < len(cases)
    assert 2 <= after["largest_batch"] <= 32


def test_access_log_has_one_line_per_request(served):
    url, man, log = served
    seen = len(log.read_text().splitlines())
    requests.get(f"{url}/healthz", timeout=10)
    post_image(url, gallery_file(man, 4), k=3)
    requests.get(f"{url}/images/999", timeout=10)
    requests.post(f"{url}/search", data=iter([b"x"]), timeout=30)  # refused before the app: logged all the same
    lines = wait_until(lambda: (new := log.read_text().splitlines()[seen:]) and len(new) >= 4 and new)
    assert len(lines) == 4, lines
    pattern = re.compile(r'^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ 127\.0\.0\.1 "(\S+ \S+)" (\d{3}) (\d+) B (\d+\.\d) ms$')
    parsed = [pattern.match(line) for line in lines]
    assert all(parsed), lines
    assert [(m[1], m[2]) for m in parsed] == [("GET /healthz", "200"), ("POST /search?k=3", "200"),
                                              ("GET /images/999", "404"), ("POST /search", "411")]
    assert all(int(m[3]) > 0 for m in parsed)


def test_docs_work_offline_in_chromium(server, chromium_command):
    url, _ = server
    html = requests.get(f"{url}/docs", timeout=10).text
    assert "/docs-assets/swagger-ui-bundle.js" in html and "/docs-assets/swagger-ui.css" in html
    assert not re.findall(r'(?:src|href)="https?://', html), html  # nothing from another host
    for asset in ("swagger-ui-bundle.js", "swagger-ui.css"):
        assert requests.get(f"{url}/docs-assets/{asset}", timeout=10).status_code == 200
    # A browser that can reach nothing but this server renders the documentation.
    done = subprocess.run(chromium_command("--window-size=1280,900", "--virtual-time-budget=15000",
                                           "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
                                           "--proxy-server=127.0.0.1:1", "--proxy-bypass-list=127.0.0.1",
                                           "--dump-dom", f"{url}/docs"),
                          capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    dom = done.stdout
    assert "opblock-summary-path" in dom, dom[-3000:]  # Swagger UI drew the operations
    for path in ("/search", "/search/batch", "/healthz", "/images/{item_id}"):
        assert f'data-path="{path}"' in dom, path


def test_page_reruns_on_k_and_shows_only_the_newest_query(server, devtools_page):
    url, man = server
    tab = devtools_page
    node = open_page(tab, url)
    # Before any query: no broken picture (every image shown has loaded; the preview waits for a query).
    assert tab.evaluate("[...document.images].every(i => i.getClientRects().length === 0 || "
                        "(i.complete && i.naturalWidth > 0))")
    assert tab.evaluate("document.getElementById('no-query').getClientRects().length") == 1
    # Two overlapping uploads: the first is held in the network until the second is under way.
    tab("Network.enable")
    tab("Fetch.enable", patterns=[{"urlPattern": "*/search?*", "requestStage": "Request"}])
    tab("DOM.setFileInputFiles", nodeId=node, files=[str(gallery_file(man, 12))])
    older = tab.wait_event("Fetch.requestPaused")
    tab("DOM.setFileInputFiles", nodeId=node, files=[str(gallery_file(man, 31))])
    failed = tab.wait_event("Network.loadingFailed", requestId=older["networkId"])
    assert failed["canceled"] is True  # the page aborted the older request
    newer = tab.wait_event("Fetch.requestPaused")
    tab("Fetch.continueRequest", requestId=newer["requestId"])
    tab.wait("document.body.dataset.state === 'done'")
    tab("Fetch.disable")
    cards = tab.evaluate("[...document.querySelectorAll('.hit')].map(c => c.innerText)")
    assert len(cards) == 10 and [c.split()[0] for c in cards] == [f"#{r}" for r in range(1, 11)]
    assert f"id 31 · {man.df['image_id'][31]}" in cards[0]
    assert tab.evaluate("document.getElementById('query-preview').naturalWidth") > 0
    assert tab.evaluate("document.getElementById('no-query').getClientRects().length") == 0
    # Fewer neighbours: the same query runs again with the new k.
    tab.evaluate("(() => { const k = document.getElementById('k'); k.value = '5'; "
                 "k.dispatchEvent(new Event('change')); })()")
    tab.wait("document.body.dataset.state === 'done' && document.querySelectorAll('.hit').length === 5")
    assert f"id 31 · {man.df['image_id'][31]}" in tab.evaluate("document.querySelector('.hit').innerText")
    assert tab.evaluate("document.getElementById('error').textContent") == ""
    # Under the results, what "match" means (this index has none; with one: test_verification's server test).
    rule = requests.get(f"{url}/healthz", timeout=30).json().get("match_threshold")
    shown = tab.evaluate("document.getElementById('decision').textContent")
    assert (shown.startswith(f"match = score >= {rule:.4f} (false-match rate ") and "impostor and" in shown
            if rule is not None else shown == ""), shown


def test_answers_on_kept_alive_connections_are_sent_at_once():
    """The served socket turns Nagle's algorithm off, and the connections it accepts inherit it: without it every
    answer on a kept-alive connection waited ~40 ms for the client's delayed ACK (measured: /search 64 ms vs 20)."""
    from dcml_app.serve import listening_socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = listening_socket("127.0.0.1", port)
    try:
        client = socket.create_connection(("127.0.0.1", port))
        accepted, _ = server.accept()
        with client, accepted:
            assert server.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
            assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
    finally:
        server.close()
