"""Three track steps at once on a fresh store: one schema, one experiment, three runs.

Before the store lock, MLflow's schema set-up raced (`sqlite3.OperationalError:
table latest_metrics already exists`, alembic revision mismatches) and so did
experiment creation. Real processes, a real sqlite file, released together.
"""

import importlib.util
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

pytestmark = pytest.mark.slow  # whole runs in processes: `make test` starts this module first
ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("tracking_lineage", Path(__file__).with_name("tracking_lineage.py"))
_lineage = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_lineage)

TRACK_STEP = """
import sys, time
from pathlib import Path
import mlflow, torch  # the slow imports happen before the start line
from dcml import tracking
metrics, uri, ready, go, name = sys.argv[1:6]
Path(ready).write_text("ready")
while not Path(go).exists():
    time.sleep(0.005)
print(tracking.log_pipeline_run(metrics, experiment="together", run_name=name, tracking_uri=uri))
"""


def test_three_processes_create_and_use_one_fresh_store_at_once(tmp_path):
    db = tmp_path / "mlflow" / "mlflow.db"
    uri = f"sqlite:///{db}"
    script = tmp_path / "track.py"
    script.write_text(TRACK_STEP)
    go = tmp_path / "go"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    procs, readies = [], []
    for i in range(3):
        work = tmp_path / f"run{i}"
        work.mkdir()
        metrics_path, _ = _lineage.fake_lineage(work)
        ready = work / "ready"
        readies.append(ready)
        procs.append(subprocess.Popen([sys.executable, str(script), str(metrics_path), uri, str(ready), str(go),
                                       f"run {i}"], env=env, cwd=work, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    deadline = time.time() + 300
    while not all(r.exists() for r in readies):
        assert time.time() < deadline and all(p.poll() is None for p in procs), "a process died before the start"
        time.sleep(0.1)
    assert not db.exists()  # fresh: nobody has touched the store yet
    go.write_text("go")
    outputs = [p.communicate(timeout=600) for p in procs]
    for proc, (out, err) in zip(procs, outputs):
        assert proc.returncode == 0, err[-4000:]

    client = MlflowClient(uri)
    experiments = [e for e in client.search_experiments() if e.name == "together"]
    assert len(experiments) == 1
    runs = client.search_runs([experiments[0].experiment_id], filter_string="tags.`dcml.kind` = 'pipeline'")
    assert sorted(r.info.run_name for r in runs) == ["run 0", "run 1", "run 2"]
    assert {r.info.status for r in runs} == {"FINISHED"}
    assert sorted(r.info.run_id for r in runs) == sorted(out.strip().splitlines()[-1] for out, _ in outputs)
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    assert Path(f"{db}.lock").is_file()
