"""PCA-whitening of the pretrained features (dcml.algorithm.whitening): the maths, the delivered
checkpoint through index / search / export, and head_init=whiten."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from dcml.algorithm import baseline, whitening
from dcml.algorithm.inference import compute_vectors
from dcml.contracts import manifest as manifest_lib
from dcml.contracts.errors import DcmlError
from dcml.model_files import load_model

torch.set_num_threads(1)


def correlated(n=400, d=24, seed=0):
    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((d, d)) * np.logspace(0, -2, d)[None, :]
    return rng.standard_normal((n, d)) @ mix.T + 3.0


def test_full_whitening_gives_unit_covariance_and_plain_pca_at_shrinkage_one():
    x = correlated()
    w = whitening.fit(x, width=10, shrinkage=0.0)
    y = x @ w.weight.T + w.bias
    assert w.width == 10
    np.testing.assert_allclose(y.mean(axis=0), 0, atol=1e-9)
    np.testing.assert_allclose(np.cov(y, rowvar=False), np.eye(10), atol=1e-8)
    pca = whitening.fit(x, width=10, shrinkage=1.0)
    rows = pca.weight / np.linalg.norm(pca.weight, axis=1, keepdims=True)
    np.testing.assert_allclose(rows @ rows.T, np.eye(10), atol=1e-9)  # orthonormal directions, one common scale
    assert np.ptp(np.linalg.norm(pca.weight, axis=1)) < 1e-9
    half = whitening.fit(x, width=10, shrinkage=0.5)
    v = np.var(x @ half.weight.T, axis=0)
    assert v.max() / v.min() < np.var(x @ pca.weight.T, axis=0).max() / np.var(x @ pca.weight.T, axis=0).min()
    assert 1.0 < v.max() / v.min()  # in between: the large directions still count a little more


def test_width_is_capped_at_the_datas_rank_and_bad_settings_are_refused():
    x = correlated(n=12)
    assert whitening.fit(x, width=512).width == 11
    settings = whitening.grid(whitening.Spectrum(x), widths=(8, 512, 1024), shrinkages=(0.5,))
    assert [w.width for w in settings] == [8, 11]
    with pytest.raises(DcmlError, match="shrinkage"):
        whitening.fit(x, width=4, shrinkage=1.5)
    with pytest.raises(DcmlError, match="at least 3"):
        whitening.fit(x[:2])


def test_choose_keeps_the_setting_that_scores_best_on_validation():
    x = correlated()
    picked, score, table = whitening.choose(x[:300], x[300:], lambda v: -abs(v.shape[1] - 16),
                                            widths=(8, 16, 20), shrinkages=(0.25, 0.5))
    assert picked.width == 16 and picked.shrinkage == 0.25 and score == 0  # the first of the ties
    assert len(table) == 6 and {t["width"] for t in table} == {8, 16, 20}


def _baseline_tests():
    """tests/test_baseline.py by path (the suite imports with importlib): its real-cars196 manifest builder."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("baseline_tests", Path(__file__).with_name("test_baseline.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def cars(tmp_path_factory):
    return _baseline_tests().cars_manifest(tmp_path_factory.mktemp("cars") / "manifest.parquet", train=4, val=3,
                                           test=3)


def _whitened_checkpoint(cars, dest: Path):
    from dcml import stagekit
    from dcml.algorithm.models import build_model

    man = manifest_lib.read(cars)
    config = build_model({"backbone": "efficientnet_lite0", "image_size": 48, "embedding_dim": 8,
                          "train_blocks": 2}).config
    pretrained = baseline.backbone_model(config)
    features = compute_vectors(pretrained, man, man.split("train"), kind="features")
    w = whitening.fit(features, width=16, shrinkage=0.25)
    model = baseline.whitened_model(config, w)
    stagekit.write_output(dest, model, {"stage": "finetune", "exec_id": "x"})
    return man, pretrained, w


@pytest.mark.parametrize("kind", ["whitened", "fused"])
def test_the_no_training_and_fused_candidates_are_plain_checkpoints_for_index_search_and_export(cars, tmp_path,
                                                                                               capsys, kind):
    from dcml import stagekit
    from dcml_app.cli import main as dcml_main

    man, pretrained, w = _whitened_checkpoint(cars, tmp_path / "m.pt")
    rows = man.split("test")
    whitened = w.apply(compute_vectors(pretrained, man, rows, kind="features"))
    if kind == "fused":  # a "trained" model (its own head) beside the whitening, as the run delivers it
        trained = build_trained(pretrained.config)
        fused = baseline.fused_model(trained, load_model(tmp_path / "m.pt")[0])
        stagekit.write_output(tmp_path / "m.pt", fused, {"stage": "finetune", "exec_id": "x"})
        expected = baseline.fuse_vectors(compute_vectors(trained, man, rows), whitened)
    else:
        expected = whitened
    model, _ = load_model(tmp_path / "m.pt")
    assert model.embedding_dim == expected.shape[1] == (16 + 8 if kind == "fused" else 16)
    np.testing.assert_allclose(compute_vectors(model, man, rows), expected, atol=1e-5)
    # index, search, export: the same commands as for a trained model
    dcml_main(["index", "--model", str(tmp_path / "m.pt"), "--manifest", str(cars), "--out", str(tmp_path / "idx")])
    capsys.readouterr()
    query = man.root / rows["path"][0]
    dcml_main(["search", "--index", str(tmp_path / "idx"), "--image", str(query), "--format", "json", "--k", "3"])
    found = json.loads(capsys.readouterr().out)[0]["neighbours"]
    assert found[0]["path"] == str(query) and found[0]["score"] == pytest.approx(1.0, abs=1e-5)
    dcml_main(["export", "--model", str(tmp_path / "m.pt"), "--format", "onnx", "--out", str(tmp_path / "m.onnx"),
               "--manifest", str(cars), "--check-images", "4"])
    assert "on 4 real images" in capsys.readouterr().out


def build_trained(config):
    """A stand-in for a trained model: the top blocks and the 8-d head moved away from the pretrained ones."""
    from dcml.algorithm.models import build_model

    torch.manual_seed(0)
    model = build_model({**config, "embedding_dim": 8, "num_slices": 1})
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.01 * torch.randn_like(p))
    return model.eval()


def test_head_init_whiten_starts_training_from_the_whitening(cars, tmp_path):
    from components.train.stage import run as train

    record = train(manifest=cars, out=tmp_path / "t.pt", backbone="efficientnet_lite0", weights="imagenet",
                   image_size=48, embedding_dim=12, train_blocks=2, epochs=0, head_init="whiten", eval_every=0,
                   resume=False)
    assert record["extra"]["head_init"] == "whiten"
    model, _ = load_model(tmp_path / "t.pt")
    man = manifest_lib.read(cars)
    pretrained = baseline.backbone_model(model.config)
    w = whitening.fit(compute_vectors(pretrained, man, man.split("train"), kind="features"), 12,
                      whitening.HEAD_SHRINKAGE)
    val = man.split("val")
    np.testing.assert_allclose(compute_vectors(model, man, val),
                               w.apply(compute_vectors(pretrained, man, val, kind="features")), atol=1e-4)
    # rows scaled to unit norm on average (the PCA head's step size), the embedding unchanged by that
    assert np.linalg.norm(model.head.weight.detach().numpy(), axis=1).mean() == pytest.approx(1.0, rel=1e-4)
