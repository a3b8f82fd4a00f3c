"""`dcml serve` against a real running server: HTTP API with a real client, the page in headless Chromium."""

from __future__ import annotations

import base64
import importlib.util
import io
import os
import socket
import subprocess
import sys
import time
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
        except requests.ConnectionError:
            time.sleep(0.3)
    raise RuntimeError(f"{url} did not answer within {seconds} s")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """(base URL, manifest) of `dcml serve` over a JPEG gallery, in its own process."""
    folder = tmp_path_factory.mktemp("serve")
    manifest, _, _ = gallery_data.indexed_jpeg_gallery(folder)
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "dcml_app.cli", "serve", "--index", str(folder / "index"),
                                "--port", str(port)], cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"},
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(f"{url}/healthz", process)
        yield url, manifest_lib.read(manifest)
    finally:
        process.terminate()
        process.wait(timeout=30)


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


def test_page_in_headless_chromium_picks_or_drops_a_query_and_shows_its_neighbours(server, devtools_page, tmp_path):
    url, man = server
    tab = devtools_page
    tab("Page.enable")
    tab("DOM.enable")
    tab("Page.navigate", url=url)
    tab.wait("document.readyState === 'complete' && document.getElementById('info').textContent.includes('40')")
    # Pick the query with the file chooser, as a person would.
    query = gallery_file(man, 12)
    node = tab("DOM.querySelector", nodeId=tab("DOM.getDocument")["root"]["nodeId"], selector="#file")["nodeId"]
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
