"""The whole pipeline through kfp.local's SubprocessRunner: caching, modes, MLflow.

Real Fashion-MNIST (Debian's package), tiny sizes: a few images per class and
one epoch, so the suite stays in minutes. The first run is the session's shared
``tiny_pipeline`` (tests/conftest.py); the tests here run it again in its
folder to hit its cache.
"""

import json
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from dcml.contracts import records
from dcml_app.runner import run_local

pytestmark = pytest.mark.slow  # whole runs in processes: `make test` starts this module first

STAGES = {"ingest", "extract", "cluster", "train", "finetune", "evaluate"}


@pytest.fixture
def tiny_args(tiny_pipeline_args):
    """The parameters of the shared run."""
    return tiny_pipeline_args


@pytest.fixture(scope="module")
def runs(tiny_pipeline):
    """The shared run's output folder (its kfp.local cache)."""
    return tiny_pipeline.output_dir


@pytest.fixture(scope="module")
def tracking_uri(tiny_pipeline):
    return tiny_pipeline.tracking_uri


@pytest.fixture(scope="module")
def first_run(tiny_pipeline):
    return tiny_pipeline.result


def executed_tasks(run_dir):
    """Task folders a run wrote itself (cached tasks are links to an earlier run's folders)."""
    return {p.name for p in Path(run_dir).iterdir() if p.is_dir() and not p.is_symlink()}


def lineage_ids(metrics_file):
    return {r["stage"]: r["exec_id"] for r in records.walk(records.read(metrics_file))}


def test_first_run_executes_every_stage_and_reports_metrics(first_run):
    assert executed_tasks(first_run["run_dir"]) >= {"ingest", "extract", "cluster", "train-shared", "finetune",
                                                     "evaluate", "track"}
    metrics = first_run["metrics"]
    assert set(metrics) >= {"recall@1", "recall@2", "recall@4", "nmi", "ami", "map@r", "r_precision"}
    assert 0.0 < metrics["recall@1"] <= metrics["recall@2"] <= metrics["recall@4"] <= 1.0
    assert set(lineage_ids(first_run["metrics_file"])) == STAGES
    assert first_run["mlflow"]["cached_stages"] == []


def test_mlflow_run_tree_from_a_real_run(first_run, tracking_uri, tiny_args):
    client = MlflowClient(tracking_uri)
    parent = client.get_run(first_run["mlflow"]["mlflow_run_id"])
    assert parent.data.params["dataset"] == "fashion-mnist"
    assert parent.data.params["num_clusters"] == "2"
    assert parent.data.metrics["recall_at_1"] == pytest.approx(first_run["metrics"]["recall@1"])
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert {c.data.tags["dcml.stage"] for c in children} == STAGES
    train = next(c for c in children if c.data.tags["dcml.stage"] == "train")
    assert len(client.get_metric_history(train.info.run_id, "epoch.loss")) == tiny_args["epochs"]
    assert parent.data.tags["dcml.model_logged"] == "true"
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} >= {"plots", "lineage.json", "retrieval"}
    # What the model retrieves: the query -> top-5 grid, Recall@1 per class as a table and a histogram.
    pictures = {a.path: a.file_size for a in client.list_artifacts(parent.info.run_id, "retrieval")}
    assert set(pictures) == {"retrieval/retrieval_grid.png", "retrieval/per_class_recall.csv",
                             "retrieval/per_class_recall.png"}
    assert all(size > 0 for size in pictures.values())
    import pandas as pd
    from mlflow.artifacts import download_artifacts

    table = pd.read_csv(download_artifacts(run_id=parent.info.run_id, artifact_path="retrieval/per_class_recall.csv",
                                           tracking_uri=tracking_uri))
    assert len(table) > 0 and table.iloc[:, -1].between(0, 1).all()
    # The logged model (the dcml checkpoint, no pickle) loads back from MLflow and embeds like the checkpoint.
    import torch

    from dcml.tracking import load_logged_model

    model, _ = load_logged_model(parent.data.tags["dcml.model_uri"], tracking_uri=tracking_uri)
    with torch.no_grad():
        out = model(torch.zeros(3, 1, 28, 28))
    assert out.shape == (3, tiny_args["embedding_dim"])
    assert torch.allclose(out.norm(dim=1), torch.ones(3), atol=1e-5)


def test_identical_rerun_is_served_from_cache(first_run, runs, tracking_uri, tiny_args):
    again = run_local(dict(tiny_args), output_dir=runs, tracking_uri=tracking_uri)
    assert executed_tasks(again["run_dir"]) == {"track"}
    assert again["metrics"] == first_run["metrics"]
    assert lineage_ids(again["metrics_file"]) == lineage_ids(first_run["metrics_file"])
    assert set(again["mlflow"]["cached_stages"]) == STAGES
    assert (runs / "latest").resolve() == Path(again["run_dir"]).resolve()
    # runs/latest shows the whole run: the cached tasks are links to the outputs they served.
    latest = runs / "latest"
    assert {p.name for p in latest.iterdir() if p.is_symlink()} >= {"ingest", "extract", "cluster", "finetune",
                                                                     "evaluate"}
    assert (latest / "finetune" / "model" / "model.pt").is_file()
    assert (latest / "ingest" / "manifest" / "manifest.parquet").is_file()


def test_changing_an_evaluation_parameter_reruns_only_evaluation(first_run, runs, tracking_uri, tiny_args):
    changed = run_local({**tiny_args, "ks": "1,3"}, output_dir=runs, tracking_uri=tracking_uri)
    assert executed_tasks(changed["run_dir"]) == {"evaluate", "track"}
    assert set(changed["metrics"]) >= {"recall@1", "recall@3"}
    assert changed["metrics"]["recall@1"] == pytest.approx(first_run["metrics"]["recall@1"])
    before, after = lineage_ids(first_run["metrics_file"]), lineage_ids(changed["metrics_file"])
    assert {s for s in STAGES if before[s] != after[s]} == {"evaluate"}


def test_no_cache_reruns_everything(first_run, runs, tracking_uri, tiny_args):
    fresh = run_local(dict(tiny_args), output_dir=runs, tracking_uri=tracking_uri, cache=False)
    assert executed_tasks(fresh["run_dir"]) >= {"ingest", "extract", "cluster", "train-shared", "finetune", "evaluate"}
    before, after = lineage_ids(first_run["metrics_file"]), lineage_ids(fresh["metrics_file"])
    assert all(before[s] != after[s] for s in STAGES)
    # Same seed, same data: the same result.
    assert fresh["metrics"]["recall@1"] == pytest.approx(first_run["metrics"]["recall@1"], abs=1e-6)


def test_two_processes_per_training_stage(first_run, runs, tracking_uri, tiny_args):
    """gpus_per_task=2: the training stages run as two gloo processes (torchrun) under the local runner;
    the stages before them are served from the cache."""
    result = run_local({**tiny_args, "gpus_per_task": 2}, output_dir=runs, tracking_uri=tracking_uri)
    assert executed_tasks(result["run_dir"]) == {"train-shared", "finetune", "evaluate", "track"}
    lineage = list(records.walk(records.read(result["metrics_file"])))
    assert {r["stage"]: r["extra"].get("processes") for r in lineage if r["stage"] in ("train", "finetune")} == \
        {"train": 2, "finetune": 2}
    assert 0.0 < result["metrics"]["recall@1"] <= 1.0
    stages = {s["name"]: s for s in result["stages"]}
    # Rank 0's progress and summary events reach the console through the launching process.
    assert stages["train-shared"]["status"] == "ok" and "2 epochs" in stages["train-shared"]["summary"]


@pytest.mark.full  # make test-all: the worker and the merge are checked in-process (test_distributed, components/)
def test_parallel_mode_fans_out_per_cluster_and_merges(tiny_args, tmp_path):
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = run_local(dict(tiny_args), mode="parallel", output_dir=tmp_path / "runs", tracking_uri=tracking_uri)
    tasks = executed_tasks(result["run_dir"])
    assert {"ingest", "extract", "cluster", "merge-finetune", "evaluate", "track"} <= tasks
    workers = sorted(Path(result["run_dir"]).glob("for-loop-*-iteration-*/train-worker"))
    assert len(workers) == tiny_args["num_clusters"]
    lineage = list(records.walk(records.read(result["metrics_file"])))
    worker_records = [r for r in lineage if r["stage"] == "train" and r["params"].get("mode") == "worker"]
    assert sorted(r["params"]["cluster_id"] for r in worker_records) == [0, 1]
    merge = next(r for r in lineage if r["stage"] == "finetune")
    assert len(merge["inputs"]["checkpoints"]) == tiny_args["num_clusters"]
    assert 0.0 < result["metrics"]["recall@1"] <= 1.0
    summary = json.loads(Path(result["run_dir"], "track", "mlflow_run", "record.json").read_text())
    client = MlflowClient(tracking_uri)
    children = client.search_runs([summary["experiment_id"]],
                                  filter_string=f"tags.`mlflow.parentRunId` = '{summary['mlflow_run_id']}'")
    assert sum(c.data.tags["dcml.stage"] == "train" for c in children) == tiny_args["num_clusters"]


def test_compress_branch_quantises_the_cached_model(first_run, runs, tracking_uri, tiny_args):
    result = run_local({**tiny_args, "compress_bits": 3, "compress_method": "kmeans"}, output_dir=runs,
                       tracking_uri=tracking_uri)
    # Everything up to the model is cached; the branch adds compress, its evaluation and its MLflow run.
    assert executed_tasks(result["run_dir"]) == {"compress", "evaluate-2", "track-2", "track"}
    assert result["metrics"] == first_run["metrics"]
    compressed = result["compressed"]
    assert 0.0 < compressed["metrics"]["recall@1"] <= 1.0
    lineage = list(records.walk(records.read(compressed["metrics_file"])))
    compress = next(r for r in lineage if r["stage"] == "compress")
    assert compress["params"]["bits"] == 3 and compress["params"]["method"] == "kmeans"
    run = MlflowClient(tracking_uri).get_run(compressed["mlflow"]["mlflow_run_id"])
    assert run.data.tags["dcml.compressed"] == "kmeans-3bit"


def test_index_branch_indexes_the_cached_model_and_is_tracked(first_run, runs, tracking_uri, tiny_args):
    from dcml.retrieval.index import GalleryIndex

    result = run_local({**tiny_args, "index_gallery": True}, output_dir=runs, tracking_uri=tracking_uri)
    # Everything up to the model is cached; the branch adds the index and its MLflow run.
    assert executed_tasks(result["run_dir"]) == {"index", "track-3", "track"}
    assert result["metrics"] == first_run["metrics"]
    gallery = GalleryIndex.open(result["index"]["path"])
    assert gallery.meta["type"] == "flat" and gallery.size == result["index"]["metrics"]["images"] > 0
    assert set(gallery.items["split"]) == {"test"}
    lineage = {r["stage"] for r in records.walk(gallery.meta["record"])}
    assert lineage >= {"ingest", "finetune", "index"}
    run = MlflowClient(tracking_uri).get_run(result["index"]["mlflow"]["mlflow_run_id"])
    assert run.data.metrics["index_recall_at_10"] == 1.0 and run.data.metrics["images"] == gallery.size


def test_study_reuses_the_cache_of_an_identical_run_and_nests_its_runs(first_run, runs, tracking_uri, tiny_args, tmp_path):
    from dcml_app.study import run_study

    said = []
    # The loss study's "margin" point is the shared run itself (margin is the default loss): nothing trains again.
    rows, folder = run_study("loss", dict(tiny_args), output_dir=tmp_path / "studies", tracking_uri=tracking_uri,
                             runs_dir=runs, only=["margin"], echo=said.append)
    assert said[0] == "study loss: 4 runs, loss = contrastive, triplet, margin, proxy_anchor (running 1: --only)"
    assert said[1] == "[1/1] training loss = margin" and said[2].startswith("[1/1] loss = margin: R@1 ")
    assert len(rows) == 1 and set(rows[0]["cached_stages"]) == STAGES
    assert rows[0]["recall@1"] == pytest.approx(first_run["metrics"]["recall@1"])
    client = MlflowClient(tracking_uri)
    grid_run = client.get_run(rows[0]["run"])
    study_run = client.get_run(grid_run.data.tags["mlflow.parentRunId"])
    assert study_run.data.tags["dcml.kind"] == "study" and study_run.info.run_name == "study:loss"
    assert study_run.data.metrics["recall_at_1"] == pytest.approx(rows[0]["recall@1"])
    assert (folder / "results.md").is_file()


def test_dfml_method_trains_through_the_same_pipeline(tiny_args, tmp_path):
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = {**tiny_args, "backbone": "efficientnet_lite0", "weights": "imagenet", "image_size": 32, "epochs": 1,
            "freeze_bn": True, "loss": "proxy_anchor", "lr_proxies": 0.1}
    result = run_local(args, method="dfml", output_dir=tmp_path / "runs", tracking_uri=tracking_uri)
    assert executed_tasks(result["run_dir"]) == {"ingest", "train-dfml", "evaluate", "track"}
    lineage = list(records.walk(records.read(result["metrics_file"])))
    dfml = next(r for r in lineage if r["stage"] == "train-dfml")
    assert dfml["history"][0]["routing"], "routing statistics per block"
    assert 0.0 < result["metrics"]["recall@1"] <= 1.0
    client = MlflowClient(tracking_uri)
    run = client.get_run(result["mlflow"]["mlflow_run_id"])
    assert run.data.tags["dcml.method"] == "dfml"  # the structure is a tag; the parameters are the pipeline's
    # How samples spread over the sub-blocks, as a plot in the run.
    assert "plots/routing_train-dfml.png" in {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
