"""Fixtures shared by the tests in this folder (see tests/README.md for when to use which).

Pipeline
    ``tiny_pipeline_args``       a copy of ``TINY_PIPELINE``, the pipeline's parameters
                                 at their smallest (skips without Fashion-MNIST);
    ``tiny_pipeline``            one whole-pipeline run (kfp.local, a process per
                                 stage) of ``TINY_PIPELINE`` on real Fashion-MNIST,
                                 made once per test session and shared by every
                                 test that reads its outputs (run folder, metrics,
                                 lineage, MLflow store).

Browser
    ``chromium_command(*args)``  the command line of a headless Chromium with a
                                 fresh profile (skips when /usr/bin/chromium is absent);
    ``devtools_page``            a DevTools connection to the blank page of such a
                                 browser (``tab("Page.navigate", url=...)``,
                                 ``tab.evaluate(js)``, ``tab.wait(js)``).

Current Chromium refuses a DevTools websocket whose handshake carries an Origin
header unless started with ``--remote-allow-origins``; both are handled here
(the flag, and a client that sends no Origin), so the tests pass with any
Chromium since 111.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run", "--remote-allow-origins=*")


# The whole pipeline at its smallest: 24 images per class, two learners, two epochs.
TINY_PIPELINE = {
    "dataset": "fashion-mnist", "split_mode": "class-disjoint", "max_per_class": 24,
    "backbone": "small_cnn", "weights": "none", "image_size": 28, "embedding_dim": 32,
    "num_clusters": 2, "niter": 10, "classes_per_batch": 4, "images_per_class": 4,
    "lr_backbone": 1e-3, "lr_embedding": 1e-3, "epochs": 2, "recluster_every": 1,
    "finetune_epochs": 1, "eval_every": 1, "freeze_bn": False, "ks": "1,2,4",
    "experiment": "pytest",
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def chromium_command():
    """``chromium_command(*args)``: a headless Chromium's command line, each call with a fresh profile folder."""
    if not CHROMIUM.exists():
        pytest.skip("/usr/bin/chromium is absent (`make browser` installs it as root)")
    profiles = []

    def command(*args: str) -> list[str]:
        profiles.append(tempfile.mkdtemp(prefix="dcml-chromium-"))
        return [str(CHROMIUM), *CHROMIUM_FLAGS, f"--user-data-dir={profiles[-1]}", *args]

    yield command
    for profile in profiles:
        shutil.rmtree(profile, ignore_errors=True)


class DevTools:
    """The Chrome DevTools protocol over a websocket: send a command, wait for its answer."""

    def __init__(self, ws_url: str):
        import websocket

        # No Origin header: Chromium then accepts the connection whatever --remote-allow-origins says.
        self.ws = websocket.create_connection(ws_url, timeout=60, suppress_origin=True)
        self.next_id = 0
        self.events: list[dict] = []  # protocol events (of enabled domains) not yet taken by wait_event

    def __call__(self, method: str, **params) -> dict:
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.ws.recv())
            if message.get("id") == self.next_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message["result"]
            if "method" in message:
                self.events.append(message)

    def wait_event(self, method: str, seconds: float = 60, **match) -> dict:
        """The params of the first ``method`` event whose params include ``match`` (taken off ``events``)."""
        import websocket

        deadline = time.monotonic() + seconds
        while True:
            for event in self.events:
                if event["method"] == method and all(event["params"].get(k) == v for k, v in match.items()):
                    self.events.remove(event)
                    return event["params"]
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"timed out waiting for the event {method} {match or ''}")
            self.ws.settimeout(left)
            try:
                message = json.loads(self.ws.recv())
            except websocket.WebSocketTimeoutException:
                continue
            finally:
                self.ws.settimeout(60)
            if "method" in message:
                self.events.append(message)

    def evaluate(self, expression: str):
        return self("Runtime.evaluate", expression=expression, returnByValue=True)["result"].get("value")

    def wait(self, expression: str, seconds: float = 60):
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            value = self.evaluate(expression)
            if value:
                return value
            time.sleep(0.2)
        raise AssertionError(f"timed out waiting for {expression}")


def _wait_for_json(url: str, process: subprocess.Popen, seconds: float) -> list | dict:
    import requests

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"chromium exited with {process.returncode}")
        try:
            return requests.get(url, timeout=2).json()
        except (requests.ConnectionError, ValueError):
            time.sleep(0.3)
    raise RuntimeError(f"{url} did not answer within {seconds} s")


@pytest.fixture
def devtools_page(chromium_command):
    """A :class:`DevTools` connection to the blank page of a fresh headless Chromium (1280 x 900)."""
    port = free_port()
    browser = subprocess.Popen(chromium_command(f"--remote-debugging-port={port}", "--window-size=1280,900",
                                                "about:blank"),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    tab = None
    try:
        _wait_for_json(f"http://127.0.0.1:{port}/json/version", browser, 60)
        targets = _wait_for_json(f"http://127.0.0.1:{port}/json/list", browser, 30)
        page = next(t for t in targets if t["type"] == "page")
        tab = DevTools(page["webSocketDebuggerUrl"])
        yield tab
    finally:
        if tab is not None:
            tab.ws.close()
        browser.terminate()
        try:
            browser.wait(timeout=30)
        except subprocess.TimeoutExpired:
            browser.kill()
            browser.wait()


def fashion_mnist_folder() -> str | None:
    """Where Fashion-MNIST is installed, or None (then the tests that need it skip)."""
    from data_prep import fashion_mnist

    try:
        return fashion_mnist.locate(allow_download=False)
    except Exception:  # noqa: BLE001 - absent data means skip, whatever the reason
        return None


def _session_folder(tmp_path_factory) -> Path:
    """A folder every process of this test session sees (pytest-xdist workers share their parent's)."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


class TinyPipeline:
    """The shared run: ``result`` is what ``dcml_app.runner.run_local`` returned (``run_dir``,
    ``metrics``, ``metrics_file``, ``mlflow``, ``stages``); ``output_dir`` holds its runs,
    kfp.local cache and resume files; ``tracking_uri`` its sqlite MLflow store."""

    def __init__(self, folder: Path, result: dict):
        self.folder = folder
        self.output_dir = folder / "runs"
        self.tracking_uri = f"sqlite:///{folder / 'mlflow' / 'mlflow.db'}"
        self.result = result
        self.args = dict(TINY_PIPELINE)


@pytest.fixture
def tiny_pipeline_args() -> dict:
    """A copy of ``TINY_PIPELINE`` (skips when Fashion-MNIST is not installed)."""
    if fashion_mnist_folder() is None:
        pytest.skip("Fashion-MNIST not installed (make fashion-mnist)")
    return dict(TINY_PIPELINE)


@pytest.fixture(scope="session")
def tiny_pipeline(tmp_path_factory) -> TinyPipeline:
    """The whole pipeline run once on real Fashion-MNIST (``TINY_PIPELINE``), for tests that read its outputs.

    Made by the first test that asks for it; under pytest-xdist the other workers
    wait for it (a file lock) instead of running it again. Read it, never change
    it: tests that must run the pipeline again in its ``output_dir`` (to hit its
    cache) live in tests/test_local_pipeline.py, which runs in one process.
    """
    if fashion_mnist_folder() is None:
        pytest.skip("Fashion-MNIST not installed (make fashion-mnist)")
    folder = _session_folder(tmp_path_factory) / "tiny-pipeline"
    folder.mkdir(exist_ok=True)
    done = folder / "result.json"
    with open(folder / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if not done.is_file():
                from dcml_app.runner import run_local

                shared = TinyPipeline(folder, {})
                result = run_local(dict(TINY_PIPELINE), output_dir=shared.output_dir,
                                   tracking_uri=shared.tracking_uri)
                done.write_text(json.dumps(result))
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return TinyPipeline(folder, json.loads(done.read_text()))
