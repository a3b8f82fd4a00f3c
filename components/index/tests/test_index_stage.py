"""The index stage: model + manifest -> an index folder (exact by default), appending, lineage, errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from components.index.stage import run
from dcml.algorithm.inference import compute_vectors
from dcml.contracts import manifest as manifest_lib
from dcml.contracts import records
from dcml.contracts.errors import DcmlError
from dcml.model_files import load_model
from dcml.retrieval.index import GalleryIndex, file_sha256, stored_vectors
from dcml_app.cli import main as dcml_main


def embeddings_of(model, manifest, rows):
    net, _ = load_model(model)
    x = compute_vectors(net, manifest_lib.read(manifest), rows)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_exact_index_of_the_test_split_with_lineage(tmp_path, fm):
    manifest, model = fm
    out = tmp_path / "index"
    record = run(out=out, manifest=manifest, model=model)
    gallery = GalleryIndex.open(out)
    test = manifest_lib.read(manifest).split("test")
    assert gallery.size == len(test) == 48 and gallery.meta["type"] == "flat" and gallery.meta["exact"]
    assert list(gallery.items["id"]) == list(range(48))
    assert list(gallery.items["image_id"]) == list(test["image_id"])
    assert list(gallery.items["label"]) == list(test["label"]) and set(gallery.items["class_name"]) == {
        "class6", "class7", "class8", "class9"}
    # The stored vectors are the model's embeddings, L2-normalised.
    np.testing.assert_allclose(stored_vectors(gallery.index), embeddings_of(model, manifest, test), atol=1e-6)
    # Lineage: model and manifest fingerprints, dimension, type; the model travels with the index.
    meta = json.loads((out / "index.json").read_text())
    assert meta["record"] == record and record["stage"] == "index"
    assert record["extra"]["model_sha256"] == file_sha256(model) == file_sha256(out / "model.pt")
    assert record["extra"]["manifest_fingerprint"] == manifest_lib.read(manifest).meta["fingerprint"]
    assert record["extra"]["dim"] == 16 and record["extra"]["index_type"] == "flat"
    assert set(record["inputs"]) == {"model", "manifest"} and records.read(out) == record
    assert record["metrics"] == {"images": 48, "added": 48, "dim": 16, "index_recall@10": 1.0,
                                 "build_seconds": meta["build"]["build_seconds"]}
    # Each gallery image's nearest neighbour is itself, with cosine 1.
    hits = gallery.search(stored_vectors(gallery.index), k=3)
    assert [h[0]["id"] for h in hits] == list(range(48))
    assert all(h[0]["score"] == pytest.approx(1.0, abs=1e-5) for h in hits)


def test_approximate_index_stores_its_measured_recall(tmp_path, fm):
    manifest, model = fm
    record = run(out=tmp_path / "hnsw", manifest=manifest, model=model, index_type="hnsw", split="all")
    meta = GalleryIndex.open(tmp_path / "hnsw").meta
    assert meta["type"] == "hnsw" and not meta["exact"] and meta["count"] == 96
    assert meta["recall@10"] == record["metrics"]["index_recall@10"] == meta["build"]["calibration"][-1][1]
    assert meta["search"] == {"efSearch": meta["build"]["efSearch"]}
    assert meta["recall@10"] >= 0.95  # the target, reached on a tiny gallery at the first setting already


def test_append_adds_only_new_images_and_keeps_ids_unique(tmp_path, fm):
    manifest, model = fm
    out = tmp_path / "index"
    run(out=out, manifest=manifest, model=model, index_type="ivf")
    first = GalleryIndex.open(out)
    centroids = first.index.quantizer.reconstruct_n(0, first.index.nlist)
    record = run(out=out, manifest=manifest, split="all", append=True)
    gallery = GalleryIndex.open(out)
    assert record["metrics"]["added"] == 48 and record["extra"]["skipped_already_indexed"] == 48
    assert gallery.size == 96 and list(gallery.items["id"]) == list(range(96))
    assert gallery.items["image_id"].is_unique
    # Appended, not rebuilt: the IVF lists (its trained centroids) are the same.
    np.testing.assert_array_equal(gallery.index.quantizer.reconstruct_n(0, gallery.index.nlist), centroids)
    np.testing.assert_array_equal(stored_vectors(gallery.index)[:48], stored_vectors(first.index))
    train = manifest_lib.read(manifest).split("train")
    np.testing.assert_allclose(stored_vectors(gallery.index)[48:], embeddings_of(model, manifest, train), atol=1e-6)
    assert gallery.meta["sources"][1]["ids"] == [48, 95]
    assert record["inputs"]["index"]["exec_id"] == first.meta["record"]["exec_id"]  # lineage goes through the old index
    # Appending the same images again adds nothing.
    again = run(out=out, manifest=manifest, split="all", append=True)
    assert again["metrics"]["added"] == 0 and GalleryIndex.open(out).size == 96


@pytest.mark.parametrize("case, message", [
    ("no_model", "pass --model CKPT"),
    ("append_without_index", "--append needs an existing index"),
    ("append_other_model", "not the model the index"),
    ("missing_split", "no rows in split(s) query"),
    ("bad_type", "index_type='annoy': not allowed"),
    ("too_few_to_compress", "--index-type ivfpq: 48 vectors are too few to train its codebooks (it needs 624); use "
                            "--index-type flat"),
])
def test_bad_input_is_a_clear_error_and_writes_nothing(tmp_path, fm, case, message):
    manifest, model = fm
    out = tmp_path / "index"
    kwargs = {"out": out, "manifest": manifest, "model": model}
    if case == "no_model":
        kwargs["model"] = None
    elif case == "append_without_index":
        kwargs["append"] = True
    elif case == "append_other_model":
        run(out=tmp_path / "other", manifest=manifest, model=model)
        other = tmp_path / "other-model.pt"
        other.write_bytes(model.read_bytes() + b"\0")
        kwargs.update(out=tmp_path / "other", model=other, append=True)
    elif case == "missing_split":
        kwargs["split"] = "query"
    elif case == "bad_type":
        kwargs["index_type"] = "annoy"
    elif case == "too_few_to_compress":
        kwargs["index_type"] = "ivfpq"
    before = GalleryIndex.open(kwargs["out"]).meta["record"]["exec_id"] if case == "append_other_model" else None
    with pytest.raises(DcmlError, match=message.replace("(", r"\(").replace(")", r"\)")):
        run(**kwargs)
    if before:
        assert GalleryIndex.open(kwargs["out"]).meta["record"]["exec_id"] == before  # untouched
    else:
        assert not out.exists()


def test_cli_writes_the_index_and_errors_are_one_line_exit_2(tmp_path, fm, capsys):
    manifest, model = fm
    out = tmp_path / "index"
    dcml_main(["index", "--model", str(model), "--manifest", str(manifest), "--out", str(out), "--recall", "0.9"])
    said = capsys.readouterr().out
    assert "48 images (48 added), 16-d, flat index (auto: under 100,000 images exact search is fast enough; " \
           "--index-type to choose), exact search" in said
    assert GalleryIndex.open(out).meta["record"]["params"]["target_recall"] == 0.9  # --recall sets it
    with pytest.raises(SystemExit) as failed:
        dcml_main(["index", "--model", str(model), "--manifest", str(manifest), "--out", str(tmp_path / "x"),
                   "--split", "gallery"])
    err = capsys.readouterr().err.strip()
    assert failed.value.code == 2 and err.startswith("error: ") and "\n" not in err and "split(s) gallery" in err
    assert not (tmp_path / "x").exists()
