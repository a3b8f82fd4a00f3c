import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from components.cluster.stage import cli, run
from dcml.contracts.errors import DcmlError
from dcml.contracts.io import read_parquet_meta, write_vectors


def features_file(path, n_per_blob=60, k=3, seed=0, column="feature"):
    """Well-separated blobs; each blob holds its own 4 classes, plus one singleton class."""
    rng = np.random.default_rng(seed)
    centers = np.eye(k, 16) * 10  # orthogonal: separated after L2 normalisation too
    vectors, labels = [], []
    for b in range(k):
        vectors.append(centers[b] + rng.normal(size=(n_per_blob, 16)))
        labels.append(b * 10 + np.arange(n_per_blob) % 4)
    vectors, labels = np.concatenate(vectors).astype(np.float32), np.concatenate(labels)
    labels[0] = 999  # a class with one image: left out of its cluster
    n = len(labels)
    meta = pd.DataFrame({"image_id": [f"img{i:04d}" for i in range(n)], "label": labels, "split": "train"})
    test = pd.DataFrame({"image_id": [f"test{i}" for i in range(10)], "label": np.arange(10) % 2, "split": "test"})
    write_vectors(path, pd.concat([meta, test], ignore_index=True),
                  np.concatenate([vectors, rng.normal(size=(10, 16)).astype(np.float32)]), column, {})
    return path, meta, labels


def test_writes_train_rows_with_clusters_and_metadata(tmp_path):
    feats, meta, labels = features_file(tmp_path / "f.parquet")
    out = tmp_path / "c.parquet"
    record = run(features=feats, out=out, k=3, niter=20, nredo=5, seed=0)
    table = pd.read_parquet(out)
    assert list(table.columns) == ["image_id", "cluster"]
    assert table["image_id"].tolist() == meta["image_id"].tolist()  # train rows only
    assert table["cluster"].dtype == np.int64
    assert table["cluster"][0] == -1  # the singleton class
    # Each blob is one cluster.
    blobs = np.repeat(np.arange(3), 60)
    for b in range(3):
        ids = set(table["cluster"][1:][blobs[1:] == b])
        assert len(ids) == 1
    m = read_parquet_meta(out)
    assert (m["k"], m["niter"], m["nredo"], m["seed"]) == (3, 20, 5, 0)
    assert sorted(m["sizes"]) == [59, 60, 60] and m["inertia"] > 0
    assert m["record"]["exec_id"] == record["exec_id"] and record["metrics"]["left_out"] == 1
    assert record["metrics"]["classes_per_cluster"] == [4, 4, 4]


def test_same_seed_same_output_and_previous_keeps_the_ids(tmp_path):
    feats, _, _ = features_file(tmp_path / "f.parquet")
    run(features=feats, out=tmp_path / "a.parquet", k=3, niter=20, nredo=5, seed=0)
    run(features=feats, out=tmp_path / "b.parquet", k=3, niter=20, nredo=5, seed=0)
    a, b = pd.read_parquet(tmp_path / "a.parquet"), pd.read_parquet(tmp_path / "b.parquet")
    pd.testing.assert_frame_equal(a, b)
    # Another seed numbers the same clusters differently ...
    seeds = {s: pd.read_parquet(_run(feats, tmp_path / f"s{s}.parquet", seed=s))["cluster"] for s in range(1, 6)}
    assert any(not np.array_equal(c, a["cluster"]) for c in seeds.values())
    # ... unless matched to the previous assignment.
    for s in seeds:
        matched = pd.read_parquet(_run(feats, tmp_path / f"m{s}.parquet", seed=s, previous=tmp_path / "a.parquet"))
        np.testing.assert_array_equal(matched["cluster"], a["cluster"])


def _run(feats, out, **kw):
    run(features=feats, out=out, k=3, niter=20, nredo=5, **kw)
    return out


def test_embedding_column_and_cli(tmp_path):
    feats, _, _ = features_file(tmp_path / "e.parquet", column="embedding")
    out = tmp_path / "c.parquet"
    result = CliRunner().invoke(cli, ["--features", str(feats), "--out", str(out), "--k", "2", "--niter", "5", "--seed", "3"])
    assert result.exit_code == 0, result.output
    m = read_parquet_meta(out)
    assert m["k"] == 2 and m["vector_column"] == "embedding" and m["seed"] == 3


def test_bad_inputs(tmp_path):
    feats, _, _ = features_file(tmp_path / "f.parquet", n_per_blob=4, k=1)
    with pytest.raises(DcmlError, match=r"f.parquet: cannot make 9 clusters from 4 points"):
        run(features=feats, out=tmp_path / "c.parquet", k=9)
    assert not (tmp_path / "c.parquet").exists()
    run(features=feats, out=tmp_path / "k2.parquet", k=2)
    with pytest.raises(DcmlError, match="k=2, this one k=3"):
        run(features=feats, out=tmp_path / "c.parquet", k=3, previous=tmp_path / "k2.parquet")
    only_test = tmp_path / "t.parquet"
    write_vectors(only_test, pd.DataFrame({"image_id": ["a", "b"], "label": [0, 1], "split": "test"}),
                  np.ones((2, 3), np.float32), "feature", {})
    with pytest.raises(DcmlError, match="no rows with split 'train'"):
        run(features=only_test, out=tmp_path / "c.parquet", k=1)
    with pytest.raises(DcmlError, match="no such file"):
        run(features=tmp_path / "missing.parquet", out=tmp_path / "c.parquet", k=1)


def test_random_grouping_deals_whole_classes_and_ignores_the_blobs(tmp_path):
    """The control without cluster structure: K random groups of whole classes, equal in classes."""
    from dcml.algorithm.clustering import random_class_groups

    feats, meta, labels = features_file(tmp_path / "f.parquet")
    out = tmp_path / "c.parquet"
    record = run(features=feats, out=out, k=3, seed=4, cluster_grouping="random")
    table = pd.read_parquet(out)
    expected = random_class_groups(labels, 3, seed=4)
    expected[0] = -1  # the singleton class is left out, as with k-means
    np.testing.assert_array_equal(table["cluster"].to_numpy(), expected)
    dealt = random_class_groups(labels, 3, seed=4)
    assert sorted(len(set(labels[dealt == g])) for g in range(3)) == [4, 4, 5]  # 13 classes, the singleton's too
    blobs = np.repeat(np.arange(3), 60)
    assert any(len(set(blobs[expected == g])) > 1 for g in range(3))  # not the k-means blobs
    m = read_parquet_meta(out)
    assert m["grouping"] == "random" and m["inertia"] > record["metrics"]["inertia"] * 0.99
    kmeans_inertia = run(features=feats, out=tmp_path / "k.parquet", k=3, seed=4)["metrics"]["inertia"]
    assert record["metrics"]["inertia"] > 2 * kmeans_inertia  # random groups are far looser than clusters
