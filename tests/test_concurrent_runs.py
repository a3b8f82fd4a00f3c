"""Three `dcml run`s at once in one folder all finish, each with its own run
folder and MLflow run, and the store stays intact (real pipeline runs)."""

import importlib.util
import json
import sqlite3
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # whole runs in processes: `make test` starts this module first

_spec = importlib.util.spec_from_file_location("cli_runs", Path(__file__).with_name("cli_runs.py"))
cli_runs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cli_runs)
bmp_dataset, dcml_run, tiny_config = cli_runs.bmp_dataset, cli_runs.dcml_run, cli_runs.tiny_config


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return bmp_dataset(tmp_path_factory.mktemp("data") / "shapes")


def test_three_runs_at_once_in_one_folder(data, tmp_path):
    out = tmp_path / "shared"
    procs = [dcml_run(tmp_path, tiny_config(data, seed=s), out, background=True) for s in range(3)]
    results = []
    for proc, summary in procs:
        stdout, stderr = proc.communicate(timeout=1200)
        assert proc.returncode == 0, stdout + stderr
        results.append(json.loads(summary.read_text()))
    assert len({r["run_dir"] for r in results}) == 3
    assert len({r["mlflow"]["mlflow_run_id"] for r in results}) == 3
    with sqlite3.connect(out / "mlflow.db") as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
