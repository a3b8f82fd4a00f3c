"""bench.bench_compress end to end on the tiny model: every (method, bits, fine-tuning)
row measured from the file on disk, the plot written, and one MLflow run with a
nested run per row."""

from __future__ import annotations

import json

import pytest
from mlflow.tracking import MlflowClient

from bench import bench_compress, compress_sensitivity


def test_bench_writes_rows_plot_and_mlflow_runs(tiny_checkpoint, tiny_manifest, tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    result = bench_compress.main(["--model", tiny_checkpoint, "--manifest", tiny_manifest, "--dataset", "tiny",
                                  "--bits", "2", "8", "--finetune-steps", "2", "--finetune-bits", "2", "--importance-batches", "2", "--miner", "none",
                                  "--classes-per-batch", "3", "--images-per-class", "2", "--out-dir", str(tmp_path)])
    saved = json.loads((tmp_path / "compress_tiny.json").read_text())
    assert saved["complete"] and (tmp_path / "compress_tiny.png").stat().st_size > 0
    rows = {(r["method"], r["bits"], r["finetune_steps"]) for r in saved["runs"]}
    # fine-tuned only where asked (--finetune-bits 2)
    assert rows == {(m, b, f) for m in ("uniform", "kmeans", "loss-aware") for b, f in ((2, 0), (2, 2), (8, 0))}
    assert saved["equalized_layers"] == 3
    for row in saved["runs"]:
        # bit budget + codebooks + float remainder, plus the checkpoint container's few kB
        assert row["budget_bytes"] < row["size_bytes"] <= row["budget_bytes"] + 16 * 1024
        assert 0.0 <= row["recall@1"] <= 1.0
    two_bit = next(r for r in saved["runs"] if r["bits"] == 2 and not r["finetune_steps"])
    eight_bit = next(r for r in saved["runs"] if r["bits"] == 8 and not r["finetune_steps"])
    assert two_bit["size_bytes"] < eight_bit["size_bytes"] < saved["float"]["size_bytes"]
    # 8-bit k-means is close to the float weights, 2-bit much less so.
    assert eight_bit["recon_rel_mse_mean"] < two_bit["recon_rel_mse_mean"]

    client = MlflowClient(uri)
    parent = client.get_run(result["mlflow_run_id"])
    assert parent.data.metrics["float.recall_at_1"] == pytest.approx(saved["float"]["recall@1"])
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} == {"compress_tiny.json", "compress_tiny.png"}
    # In the store's own experiment, next to the sqlite file (never the ./mlruns default).
    assert client.get_experiment(parent.info.experiment_id).name == "bench-compress"
    assert parent.info.artifact_uri.startswith(tmp_path.as_uri())
    children = client.search_runs([parent.info.experiment_id],
                                  f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert len(children) == len(saved["runs"]) == 9
    child = next(c for c in children if c.info.run_name == "loss-aware 2b + centroid fine-tuning")
    row = next(r for r in saved["runs"] if (r["method"], r["bits"], r["finetune_steps"]) == ("loss-aware", 2, 2))
    assert child.data.metrics["recall_at_1"] == pytest.approx(row["recall@1"])

    # --mlflow-only logs the saved result again without running anything.
    again = bench_compress.main(["--dataset", "tiny", "--out-dir", str(tmp_path), "--mlflow-only"])
    assert again["mlflow_run_id"] != result["mlflow_run_id"]


def test_sensitivity_measures_each_layer_group_plain_equalised_and_corrected(tiny_checkpoint, tiny_manifest, tmp_path):
    result = compress_sensitivity.main(["--model", tiny_checkpoint, "--manifest", tiny_manifest, "--dataset", "tiny",
                                        "--bits", "2", "--images", "12", "--calibration-images", "24",
                                        "--out-dir", str(tmp_path)])
    saved = json.loads((tmp_path / "compress_sensitivity_tiny.json").read_text())
    assert saved["groups"] == result["groups"] and saved["complete"]
    groups = {g["quantized"]: g for g in saved["groups"]}
    assert groups["all"]["layers"] == 4 and groups["depthwise only"]["layers"] == 0  # small_cnn has none
    keys = ("mean_cosine_to_float", "mean_cosine_equalized", "mean_cosine_equalized_bias_corrected")
    for g in saved["groups"]:
        assert all(-1.0 <= g[k] <= 1.0 for k in keys)
    # no layer quantised: the float model itself, whatever the preprocessing
    assert all(groups["depthwise only"][k] == pytest.approx(1.0, abs=1e-5) for k in keys)
    # 2-bit weights move the embeddings; bias correction brings them back closer
    assert groups["all"]["mean_cosine_to_float"] < 0.99
    assert groups["all"]["mean_cosine_equalized_bias_corrected"] > groups["all"]["mean_cosine_equalized"]
