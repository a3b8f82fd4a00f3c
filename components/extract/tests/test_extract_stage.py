"""The extract stage: manifest -> feature table with the record and the model config."""

import json

import numpy as np
import pytest
import torch

from components.extract.stage import run
from dcml.contracts import manifest as manifest_lib
from dcml.contracts.errors import DcmlError
from dcml.algorithm.inference import compute_vectors
from dcml.contracts.io import read_vectors
from dcml.algorithm.models import build_model


def test_extract_small_cnn_writes_a_vector_table(tiny_manifest, tmp_path):
    out = tmp_path / "features.parquet"
    torch.manual_seed(0)
    record = run(manifest=tiny_manifest, out=out, backbone="small_cnn", weights="none", image_size=28,
                 batch_size=3, splits=("train", "test"))
    others, vectors, meta = read_vectors(out)
    man = manifest_lib.read(tiny_manifest)
    assert list(others.columns) == ["image_id", "label", "split"]
    assert others["image_id"].tolist() == man.df["image_id"].tolist()
    assert others["label"].tolist() == man.df["label"].tolist()
    assert vectors.shape == (8, 128) and vectors.dtype == np.float32 and np.isfinite(vectors).all()
    assert meta["vector_column"] == "feature" and meta["dim"] == 128
    assert meta["model_config"]["backbone"] == "small_cnn" and meta["model_config"]["image_size"] == 28
    assert meta["manifest_fingerprint"] == "ab" * 32
    assert meta["record"] == json.loads(json.dumps(record))
    assert record["stage"] == "extract"
    assert record["metrics"]["num_images"] == 8 and record["metrics"]["dim"] == 128
    assert record["params"]["splits"] == ["train", "test"]


def test_extract_efficientnet_features_equal_the_backbone(tiny_manifest, tmp_path):
    out = tmp_path / "f.parquet"
    record = run(manifest=tiny_manifest, out=out, image_size=32, batch_size=4)  # defaults: efficientnet_lite0, imagenet
    others, vectors, meta = read_vectors(out, "feature")
    assert vectors.shape == (6, 1280) and set(others["split"]) == {"train"}
    assert meta["model_config"]["weights"] == "imagenet" and record["params"]["backbone"] == "efficientnet_lite0"
    man = manifest_lib.read(tiny_manifest)
    model = build_model({"backbone": "efficientnet_lite0", "image_size": 32})
    expected = compute_vectors(model, man, man.split("train"), kind="features")
    np.testing.assert_allclose(vectors, expected, atol=1e-5)
    assert np.linalg.norm(vectors[0] - vectors[1]) > 1e-3  # different images, different features


def test_extract_with_a_trained_model_uses_its_backbone(tiny_manifest, tmp_path):
    checkpoint = pytest.importorskip("dcml.contracts.checkpoint")
    torch.manual_seed(2)
    model = build_model({"backbone": "small_cnn", "embedding_dim": 16, "num_slices": 2})
    ckpt_path = tmp_path / "model.pt"
    checkpoint.save(ckpt_path, {"model_config": model.config, "model": model.state_dict(),
                                "record": json.dumps({"stage": "train", "exec_id": "t0"})})
    out = tmp_path / "f.parquet"
    # backbone / image_size arguments are ignored in favour of the checkpoint's.
    record = run(manifest=tiny_manifest, out=out, model=ckpt_path, backbone="resnet50", image_size=224)
    _, vectors, meta = read_vectors(out)
    man = manifest_lib.read(tiny_manifest)
    np.testing.assert_allclose(vectors, compute_vectors(model, man, man.split("train"), kind="features"), atol=1e-5)
    assert meta["model_config"] == model.config
    assert record["params"]["backbone"] == "small_cnn" and record["inputs"]["model"]["exec_id"] == "t0"


def test_bad_inputs_fail_clearly_without_output(tiny_manifest, tmp_path):
    out = tmp_path / "f.parquet"
    with pytest.raises(DcmlError, match="no such file"):
        run(manifest=tmp_path / "missing.parquet", out=out, backbone="small_cnn")
    with pytest.raises(DcmlError, match="not a readable Parquet"):
        (tmp_path / "junk.parquet").write_text("junk")
        run(manifest=tmp_path / "junk.parquet", out=out, backbone="small_cnn")
    with pytest.raises(DcmlError, match="no images in split"):
        run(manifest=tiny_manifest, out=out, backbone="small_cnn", splits=("query",))
    with pytest.raises(DcmlError, match="unknown split"):
        run(manifest=tiny_manifest, out=out, backbone="small_cnn", splits=("validation",))
    assert not out.exists()
    assert list(tmp_path.glob(".f.parquet*")) == []


def test_cli_reports_a_bad_manifest_on_one_line(tmp_path, capsys):
    from dcml_app.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["extract", "--manifest", str(tmp_path / "nope.parquet"), "--out", str(tmp_path / "f.parquet"),
              "--backbone", "small_cnn"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "nope.parquet: no such file" in err and "\n" not in err


def test_cli_runs_with_repeated_split(tiny_manifest, tmp_path, capsys):
    from dcml_app.cli import main

    out = tmp_path / "f.parquet"
    main(["extract", "--manifest", str(tiny_manifest), "--out", str(out), "--backbone", "small_cnn",
          "--weights", "none", "--image-size", "28", "--split", "train", "--split", "test"])
    assert "8 x 128 features" in capsys.readouterr().out
    assert len(read_vectors(out)[0]) == 8
