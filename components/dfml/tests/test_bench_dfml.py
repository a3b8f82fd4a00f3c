"""bench.bench_dfml end to end on real Cars196 photos: DFML and the K=1 baseline
trained and evaluated, the routing plot written and logged to MLflow."""

from __future__ import annotations

import json

from mlflow.tracking import MlflowClient

from bench import bench_dfml


def test_bench_compares_dfml_with_baseline_and_logs_routing_plot(cars_manifest, tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    result = bench_dfml.main(["--manifest", str(cars_manifest), "--dataset", "tiny", "--epochs", "1",
                              "--image-size", "32", "--embedding-dim", "16", "--classes-per-batch", "4",
                              "--images-per-class", "2", "--baseline", "--threads", "1", "--out-dir", str(tmp_path)])
    saved = json.loads((tmp_path / "dfml_tiny.json").read_text())
    assert saved["complete"]
    for name in ("dfml", "baseline"):
        assert 0.0 < saved[name]["metrics"]["recall@1"] <= 1.0
        assert saved[name]["params"]["epochs"] == 1
    routing = saved["dfml"]["history"][-1]["routing"]
    assert routing and all(len(counts) == 3 for counts in routing.values())
    assert 0.0 <= saved["dfml"]["routing_entropy"] <= 1.0

    client = MlflowClient(uri)
    run_id = result["mlflow_run_id"]
    assert {a.path for a in client.list_artifacts(run_id)} == {"dfml_tiny.json", "dfml_tiny_routing.png"}
    assert client.get_run(run_id).info.artifact_uri.startswith(tmp_path.as_uri())
    children = client.search_runs([client.get_run(run_id).info.experiment_id], f"tags.mlflow.parentRunId = '{run_id}'")
    assert sorted(c.info.run_name for c in children) == ["baseline", "dfml"]
