"""`dcml submit` and `dcml compile` for a cluster, against real local HTTP servers standing in for the
Kubeflow Pipelines API (no Kubernetes here): one-line errors, data_root inside the PVC mount, parameters baked
into the YAML, what the cluster needs, the dry run, and the run request a working API receives."""

from __future__ import annotations

import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pytest
import yaml

from dcml_app.cli import main as dcml_main

BASE = ["--image-registry", "registry.example/ml", "--image-tag", "0123abcd"]


class FakeKFP(ThreadingHTTPServer):
    """A local HTTP server answering the KFP v2beta1 paths dcml submit uses, as told by ``answer``:
    "ok" (a single-user API that creates experiments and runs), "multi-user", "401", "404",
    "login-page", or "namespace" (multi-user; experiments in any namespace but "team-a" are refused)."""

    daemon_threads = True

    def __init__(self, answer: str):
        super().__init__(("127.0.0.1", 0), Handler)
        self.answer, self.requests = answer, []
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def _reply(self, status: int, body, kind: str = "application/json"):
        data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _handle(self, method: str):
        length = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(length)) if length else None
        url = urlparse(self.path)
        query = parse_qs(url.query)
        self.server.requests.append({"method": method, "path": url.path, "query": query, "body": body,
                                     "auth": self.headers.get("Authorization")})
        answer = self.server.answer
        if answer == "401":
            return self._reply(401, {"error": "jwt is missing", "code": 16, "message": "Unauthenticated: jwt is missing"})
        if answer == "404":
            return self._reply(404, "404 page not found", "text/plain")
        if url.path == "/apis/v2beta1/healthz":
            if answer == "login-page":
                return self._reply(200, "<html><body>Log in to Dex</body></html>", "text/html")
            return self._reply(200, {"commit_sha": "x", "tag_name": "2.5.0",
                                     "multi_user": answer in ("multi-user", "namespace")})
        namespace = query.get("namespace", [None])[0] or (body or {}).get("namespace")
        if answer == "namespace" and url.path.endswith("/experiments") and namespace != "team-a":
            return self._reply(403, {"error": "denied", "code": 7, "message": "PermissionDenied: user 'me' is not "
                                     f"allowed to use experiments in namespace '{namespace}'"})
        if url.path == "/apis/v2beta1/experiments" and method == "GET":
            return self._reply(200, {})  # none of that name yet
        if url.path == "/apis/v2beta1/experiments" and method == "POST":
            return self._reply(200, {"experiment_id": "exp-1", **body})
        if url.path == "/apis/v2beta1/runs" and method == "POST":
            return self._reply(200, {"run_id": "run-42", "display_name": body["display_name"]})
        return self._reply(404, {"message": f"no route {url.path}"})

    def do_GET(self):
        self._handle("GET")

    def do_POST(self):
        self._handle("POST")


@pytest.fixture
def kfp_server(request):
    servers = []

    def start(answer: str) -> FakeKFP:
        servers.append(FakeKFP(answer))
        return servers[-1]

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def dcml(capsys, *argv) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of `dcml ARGV` run in this process."""
    try:
        dcml_main(list(argv))
        code = 0
    except SystemExit as exc:
        code = exc.code
    out = capsys.readouterr()
    return code, out.out, out.err


def one_line_error(code: int, err: str, *fragments: str) -> str:
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def unused_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]  # closed on return: nothing listens there


def test_an_unreachable_host_is_one_line(capsys):
    code, out, err = dcml(capsys, "submit", "--host", f"http://127.0.0.1:{unused_port()}", *BASE,
                          "--config", "demo")
    one_line_error(code, err, "--host http://127.0.0.1:", "cannot reach the Kubeflow Pipelines API",
                   "Connection refused")
    assert out == ""


def test_a_host_that_is_not_a_url_is_one_line(capsys):
    code, _, err = dcml(capsys, "submit", "--host", "kfp.example.com", *BASE)
    one_line_error(code, err, "--host kfp.example.com", "http:// or https://")


@pytest.mark.parametrize("answer,fragments", [
    ("401", ("refused the credentials", "401", "Unauthenticated: jwt is missing", "--token")),
    ("404", ("no Kubeflow Pipelines v2 API there", "404")),
    ("login-page", ("not the Kubeflow Pipelines API", "login")),
    ("multi-user", ("multi-user", "pass --namespace")),
])
def test_a_refusing_host_is_one_line_and_nothing_is_created(capsys, kfp_server, answer, fragments):
    server = kfp_server(answer)
    code, out, err = dcml(capsys, "submit", "--host", server.url, *BASE, "--config", "demo")
    one_line_error(code, err, f"--host {server.url}", *fragments)
    assert [r["path"] for r in server.requests] == ["/apis/v2beta1/healthz"]  # asked once, no retries
    assert out == ""


def test_a_namespace_the_api_refuses_is_one_line_naming_it(capsys, kfp_server):
    server = kfp_server("namespace")
    code, _, err = dcml(capsys, "submit", "--host", server.url, "--namespace", "nope", *BASE, "--config", "demo")
    one_line_error(code, err, "--namespace nope", "403", "namespace 'nope'")
    assert not any(r["path"] == "/apis/v2beta1/runs" for r in server.requests)


def test_a_token_is_sent_and_a_run_is_created_with_the_parameters(capsys, kfp_server):
    server = kfp_server("namespace")
    code, out, err = dcml(capsys, "submit", "--host", server.url, "--namespace", "team-a", "--token", "t0k",
                          *BASE, "--config", "demo", "--set", "epochs=3", "--run-name", "nightly")
    assert code == 0, err
    assert "submitted run run-42" in out and f"{server.url}/#/runs/details/run-42" in out
    assert "the cluster needs:" in out
    assert all(r["auth"] == "Bearer t0k" for r in server.requests)
    run = next(r["body"] for r in server.requests if r["path"] == "/apis/v2beta1/runs")
    assert run["display_name"] == "nightly" and run["experiment_id"] == "exp-1"
    parameters = run["runtime_config"]["parameters"]
    assert parameters["epochs"] == 3 and parameters["backbone"] == "small_cnn"
    # the YAML sent carries the same values as its defaults
    defaults = run["pipeline_spec"]["pipeline_spec"]["root"]["inputDefinitions"]["parameters"]
    assert defaults["epochs"]["defaultValue"] == 3 and defaults["backbone"]["defaultValue"] == "small_cnn"


@pytest.mark.parametrize("root", ["/mnt/elsewhere/cars196", "../shared/data/cars196", "/data/../etc/cars"])
def test_data_root_outside_the_pvc_mount_is_one_line_before_anything_is_sent(capsys, kfp_server, tmp_path, root):
    server = kfp_server("ok")
    code, out, err = dcml(capsys, "submit", "--host", server.url, *BASE, "--config", "cars196",
                          "--set", f"data_root={root}")
    one_line_error(code, err, f"data_root {root}", "mounted at /data", "--set data_root=/data/")
    assert server.requests == [] and out == ""
    code, _, err = dcml(capsys, "compile", "--out", str(tmp_path / "p.yaml"), "--data-mount", "/datasets",
                        "--config", "cars196", "--set", "data_root=/data/cars196", *BASE)
    one_line_error(code, err, "data_root /data/cars196", "mounted at /datasets", "--set data_root=/datasets/cars196")
    assert not (tmp_path / "p.yaml").exists()


def test_compile_bakes_config_and_set_into_the_defaults_and_says_what_the_cluster_needs(capsys, tmp_path):
    out_file = tmp_path / "pipeline.yaml"
    code, out, err = dcml(capsys, "compile", "--out", str(out_file), *BASE, "--config", "cars196",
                          "--set", "data_root=/data/cars196", "--set", "epochs=7", "--data-pvc", "datasets",
                          "--mlflow-secret", "tracking", "--resume-dir", ".resume")
    assert code == 0, err
    spec = next(yaml.safe_load_all(out_file.read_text()))
    defaults = {k: v.get("defaultValue") for k, v in spec["root"]["inputDefinitions"]["parameters"].items()}
    assert defaults["data_root"] == "/data/cars196" and defaults["epochs"] == 7
    assert defaults["backbone"] == "efficientnet_lite0" and defaults["dataset"] == "cars196"
    assert defaults["lr_backbone"] == pytest.approx(1e-4) and defaults["experiment"] == "dcml-cars196"
    assert defaults["compress_bits"] == 0  # a parameter the preset leaves alone keeps its own default
    needs = out.split("the cluster needs:", 1)[1]
    images = sorted({e["container"]["image"] for e in spec["deploymentSpec"]["executors"].values()})
    assert f"{len(images)} to push" in needs and "REGISTRY=registry.example/ml TAG=0123abcd" in needs
    for image in images:
        assert image.rsplit("/", 1)[1] in needs
    assert "PVC datasets" in needs and "/data/cars196" in needs
    assert "/data/.resume writable" in needs
    assert "secret tracking with keys tracking_uri" in needs and "username" in needs and "password" in needs
    assert len(out.splitlines()) <= 8  # short: one line per need


def test_compile_with_no_parameters_keeps_the_parameters_own_defaults(capsys, tmp_path):
    from dcml.contracts import params

    code, out, err = dcml(capsys, "compile", "--out", str(tmp_path / "p.yaml"), *BASE)
    assert code == 0, err
    spec = next(yaml.safe_load_all((tmp_path / "p.yaml").read_text()))
    defaults = spec["root"]["inputDefinitions"]["parameters"]
    assert defaults["epochs"]["defaultValue"] == params.PARAMS["epochs"].default
    assert "0 parameter(s)" in out


def test_a_bad_set_value_fails_compile_before_writing(capsys, tmp_path):
    code, _, err = dcml(capsys, "compile", "--out", str(tmp_path / "p.yaml"), *BASE, "--set", "epochs=-1")
    one_line_error(code, err, "epochs")
    code, _, err = dcml(capsys, "compile", "--out", str(tmp_path / "p.yaml"), *BASE, "--gpus", "2",
                        "--set", "gpus_per_task=4")
    one_line_error(code, err, "gpus_per_task=4", "--gpus 2")
    assert not (tmp_path / "p.yaml").exists()


def test_dry_run_writes_the_yaml_and_the_request_and_sends_nothing(capsys, kfp_server, tmp_path):
    server = kfp_server("ok")
    folder = tmp_path / "dry"
    code, out, err = dcml(capsys, "submit", "--host", server.url, "--dry-run", "--out-dir", str(folder), *BASE,
                          "--config", "demo", "--set", "epochs=2", "--namespace", "team-a", "--run-name", "try")
    assert code == 0, err
    assert server.requests == []  # nothing sent, not even the health check
    assert "nothing sent" in out and "the cluster needs:" in out
    request = json.loads((folder / "run-request.json").read_text())
    assert request["host"] == server.url
    assert request["experiment"]["display_name"] == "dcml" and request["experiment"]["namespace"] == "team-a"
    body = request["create_run"]["body"]
    assert request["create_run"]["path"] == "/apis/v2beta1/runs" and body["display_name"] == "try"
    assert body["runtime_config"]["parameters"]["epochs"] == 2
    assert body["runtime_config"]["parameters"]["dataset"] == "fashion-mnist"
    spec = next(yaml.safe_load_all((folder / "pipeline.yaml").read_text()))
    assert spec["root"]["inputDefinitions"]["parameters"]["epochs"]["defaultValue"] == 2
    # the dry run's request is what a real submit sends
    code, _, err = dcml(capsys, "submit", "--host", server.url, *BASE, "--config", "demo", "--set", "epochs=2",
                        "--run-name", "try")
    assert code == 0, err
    sent = next(r["body"] for r in server.requests if r["path"] == "/apis/v2beta1/runs")
    assert sent["runtime_config"]["parameters"] == body["runtime_config"]["parameters"]
    assert sent["display_name"] == body["display_name"]
    assert sent["pipeline_spec"]["pipeline_spec"]["root"] == spec["root"]
