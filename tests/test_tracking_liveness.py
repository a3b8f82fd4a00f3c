"""A track step killed mid-way must not leave its MLflow parent run RUNNING forever.

The killing is real: a subprocess starts logging a pipeline run into a real
sqlite store, stops in the middle (after the parent and stage runs exist,
before the plots and the model), and is killed with SIGKILL.
"""

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from mlflow.tracking import MlflowClient

from dcml import tracking
from dcml.tracking import liveness
from dcml_app.cli import cli

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("tracking_lineage", Path(__file__).with_name("tracking_lineage.py"))
_lineage = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_lineage)
fake_lineage = _lineage.fake_lineage

# Log a pipeline run, but block once the parent run and its stage runs exist.
DOOMED_TRACK_STEP = """
import sys, time
from pathlib import Path
from dcml.tracking import runs

def block(*args, **kwargs):
    Path(sys.argv[3]).write_text("logging")
    time.sleep(3600)

runs.make_plots = block
runs.log_pipeline_run(sys.argv[1], experiment=sys.argv[4], run_name="doomed", tracking_uri=sys.argv[2])
"""


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return f"sqlite:///{tmp_path_factory.mktemp('liveness') / 'mlflow' / 'mlflow.db'}"


@pytest.fixture
def env_store(store, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    return store


def start_doomed_track_step(tmp_path, metrics_path, store, experiment):
    script = tmp_path / "doomed.py"
    script.write_text(DOOMED_TRACK_STEP)
    ready = tmp_path / "ready"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, str(script), str(metrics_path), store, str(ready), experiment],
                            env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 180
    while not ready.exists():
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            pytest.fail(f"the track step never got to the middle:\n{proc.stdout.read().decode()[-3000:]}")
        time.sleep(0.2)
    return proc


def doomed_run(client, experiment):
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], filter_string="attributes.run_name = 'doomed'")
    assert len(runs) == 1
    return runs[0]


def stages_of(client, run):
    return client.search_runs([run.info.experiment_id],
                              filter_string=f"tags.`mlflow.parentRunId` = '{run.info.run_id}'")


def kill(proc):
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL


def test_the_next_track_step_marks_a_killed_run_killed(tmp_path, store):
    metrics_path, _ = fake_lineage(tmp_path)
    proc = start_doomed_track_step(tmp_path, metrics_path, store, "killed")
    client = MlflowClient(store)
    try:
        run = doomed_run(client, "killed")
        assert run.info.status == "RUNNING"
        owner = json.loads(run.data.tags[liveness.OWNER_TAG])
        assert owner["pid"] == proc.pid
        # While its process lives, the run is left alone.
        assert tracking.reap_dead_runs(client) == []
        assert client.get_run(run.info.run_id).info.status == "RUNNING"
    finally:
        kill(proc)

    # The next track step in the store closes it before logging its own run.
    second = tracking.log_pipeline_run(str(metrics_path), experiment="killed", tracking_uri=store)
    dead = client.get_run(run.info.run_id)
    assert dead.info.status == "KILLED"
    assert f"process {proc.pid}" in dead.data.tags[liveness.REAPED_TAG]
    assert dead.info.end_time >= dead.info.start_time
    stages = stages_of(client, run)
    assert stages and {s.info.status for s in stages} <= {"FINISHED", "KILLED"}
    assert "RUNNING" not in {s.info.status for s in stages}
    assert client.get_run(second).info.status == "FINISHED"


def test_compare_marks_a_killed_run_and_lists_only_finished_runs_unless_all(tmp_path, env_store):
    metrics_path, _ = fake_lineage(tmp_path)
    finished = tracking.log_pipeline_run(str(metrics_path), experiment="compared", run_name="finished")
    proc = start_doomed_track_step(tmp_path, metrics_path, env_store, "compared")
    client = MlflowClient(env_store)
    try:
        # A run still being logged is not a result.
        result = CliRunner().invoke(cli, ["compare", "--experiment", "compared", "--format", "csv"])
        assert result.exit_code == 0, result.output
        assert [line.split(",")[0] for line in result.output.strip().splitlines()[1:]] == ["finished"]
        everything = CliRunner().invoke(cli, ["compare", "--experiment", "compared", "--all", "--format", "csv"])
        rows = {line.split(",")[0]: line for line in everything.output.strip().splitlines()[1:]}
        assert set(rows) == {"finished", "doomed"} and ",RUNNING," in rows["doomed"]
    finally:
        kill(proc)

    result = CliRunner().invoke(cli, ["compare", "--experiment", "compared", "--format", "csv"])
    assert result.exit_code == 0, result.output
    assert [line.split(",")[0] for line in result.output.strip().splitlines()[1:]] == ["finished"]
    assert doomed_run(client, "compared").info.status == "KILLED"
    everything = CliRunner().invoke(cli, ["compare", "--experiment", "compared", "--all", "--format", "csv"])
    rows = {line.split(",")[0]: line for line in everything.output.strip().splitlines()[1:]}
    assert ",KILLED," in rows["doomed"] and ",FINISHED," in rows["finished"]
    assert client.get_run(finished).info.status == "FINISHED"


def test_owners_elsewhere_are_judged_by_their_heartbeat(store):
    """Another host (or container): the heartbeat lease decides; a reused pid here is not the owner."""
    client = MlflowClient(store)
    experiment_id = tracking.setup("elsewhere", store)
    now = time.time()
    here = liveness.owner()

    def running(name, owner, beat):
        run = client.create_run(experiment_id, run_name=name, tags={
            "dcml.kind": "pipeline", liveness.OWNER_TAG: json.dumps(owner), liveness.HEARTBEAT_TAG: f"{beat:.0f}"})
        return run.info.run_id

    remote = {**here, "host": "gpu-node-7", "pid": 1}
    stale = running("stale remote", remote, now - liveness.LEASE_S - 60)
    fresh = running("fresh remote", remote, now - 5)
    reused = running("reused pid", {**here, "pid": os.getppid(), "start": "1"}, now)  # pid alive, other process
    alive = running("alive here", here, now - liveness.LEASE_S - 60)  # this process: alive whatever the beat
    reaped = tracking.reap_dead_runs(client, [experiment_id])
    assert sorted(reaped) == sorted([stale, reused])
    status = {rid: client.get_run(rid).info.status for rid in (stale, fresh, reused, alive)}
    assert status == {stale: "KILLED", fresh: "RUNNING", reused: "KILLED", alive: "RUNNING"}
    assert "no heartbeat" in client.get_run(stale).data.tags[liveness.REAPED_TAG]
    assert "another process" in client.get_run(reused).data.tags[liveness.REAPED_TAG]
    for rid in (fresh, alive):
        client.set_terminated(rid)
