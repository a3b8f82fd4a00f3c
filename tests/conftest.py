"""Fixtures shared by the tests in this folder (see tests/README.md for when to use which).

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

import json
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

    def __call__(self, method: str, **params) -> dict:
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.ws.recv())
            if message.get("id") == self.next_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message["result"]

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
