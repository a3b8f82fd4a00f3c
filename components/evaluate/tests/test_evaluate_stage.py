"""The evaluate stage: Parquet embeddings or model + manifest -> metrics JSON."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner
from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

from components.evaluate.stage import run
from dcml.contracts import checkpoint
from dcml_app.cli import cli as dcml_cli
from dcml_app.cli import main as dcml_main
from dcml.contracts.errors import DcmlError
from dcml.contracts.io import read_vectors, write_vectors
from dcml.algorithm.metrics import evaluate_embeddings
from dcml.algorithm.models import build_model, default_config

KEYS = {"recall@1", "recall@2", "recall@4", "recall@8", "r_precision", "map@r", "nmi", "ami"}


def clustered(n, classes, dim, seed, noise=1.0):
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % classes
    centres = rng.standard_normal((classes, dim)).astype(np.float32)
    x = centres[labels] + noise * rng.standard_normal((n, dim)).astype(np.float32)
    return x.astype(np.float32), labels


def embeddings_file(path, vectors, labels, splits):
    meta_df = pd.DataFrame({"image_id": [f"im{i}" for i in range(len(labels))], "label": labels, "split": splits})
    write_vectors(path, meta_df, vectors, "embedding", {})
    return path


def pml(query, query_labels, reference=None, reference_labels=None):
    calc = AccuracyCalculator(include=("precision_at_1", "r_precision", "mean_average_precision_at_r", "NMI", "AMI"),
                              k="max_bin_count", device=torch.device("cpu"))
    got = calc.get_accuracy(query, query_labels, reference, reference_labels)
    return {"recall@1": got["precision_at_1"], "r_precision": got["r_precision"],
            "map@r": got["mean_average_precision_at_r"], "nmi": got["NMI"], "ami": got["AMI"]}


def test_cli_on_parquet_embeddings_writes_pml_equal_metrics(tmp_path):
    x, y = clustered(300, 12, 16, seed=0)
    splits = np.where(np.arange(300) < 240, "test", "train")
    src = embeddings_file(tmp_path / "emb.parquet", x, y, splits)
    out = tmp_path / "metrics.json"
    result = CliRunner().invoke(dcml_cli, ["evaluate", "--embeddings", str(src), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "recall@1" in result.output and "map@r" in result.output
    doc = json.loads(out.read_text())
    assert set(doc["metrics"]) == KEYS
    theirs = pml(x[:240], y[:240])  # only the 'test' rows, against themselves
    for key, value in theirs.items():
        assert doc["metrics"][key] == pytest.approx(value, abs=1e-6), key
    record = doc["record"]
    assert record["stage"] == "evaluate" and record["metrics"] == doc["metrics"]
    assert record["extra"]["mode"] == "reference_includes_query"
    assert record["extra"]["num_queries"] == 240 and record["params"]["ks"] == [1, 2, 4, 8]


def test_query_gallery_table_is_evaluated_query_vs_gallery(tmp_path):
    x, y = clustered(400, 20, 16, seed=1)
    splits = np.where((np.arange(400) // 20) % 2 == 0, "query", "gallery")  # every class in both
    src = embeddings_file(tmp_path / "inshop.parquet", x, y, splits)
    record = run(out=tmp_path / "m.json", embeddings=src, ks=(1, 10, 20))
    q, g = splits == "query", splits == "gallery"
    theirs = pml(x[q], y[q], x[g], y[g])
    ours = json.loads((tmp_path / "m.json").read_text())["metrics"]
    assert set(ours) == {"recall@1", "recall@10", "recall@20", "r_precision", "map@r", "nmi", "ami"}
    for key, value in theirs.items():
        assert ours[key] == pytest.approx(value, abs=1e-6), key
    assert record["extra"]["mode"] == "query_vs_gallery"
    assert record["extra"]["num_queries"] == 200 and record["extra"]["num_reference"] == 200
    # An explicit split that exists wins over query/gallery.
    record = run(out=tmp_path / "q.json", embeddings=src, split="query", include=["recall"])
    assert record["extra"]["mode"] == "reference_includes_query" and record["extra"]["num_queries"] == 200


def test_ks_options_and_include(tmp_path):
    x, y = clustered(200, 10, 8, seed=2)
    src = embeddings_file(tmp_path / "e.parquet", x, y, ["test"] * 200)
    out = tmp_path / "m.json"
    result = CliRunner().invoke(dcml_cli, ["evaluate", "--embeddings", str(src), "--out", str(out), "--ks", "1,10",
                                           "--k", "100", "--include", "recall,map@r"])
    assert result.exit_code == 0, result.output
    got = json.loads(out.read_text())["metrics"]
    assert set(got) == {"recall@1", "recall@10", "recall@100", "map@r"}
    expected = evaluate_embeddings(x, y, ks=(1, 10, 100), include=["recall", "map@r"])
    assert got == pytest.approx(expected, abs=0)


def test_model_and_manifest_embed_evaluate_and_write_embeddings(tmp_path, fmnist_manifest):
    manifest = fmnist_manifest(per_class=8)
    torch.manual_seed(0)
    net = build_model(default_config(backbone="small_cnn", embedding_dim=16, num_slices=2))
    ckpt_path = tmp_path / "model.pt"
    checkpoint.save(ckpt_path, {"model_config": net.config, "model": net.state_dict(), "record": "{}"})
    out, emb_out = tmp_path / "metrics.json", tmp_path / "emb.parquet"
    record = run(out=out, model=ckpt_path, manifest=manifest, embeddings_out=emb_out, batch_size=16)

    table, vectors, meta = read_vectors(emb_out)
    assert list(table.columns) == ["image_id", "label", "split"] and vectors.shape == (48, 16)
    assert set(table["split"]) == {"test"} and meta["vector_column"] == "embedding"
    assert meta["record"]["exec_id"] == record["exec_id"] and meta["model_config"]["num_slices"] == 2
    # Each of the 2 slices is unit-norm: the full vector has norm sqrt(2).
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), np.sqrt(2), rtol=1e-5)
    metrics = json.loads(out.read_text())["metrics"]
    assert set(metrics) == KEYS
    assert metrics == pytest.approx(evaluate_embeddings(vectors, table["label"].to_numpy()), abs=1e-12)
    # The written embeddings evaluate to the same numbers through the Parquet path.
    again = run(out=tmp_path / "again.json", embeddings=emb_out)
    assert again["metrics"] == pytest.approx(metrics, abs=1e-12)
    assert set(record["inputs"]) == {"model", "manifest"}  # the lineage names both inputs


def test_model_on_query_gallery_manifest(tmp_path, fmnist_manifest):
    manifest = fmnist_manifest(per_class=6, query_gallery=True)
    torch.manual_seed(1)
    net = build_model(default_config(backbone="small_cnn", embedding_dim=8))
    ckpt_path = tmp_path / "model.pt"
    checkpoint.save(ckpt_path, {"model_config": net.config, "model": net.state_dict(), "record": "{}"})
    record = run(out=tmp_path / "m.json", model=ckpt_path, manifest=manifest, ks=(1, 2),
                 embeddings_out=tmp_path / "e.parquet", include=["recall", "map@r"])
    assert record["extra"]["mode"] == "query_vs_gallery"
    assert record["extra"]["num_queries"] == 18 and record["extra"]["num_reference"] == 18
    table, vectors, _ = read_vectors(tmp_path / "e.parquet")
    assert list(table["split"]) == ["query"] * 18 + ["gallery"] * 18
    q = (table["split"] == "query").to_numpy()
    labels = table["label"].to_numpy()
    expected = evaluate_embeddings(vectors[q], labels[q], vectors[~q], labels[~q], ks=(1, 2), include=["recall", "map@r"])
    assert record["metrics"] == pytest.approx(expected, abs=1e-12)


def _variable_dims(path):
    table = pa.table({"label": [0, 0, 1, 1], "split": ["test"] * 4,
                      "embedding": pa.array([[0.0, 1.0], [1.0, 0.0], [1.0, 1.0], [0.5, 0.5, 0.5]],
                                            type=pa.list_(pa.float32()))})
    pq.write_table(table, path)
    return path


@pytest.mark.parametrize("case, message", [
    ("no_label", "no 'label' column"),
    ("no_rows_in_split", "no rows in split 'test'"),
    ("single_class", "at least two classes"),
    ("all_singletons", "no query has another item"),
    ("mismatched_dims", "different lengths"),
    ("no_input", "either --embeddings"),
    ("model_without_manifest", "needs --manifest"),
    ("manifest_with_embeddings", "go with --model"),
])
def test_bad_input_is_a_clear_error_and_writes_nothing(tmp_path, case, message):
    x, y = clustered(40, 4, 6, seed=3)
    path = tmp_path / "e.parquet"
    kwargs = {"embeddings": path}
    if case == "no_label":
        pq.write_table(pa.table({"split": ["test"] * 4, "embedding": pa.array([[0.0, 1.0]] * 4)}), path)
    elif case == "no_rows_in_split":
        embeddings_file(path, x, y, ["train"] * 40)
    elif case == "single_class":
        embeddings_file(path, x, np.zeros(40, dtype=np.int64), ["test"] * 40)
    elif case == "all_singletons":
        embeddings_file(path, x, np.arange(40), ["test"] * 40)
    elif case == "mismatched_dims":
        _variable_dims(path)
    elif case == "no_input":
        kwargs = {}
    elif case == "model_without_manifest":
        kwargs = {"model": tmp_path / "model.pt"}
    elif case == "manifest_with_embeddings":
        embeddings_file(path, x, y, ["test"] * 40)
        kwargs["manifest"] = tmp_path / "manifest.parquet"
    out = tmp_path / "metrics.json"
    with pytest.raises(DcmlError, match=message):
        run(out=out, **kwargs)
    assert not out.exists()


def test_cli_error_is_one_line_exit_2(tmp_path, capsys):
    path = embeddings_file(tmp_path / "e.parquet", *clustered(20, 4, 4, seed=4), ["train"] * 20)
    with pytest.raises(SystemExit) as exit_info:
        dcml_main(["evaluate", "--embeddings", str(path), "--out", str(tmp_path / "m.json")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "no rows in split 'test'" in err and "\n" not in err
