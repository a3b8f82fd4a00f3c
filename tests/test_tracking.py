"""MLflow run tree from stage records, against a real sqlite store."""

import json

import mlflow
import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from mlflow.tracking import MlflowClient

from dcml.contracts import records
from dcml import tracking
from dcml_app.cli import cli
from dcml.contracts.io import write_json, write_vectors


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("store")


@pytest.fixture
def store(store_dir, monkeypatch):
    # One database for the module: creating an MLflow schema takes seconds.
    uri = f"sqlite:///{store_dir / 'mlflow' / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


def fake_lineage(tmp_path, k=2):
    """Records shaped like the real stages', written into real artifact files."""
    ingest = records.StageTimer("ingest", {"dataset": "fashion-mnist", "split_mode": "class-disjoint",
                                           "out": str(tmp_path / "m.parquet")}).finish(metrics={"images": 100})
    manifest = tmp_path / "ingest"
    manifest.mkdir()
    write_json(manifest / "record.json", {"record": ingest})
    cluster = records.StageTimer("cluster", {"k": k, "niter": 20}).finish(
        inputs={"features": manifest}, metrics={"inertia": 1.5, "sizes": [60, 40]})
    cluster_dir = tmp_path / "cluster"
    cluster_dir.mkdir()
    write_json(cluster_dir / "record.json", {"record": cluster})
    history = [{"epoch": e, "loss": 1.0 / (e + 1), "seconds": 2.0,
                **({"recall@1": 0.5 + 0.1 * e} if e % 2 else {}),
                **({"cluster_sizes": [55, 45]} if e == 2 else {})} for e in range(4)]
    train = records.StageTimer("train", {"mode": "shared", "num_slices": k, "loss": "margin", "margin": 0.2,
                                         "epochs": 4, "backbone": "small_cnn", "embedding_dim": 64}).finish(
        inputs={"manifest": manifest, "clusters": cluster_dir}, history=history)
    train_dir = tmp_path / "train"
    train_dir.mkdir()
    write_json(train_dir / "record.json", {"record": train})
    finetune = records.StageTimer("finetune", {"epochs": 2}).finish(
        inputs={"manifest": manifest, "checkpoints": [train_dir]}, history=[{"epoch": 0, "loss": 0.2}])
    ft_dir = tmp_path / "finetune"
    ft_dir.mkdir()
    write_json(ft_dir / "record.json", {"record": finetune})
    metrics = {"recall@1": 0.71, "recall@2": 0.8, "recall@4": 0.88, "recall@8": 0.93,
               "nmi": 0.5, "ami": 0.45, "map@r": 0.3, "r_precision": 0.4}
    evaluate = records.StageTimer("evaluate", {"ks": [1, 2, 4, 8]}).finish(
        inputs={"model": ft_dir, "manifest": manifest}, metrics=metrics)
    metrics_path = tmp_path / "metrics.json"
    write_json(metrics_path, {"metrics": metrics, "record": evaluate})
    rng = np.random.default_rng(0)
    emb = tmp_path / "embeddings.parquet"
    labels = rng.integers(0, 5, 200)
    write_vectors(emb, pd.DataFrame({"image_id": [str(i) for i in range(200)], "label": labels, "split": "test"}),
                  rng.normal(size=(200, 16)) + labels[:, None], "embedding", {})
    return metrics_path, emb


def child_runs(client, experiment_id, parent_id):
    return client.search_runs([experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'")


def test_run_tree_params_metrics_history_and_plots(tmp_path, store):
    metrics_path, emb = fake_lineage(tmp_path)
    out = tmp_path / "mlflow_run.json"
    run_id = tracking.log_pipeline_run(str(metrics_path), embeddings=str(emb), experiment="tree", run_name="demo",
                                       out=str(out))
    client = MlflowClient(store)
    parent = client.get_run(run_id)
    assert parent.data.tags["dcml.kind"] == "pipeline"
    assert parent.data.params["dataset"] == "fashion-mnist"
    assert parent.data.params["num_clusters"] == "2"
    assert parent.data.params["loss"] == "margin"
    assert parent.data.params["margin"] == "0.2"
    assert parent.data.params["finetune_epochs"] == "2"
    assert parent.data.params["epochs"] == "4"
    assert parent.data.params["git_commit"]
    assert parent.data.metrics["recall_at_1"] == pytest.approx(0.71)
    assert parent.data.metrics["map_at_r"] == pytest.approx(0.3)
    assert "seconds.train" in parent.data.metrics

    children = child_runs(client, parent.info.experiment_id, run_id)
    by_stage = {c.data.tags["dcml.stage"]: c for c in children}
    assert set(by_stage) == {"ingest", "cluster", "train", "finetune", "evaluate"}
    assert all(c.data.tags["dcml.cached"] == "false" for c in children)
    train = by_stage["train"]
    loss_history = client.get_metric_history(train.info.run_id, "epoch.loss")
    assert [m.step for m in loss_history] == [0, 1, 2, 3]
    assert [m.value for m in loss_history] == pytest.approx([1.0, 0.5, 1 / 3, 0.25])
    assert [m.step for m in client.get_metric_history(train.info.run_id, "epoch.recall_at_1")] == [1, 3]
    assert "duration_s" in train.data.metrics

    artifacts = {a.path for a in client.list_artifacts(run_id, "plots")}
    assert artifacts == {"plots/training_curves.png", "plots/recall_at_k.png", "plots/cluster_sizes.png",
                         "plots/embedding_map.png"}
    assert json.loads(out.read_text())["mlflow_run_id"] == run_id


def test_second_run_marks_stages_served_from_cache(tmp_path, store):
    metrics_path, emb = fake_lineage(tmp_path)
    first = tracking.log_pipeline_run(str(metrics_path), experiment="cache")
    second = tracking.log_pipeline_run(str(metrics_path), experiment="cache")
    client = MlflowClient(store)
    exp_id = client.get_run(first).info.experiment_id
    assert {c.data.tags["dcml.cached"] for c in child_runs(client, exp_id, first)} == {"false"}
    again = child_runs(client, exp_id, second)
    assert len(again) == 5
    assert {c.data.tags["dcml.cached"] for c in again} == {"true"}


def test_store_is_sqlite_with_explicit_artifact_location(tmp_path, store, store_dir, monkeypatch):
    monkeypatch.chdir(tmp_path)
    metrics_path, _ = fake_lineage(tmp_path)
    run_id = tracking.log_pipeline_run(str(metrics_path), experiment="where")
    assert mlflow.get_tracking_uri() == store
    exp = MlflowClient(store).get_experiment_by_name("where")
    assert exp.artifact_location == (store_dir / "mlflow" / "artifacts" / "where").as_uri()
    assert not (tmp_path / "mlruns").exists()
    assert MlflowClient(store).get_run(run_id).info.artifact_uri.startswith(exp.artifact_location)


def test_compare_lists_runs_best_first(tmp_path, store):
    metrics_path, _ = fake_lineage(tmp_path)
    tracking.log_pipeline_run(str(metrics_path), experiment="cmp", run_name="first")
    better = json.loads(metrics_path.read_text())
    better["metrics"]["recall@1"] = 0.9
    write_json(metrics_path, better)
    tracking.log_pipeline_run(str(metrics_path), experiment="cmp", run_name="second")
    plot = tmp_path / "cmp.png"
    result = CliRunner().invoke(cli, ["compare", "--experiment", "cmp", "--format", "csv", "--plot", str(plot)])
    assert result.exit_code == 0, result.output
    rows = [line.split(",") for line in result.output.strip().splitlines()[:3]]
    header = rows[0]
    assert header[0] == "run" and "recall@1" in header and "num_clusters" in header
    assert [rows[1][0], rows[2][0]] == ["second", "first"]
    assert plot.stat().st_size > 1000


def test_compare_without_runs_is_a_clear_error(tmp_path, store):
    result = CliRunner().invoke(cli, ["compare", "--experiment", "nothing-here"])
    assert result.exit_code != 0
