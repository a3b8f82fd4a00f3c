"""What a whole `dcml run` shows in MLflow: the parameters as resolved, the experiment, the name, the model.

One real run (kfp.local, a process per stage) of the demo preset with --set
overrides on a tiny folder of BMP drawings, logged to a real sqlite store.
"""

import importlib.util
import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from mlflow.tracking import MlflowClient

from dcml import tracking
from dcml.contracts import params
from dcml_app.params_cli import params_cli
from dcml_app.runner import resolve_arguments

pytestmark = pytest.mark.slow  # a whole run in processes

_spec = importlib.util.spec_from_file_location("cli_runs", Path(__file__).with_name("cli_runs.py"))
cli_runs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cli_runs)


def test_a_run_shows_its_resolved_parameters_its_folders_experiment_and_a_registered_model(tmp_path):
    folder = cli_runs.bmp_dataset(tmp_path / "holiday photos")
    sets = (f"data_root={folder}", "dataset=folder", "val_fraction=0", "embedding_dim=16", "num_clusters=2",
            "niter=5", "classes_per_batch=2", "images_per_class=2", "epochs=1", "finetune_epochs=1",
            "recluster_every=1", "batch_size=32", "ks=1,2", "lr_backbone=0.002")
    out = tmp_path / "runs"
    uri = f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}"
    summary_file = tmp_path / "summary.json"
    command = [*cli_runs.DCML, "run", "--config", "demo", *[a for s in sets for a in ("--set", s)],
               "--output-dir", str(out), "--json-out", str(summary_file), "--tracking-uri", uri]
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=1800,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "DCML_CACHE_DIR": str(tmp_path / "digests")})
    assert done.returncode == 0, done.stdout + done.stderr
    summary = json.loads(summary_file.read_text())
    client = MlflowClient(uri)
    parent = client.get_run(summary["mlflow"]["mlflow_run_id"])

    # The parent run's parameters are the pipeline's, exactly as `dcml params --config demo --set ...` resolves
    # them: every parameter's default, then the preset, then --set (data_version: the folder's fingerprint,
    # computed by the run).
    shown = CliRunner().invoke(params_cli, ["--config", "demo", *[a for s in sets for a in ("--set", s)],
                                            "--format", "json"])
    assert shown.exit_code == 0, shown.output
    resolved = json.loads(shown.output)
    assert resolved == {**params.defaults([p.name for p in params.pipeline_params()]),
                        **resolve_arguments("demo", sets)}
    children = {c.data.tags["dcml.stage"]: c for c in client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")}
    resolved["data_version"] = children["ingest"].data.params["data_version"]
    assert parent.data.params == {name: str(value) for name, value in resolved.items()}
    assert parent.data.params["batch_size"] == "32" and parent.data.params["eval_batch_size"] == "256"
    assert parent.data.params["max_per_class"] == "600" and parent.data.params["lr_backbone"] == "0.002"
    # the stages' internals are on their own runs only
    assert "split" in children["evaluate"].data.params and "split" not in parent.data.params
    assert "score" in children["extract"].data.params and "score" not in parent.data.params

    # A run on a folder goes to an experiment named after it (the demo preset names dcml-demo).
    assert client.get_experiment(parent.info.experiment_id).name == "dcml-holiday photos"
    assert parent.info.run_name == "folder dc-shared K=2 margin seed0"  # the experiment's first run of its kind
    # The training curves are on the parent run; bookkeeping is under system/.
    assert {"train/loss", "finetune/loss", "system/seconds.train"} <= set(parent.data.metrics)
    assert not any(k.startswith("epoch.") for k in parent.data.metrics)
    assert "system/epoch.batches" in children["train"].data.metrics and "epoch.batches" not in children["train"].data.metrics
    # The description holds the headline; the model is registered, alias candidate, and loads back.
    assert parent.data.tags["mlflow.note.content"].startswith(parent.data.tags.get("dcml.headline", "test: R@1"))
    version = client.get_model_version_by_alias("dcml-holiday photos", "candidate")
    assert version.run_id == parent.info.run_id and summary["mlflow"]["model"]["registered"] == "dcml-holiday photos"
    model, _ = tracking.load_logged_model("models:/dcml-holiday photos@candidate", tracking_uri=uri)
    with torch.no_grad():
        assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 16)
