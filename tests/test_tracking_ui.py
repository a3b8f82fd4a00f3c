"""dcml's experiments open on their training runs in MLflow's UI (not the GenAI overview).

A real `mlflow server` on a free localhost port serves a store dcml logged to;
headless Chromium loads the link dcml prints (dcml.tracking.ui_url) and the
test reads what the page shows. MLflow 3.17's UI chooses between the runs and
the GenAI overview from its "workflow type" (default GenAI, remembered per
browser; a fresh browser opening a bare experiment URL lands on the GenAI
overview, even for an experiment tagged mlflow.experimentKind), so dcml both
tags its experiments as model training (custom_model_development) and links
with ?workflowType=machine_learning.
"""

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from dcml import tracking

pytestmark = [pytest.mark.skipif(not Path("/usr/bin/chromium").exists(),
                                 reason="/usr/bin/chromium is absent (`make browser` installs it as root)"),
              pytest.mark.slow]  # a real server and browser: `make test` starts this module first

_spec = importlib.util.spec_from_file_location("tracking_lineage", Path(__file__).with_name("tracking_lineage.py"))
_lineage = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_lineage)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """A store with dcml runs, served by a real `mlflow server` (one for the module: it starts in minutes)."""
    tmp_path = tmp_path_factory.mktemp("mlflow-ui")
    uri = f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}"
    metrics_path, emb = _lineage.fake_lineage(tmp_path, model=tmp_path / "model.pt")
    experiment_id = tracking.setup("ui-demo", uri)
    names, run_ids = [], []
    for run_name in (None, "second look"):  # the first logs and registers the model, the second links it
        run_id = tracking.log_pipeline_run(str(metrics_path), model=str(tmp_path / "model.pt"), embeddings=str(emb),
                                           experiment="ui-demo", run_name=run_name, tracking_uri=uri)
        names.append(MlflowClient(uri).get_run(run_id).info.run_name)
        run_ids.append(run_id)
    port = free_port()
    log = open(tmp_path / "server.log", "w")
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri,
                               "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                              stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 600  # a busy 2-core machine
        while True:
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=2):
                    break
            except OSError:
                assert server.poll() is None and time.time() < deadline, (tmp_path / "server.log").read_text()[-3000:]
                time.sleep(0.5)
        yield base, experiment_id, names, run_ids
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        log.close()


def render(chromium_command, url: str, *args: str) -> str:
    """Load ``url`` in a fresh headless Chromium; its stdout (the DOM with --dump-dom)."""
    cmd = chromium_command("--window-size=1400,900", "--virtual-time-budget=15000", *args, url)
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)  # MLflow's UI is heavy on a busy CPU
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def shot_and_page(chromium_command, url: str, stem: Path) -> str:
    """A screenshot of ``url`` (``<stem>.png``, printed) and its DOM (returned, and kept as ``<stem>.html``)."""
    screenshot = stem.with_suffix(".png")
    render(chromium_command, url, f"--screenshot={screenshot}")
    print(f"\nscreenshot of {url}: {screenshot}")
    assert screenshot.stat().st_size > 20_000
    page = render(chromium_command, url, "--dump-dom")
    stem.with_suffix(".html").write_text(page)
    return page


def test_the_experiment_link_opens_on_the_training_runs(mlflow_server, chromium_command, tmp_path):
    base, experiment_id, names, _ = mlflow_server
    assert names[0] == "fashion-mnist dc-shared K=2 margin seed0"
    with urllib.request.urlopen(f"{base}/api/2.0/mlflow/experiments/get?experiment_id={experiment_id}") as reply:
        tags = {t["key"]: t["value"] for t in json.load(reply)["experiment"]["tags"]}
    assert tags[tracking.EXPERIMENT_KIND_TAG] == "custom_model_development"

    page = shot_and_page(chromium_command, tracking.ui_url(experiment_id, base=base), tmp_path / "experiment")
    for name in names:
        assert name in page, f"run {name!r} not on the page (see {tmp_path / 'experiment.html'})"
    assert "matching runs" in page and "Run Name" in page  # the runs table
    assert "Detect Issues" not in page and "Evaluation runs" not in page  # the GenAI overview's


def test_the_run_page_shows_the_registered_model_and_the_headline(mlflow_server, chromium_command, tmp_path):
    """The delivered model is a logged model of the run, registered under the experiment's name with the
    alias candidate; the run's description is its headline."""
    import re

    base, experiment_id, names, run_ids = mlflow_server
    page = shot_and_page(chromium_command, tracking.ui_url(experiment_id, run_ids[0], base=base), tmp_path / "run")
    text = re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", re.sub(r"<style.*?</style>", " ", page, flags=re.S)))
    assert names[0] in text and "Description" in text
    assert "model: registered as ui-demo version 1 (the newest version has the alias candidate)" in text
    assert re.search(r"Logged models \(1\)", text) and re.search(r"Registered models .*ui-demo v1", text), \
        f"no registered model on the run page (see {tmp_path / 'run.html'})"
    assert "system/seconds.train" in text and "train/loss" in text  # bookkeeping apart from the curves

    registry = render(chromium_command, f"{base}/#/models/ui-demo", "--dump-dom")
    registry_text = re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", registry))
    assert "Version 1" in registry_text and "candidate" in registry_text and "Version 2" not in registry_text
