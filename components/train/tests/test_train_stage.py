import json

import numpy as np
import pyarrow as pa
import pytest
import torch
from click.testing import CliRunner

from components.train.stage import cli, run
from dcml import model_files
from dcml.contracts import checkpoint
from dcml.contracts import manifest as manifest_mod
from dcml.contracts.errors import DcmlError
from dcml.contracts.io import write_parquet, write_vectors

FAST = dict(backbone="small_cnn", embedding_dim=12, classes_per_batch=3, images_per_class=4,
            lr_backbone=1e-3, lr_embedding=1e-3, seed=1)


def write_clusters(path, image_ids, clusters, k):
    table = pa.table({"image_id": pa.array(list(image_ids)), "cluster": pa.array(np.asarray(clusters), pa.int64())})
    write_parquet(path, table, {"k": k})
    return path


def train_ids(manifest_path):
    return manifest_mod.read(manifest_path).split("train")["image_id"].tolist()


def test_shared_mode_from_real_features_through_the_cluster_stage(fm_manifest, tmp_path):
    from components.cluster.stage import run as cluster_run
    from dcml.algorithm.inference import compute_vectors
    from dcml.algorithm.models import build_model

    man = manifest_mod.read(fm_manifest)
    torch.manual_seed(0)
    features = compute_vectors(build_model({"backbone": "small_cnn"}), man, man.df, kind="features")
    write_vectors(tmp_path / "features.parquet", man.df[["image_id", "label", "split"]], features, "feature", {})
    cluster_run(features=tmp_path / "features.parquet", out=tmp_path / "clusters.parquet", k=2, niter=10)

    out = tmp_path / "model.pt"
    record = run(manifest=fm_manifest, clusters=tmp_path / "clusters.parquet", out=out, epochs=2,
                 recluster_every=1, eval_every=1, **FAST)
    assert out.exists() and not (tmp_path / "model.pt.resume.pt").exists()
    model, ckpt = model_files.load_model(out)
    assert model.num_slices == 2 and ckpt["epoch"] == 2
    stored = json.loads(ckpt["record"])
    assert stored["exec_id"] == record["exec_id"]
    assert stored["inputs"]["clusters"]["stage"] == "cluster"
    history = stored["history"]
    assert [h["epoch"] for h in history] == [1, 2]
    assert all("recall@1" in h and 0 <= h["recall@1"] <= 1 for h in history)
    assert "cluster_sizes" in history[0] and "cluster_sizes" in history[1]  # re-clustered at epoch 2
    assert stored["metrics"]["recall@1"] == history[-1]["recall@1"]
    cs = ckpt["cluster_state"]
    assert cs["k"] == 2 and len(cs["assignments"]) == len(cs["image_ids"]) == 96
    assert "worker" not in ckpt


def test_worker_trains_its_slice_only_with_a_frozen_backbone(fm_manifest, tmp_path):
    from dcml.algorithm.models import build_model

    ids = train_ids(fm_manifest)
    clusters = write_clusters(tmp_path / "c.parquet", ids, np.arange(len(ids)) % 3, k=3)
    torch.manual_seed(5)
    init_model = build_model({"backbone": "small_cnn", "embedding_dim": 12})  # K=1, like a merged model
    checkpoint.save(tmp_path / "init.pt", {"model_config": init_model.config, "model": init_model.state_dict(), "record": "{}"})

    out = tmp_path / "w1.pt"
    record = run(manifest=fm_manifest, clusters=clusters, out=out, mode="worker", cluster_id=1, init=tmp_path / "init.pt",
                 freeze_backbone=True, epochs=1, **FAST)
    assert record["name"] == "train-worker-1"
    model, ckpt = model_files.load_model(out)
    assert ckpt["worker"] == {"cluster_id": 1, "k": 3, "freeze_backbone": True}
    assert model.num_slices == 3
    before, after = init_model.state_dict(), model.state_dict()
    for key in before:
        if key.startswith("backbone."):
            assert torch.equal(before[key], after[key]), key
    start, stop = model.slice_bounds(1)
    assert (start, stop) == (4, 8)
    w0, w1 = before["head.weight"], after["head.weight"]
    assert torch.equal(w0[:start], w1[:start]) and torch.equal(w0[stop:], w1[stop:])
    assert not torch.equal(w0[start:stop], w1[start:stop])
    # Only cluster 1's images: a third of the training set.
    assert json.loads(ckpt["record"])["history"][0]["images"] <= len(ids)


def test_worker_without_frozen_backbone_changes_it(fm_manifest, tmp_path):
    ids = train_ids(fm_manifest)
    clusters = write_clusters(tmp_path / "c.parquet", ids, np.arange(len(ids)) % 2, k=2)
    run(manifest=fm_manifest, clusters=clusters, out=tmp_path / "a.pt", mode="worker", cluster_id=0, epochs=1, **FAST)
    run(manifest=fm_manifest, clusters=clusters, out=tmp_path / "b.pt", mode="worker", cluster_id=0, epochs=0, **FAST)
    trained, untrained = checkpoint.load(tmp_path / "a.pt")["model"], checkpoint.load(tmp_path / "b.pt")["model"]
    assert not torch.equal(trained["backbone.net.0.weight"], untrained["backbone.net.0.weight"])
    # The same seed builds the same starting model, so slice 1 stays what it was.
    assert torch.equal(trained["head.weight"][6:], untrained["head.weight"][6:])


def test_nan_stops_the_run_and_writes_nothing(fm_manifest, tmp_path):
    out = tmp_path / "model.pt"
    with pytest.raises(DcmlError, match="loss became nan"):
        run(manifest=fm_manifest, out=out, epochs=2, **{**FAST, "lr_backbone": 1e30, "lr_embedding": 1e30})
    assert not out.exists()


def test_bad_inputs(fm_manifest, tmp_path):
    ids = train_ids(fm_manifest)
    good = write_clusters(tmp_path / "good.parquet", ids, np.arange(len(ids)) % 2, k=2)
    short = write_clusters(tmp_path / "short.parquet", ids[:-1], np.zeros(len(ids) - 1), k=2)
    extra = write_clusters(tmp_path / "extra.parquet", ids + ["nope"], np.zeros(len(ids) + 1), k=2)
    out = tmp_path / "m.pt"
    with pytest.raises(DcmlError, match=r"short.parquet: clusters do not match the manifest: 1 training image"):
        run(manifest=fm_manifest, clusters=short, out=out, epochs=1, **FAST)
    with pytest.raises(DcmlError, match=r"extra.parquet: .*'nope'"):
        run(manifest=fm_manifest, clusters=extra, out=out, epochs=1, **FAST)
    with pytest.raises(DcmlError, match="cluster_id=2 is out of range for k=2"):
        run(manifest=fm_manifest, clusters=good, out=out, mode="worker", cluster_id=2, epochs=1, **FAST)
    with pytest.raises(DcmlError, match="needs --clusters"):
        run(manifest=fm_manifest, out=out, mode="worker", cluster_id=0, epochs=1, **FAST)
    with pytest.raises(DcmlError, match="k=2 clusters but num_slices=3"):
        run(manifest=fm_manifest, clusters=good, out=out, num_slices=3, epochs=1, **FAST)
    with pytest.raises(DcmlError, match="mode="):
        run(manifest=fm_manifest, out=out, mode="parallel", epochs=1, **FAST)
    assert not out.exists()


def test_cli_plain_baseline(fm_manifest, tmp_path):
    out = tmp_path / "m.pt"
    result = CliRunner().invoke(cli, ["--manifest", str(fm_manifest), "--out", str(out), "--epochs", "1",
                                      "--embedding-dim", "8", "--classes-per-batch", "3", "--images-per-class", "4",
                                      "--lr-backbone", "1e-3", "--lr-embedding", "1e-3", "--seed", "2"])
    assert result.exit_code == 0, result.output
    model, ckpt = model_files.load_model(out)
    assert model.num_slices == 1 and model.embedding_dim == 8
    params = json.loads(ckpt["record"])["params"]
    assert params["epochs"] == 1 and params["seed"] == 2
