"""Never worse than the backbone: the pretrained features as every run's baseline and as a candidate model.

Real cars196 images (a handful per class, small sizes) and EfficientNet-Lite0's
ImageNet weights: a tiny training set where training cannot help delivers the
pretrained features, a model that does better on the validation classes is
kept, and the delivered checkpoint works in the stages after training.
"""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from dcml.algorithm import baseline
from dcml.algorithm.inference import compute_vectors
from dcml.algorithm.models import build_model
from dcml.contracts import manifest as manifest_lib
from dcml.model_files import load_model

CARS = Path("/work/shared/data/cars196")
torch.set_num_threads(1)


def cars_manifest(dest: Path, train=3, val=6, test=3, per_class=6, test_per_class=4) -> Path:
    """A class-disjoint manifest of real cars196 images: ``train`` training classes,
    ``val`` validation classes (drawn, as dcml does, from the training half) and ``test`` test classes."""
    if not CARS.is_dir():
        pytest.skip(f"{CARS}: cars196 not here")
    classes = sorted(p.name for p in CARS.iterdir() if p.is_dir())
    rows = []
    for split, names, count in (("train", classes[:train], per_class), ("val", classes[train:train + val], per_class),
                                ("test", classes[98:98 + test], test_per_class)):
        for name in names:
            for f in sorted((CARS / name).iterdir())[:count]:
                rows.append({"image_id": f"{name[:3]}-{f.stem}", "path": f"{name}/{f.name}", "label": int(name[:3]),
                             "class_name": name, "split": split})
    manifest_lib.write(dest, pd.DataFrame(rows), {"dataset": "cars196-tiny", "root": str(CARS),
                                                  "fingerprint": "cb" * 32, "split_mode": "class-disjoint"})
    return dest


@pytest.fixture(scope="module")
def cars(tmp_path_factory):
    return cars_manifest(tmp_path_factory.mktemp("cars") / "manifest.parquet")


def brute_recall_at_1(x: np.ndarray, labels: np.ndarray) -> float:
    """Recall@1 by hand: each row's nearest other row by cosine similarity."""
    sims = x @ x.T
    np.fill_diagonal(sims, -np.inf)
    return float(np.mean(labels[sims.argmax(axis=1)] == labels))


def test_backbone_model_embeds_the_normalised_pretrained_features(cars, tmp_path):
    from dcml import stagekit

    config = build_model({"backbone": "efficientnet_lite0", "image_size": 48, "embedding_dim": 16,
                          "train_blocks": 3}).config
    model = baseline.backbone_model(config)
    assert model.embedding_dim == 1280 and model.num_slices == 1 and model.config["train_blocks"] == 3
    man = manifest_lib.read(cars)
    rows = man.split("val")
    fresh = build_model({"backbone": "efficientnet_lite0", "image_size": 48})
    features = compute_vectors(fresh, man, rows, kind="features")
    expected = features / np.linalg.norm(features, axis=1, keepdims=True)
    np.testing.assert_allclose(compute_vectors(model, man, rows), expected, atol=1e-5)
    # As a checkpoint it loads like any dcml model and embeds the same.
    stagekit.write_output(tmp_path / "m.pt", model, {"stage": "finetune", "exec_id": "x"})
    loaded, _ = load_model(tmp_path / "m.pt")
    np.testing.assert_allclose(compute_vectors(loaded, man, rows), expected, atol=1e-5)


def test_no_baseline_without_pretrained_weights():
    assert "weights=none" in baseline.available({"weights": "none"})
    assert baseline.available({"weights": "imagenet"}) is None
    model = build_model({"backbone": "small_cnn", "embedding_dim": 8})
    rows = pd.DataFrame({"image_id": ["a"], "label": [0], "split": ["val"]})
    kept, metrics = baseline.select(model, None, rows, "recall@1")
    assert kept is model and "weights=none" in metrics["baseline_skipped"]
    pretrained = build_model({"backbone": "efficientnet_lite0", "image_size": 32, "embedding_dim": 8})
    kept, metrics = baseline.select(pretrained, None, rows.iloc[:0], "recall@1")
    assert kept is pretrained and "no validation split" in metrics["baseline_skipped"]


def test_extract_scores_the_pretrained_features_on_val_and_test(cars, tmp_path):
    from components.extract.stage import run as extract

    record = extract(manifest=cars, out=tmp_path / "f.parquet", image_size=48, batch_size=16, score=True)
    m = record["metrics"]
    man = manifest_lib.read(cars)
    fresh = build_model({"backbone": "efficientnet_lite0", "image_size": 48})
    for split in ("val", "test"):
        rows = man.split(split)
        x = compute_vectors(fresh, man, rows, kind="features")
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        assert m[f"pretrained_{split}_recall@1"] == pytest.approx(brute_recall_at_1(x, rows["label"].to_numpy()))
        assert 0 < m[f"pretrained_{split}_map@r"] <= 1
    skipped = extract(manifest=cars, out=tmp_path / "g.parquet", backbone="small_cnn", image_size=28, score=True)
    assert "weights=none" in skipped["extra"]["baseline_skipped"]
    assert not any(k.startswith("pretrained_") for k in skipped["metrics"])


def _train_then_finetune(manifest, work: Path, **finetune_extra) -> dict:
    """A short training where training cannot help: 3 training classes, a narrow head, a high learning rate."""
    from components.finetune.stage import run as finetune
    from components.train.stage import run as train

    common = dict(classes_per_batch=3, images_per_class=3, batches_per_epoch=2, seed=0, eval_every=0,
                  lr_backbone=1e-3, lr_embedding=1e-3)
    train(manifest=manifest, out=work / "train.pt", backbone="efficientnet_lite0", weights="imagenet", image_size=64,
          embedding_dim=8, train_blocks=2, epochs=2, resume=False, **common)
    return finetune(manifest=manifest, checkpoints=[work / "train.pt"], out=work / "model.pt", epochs=1,
                    resume=False, **common, **finetune_extra)


def test_tiny_training_set_delivers_the_pretrained_features(cars, tmp_path, capsys, monkeypatch):
    """3 training classes: the delivered model is at least as good as the backbone on validation, and says so."""
    monkeypatch.setenv("DCML_EVENTS", "1")  # the summary line `dcml run` shows for the stage
    record = _train_then_finetune(cars, tmp_path)
    m = record["metrics"]
    man = manifest_lib.read(cars)
    val = man.split("val")
    delivered, _ = load_model(tmp_path / "model.pt")
    pretrained = baseline.backbone_model(delivered.config)
    delivered_r1 = baseline.score_model(delivered, man, val)["recall@1"]
    pretrained_r1 = baseline.score_model(pretrained, man, val)["recall@1"]
    assert delivered_r1 >= pretrained_r1
    # Here the 8-d head trained on 3 classes loses to the 1280-d features: they are delivered.
    assert m["delivered"] == baseline.PRETRAINED and m["trained_val_recall@1"] < m["pretrained_val_recall@1"]
    assert m["pretrained_val_recall@1"] == pytest.approx(pretrained_r1)
    assert delivered.embedding_dim == 1280 and delivered_r1 == pytest.approx(pretrained_r1)
    out = capsys.readouterr().out
    summary = [json.loads(line.split(" ", 1)[1])["text"] for line in out.splitlines() if '"summary"' in line]
    assert "delivered the pretrained features" in summary[-1]
    # the trained model competes fused with the raw features (the whitening did not win beyond the noise here)
    assert not m["whitening_adopted"] and m["choice_challenger"] == baseline.FUSED
    assert f"R@1 {m['pretrained_val_recall@1']:.4f} vs {m['fused_val_recall@1']:.4f}" in summary[-1]


def test_the_parameter_turns_the_candidate_off(cars, tmp_path):
    record = _train_then_finetune(cars, tmp_path, baseline_candidate=False)
    assert "delivered" not in record["metrics"]
    assert load_model(tmp_path / "model.pt")[0].embedding_dim == 8


def test_a_model_better_on_validation_is_kept(cars):
    """A head fitted on the validation classes' own features (a stand-in for training that
    helps) beats the raw features on validation, measured the same way: it is kept."""
    from sklearn.discriminant_analysis import LinearDiscriminantAnalysis

    man = manifest_lib.read(cars)
    val = man.split("val")
    model = build_model({"backbone": "efficientnet_lite0", "image_size": 48, "embedding_dim": 5})
    x = compute_vectors(model, man, val, kind="features").astype(np.float64)
    lda = LinearDiscriminantAnalysis(n_components=5).fit(x, val["label"].to_numpy())
    with torch.no_grad():
        model.head.weight.copy_(torch.as_tensor(lda.scalings_[:, :5].T, dtype=torch.float32))
        model.head.bias.copy_(torch.as_tensor(-(lda.xbar_ @ lda.scalings_[:, :5]), dtype=torch.float32))
    kept, metrics = baseline.select(model, man, val, "recall@1", fusion=False)
    assert kept is model and metrics["delivered"] == baseline.TRAINED
    assert metrics["trained_val_recall@1"] > metrics["pretrained_val_recall@1"]
    assert metrics["trained_val_recall@1"] == pytest.approx(baseline.score_model(model, man, val)["recall@1"])
    assert baseline.choice_line(metrics).startswith("delivered the trained model: it beats the ")
    assert metrics["choice_decided"] and metrics["choice_low"] > 0 and baseline.noise_warning(metrics) is None
    # With fusion (the default) the trained model competes beside the raw features, as one model.
    fused, metrics = baseline.select(model, man, val, "recall@1")
    assert metrics["delivered"] == baseline.FUSED and fused.embedding_dim == 5 + 1280
    own = compute_vectors(model, man, val)
    raw = compute_vectors(baseline.backbone_model(model.config), man, val)
    np.testing.assert_allclose(compute_vectors(fused, man, val), baseline.fuse_vectors(own, raw), atol=1e-5)
    assert metrics["fused_val_recall@1"] == pytest.approx(baseline.score_model(fused, man, val)["recall@1"])
    assert baseline.choice_line(metrics).startswith("delivered the trained model beside the pretrained features: it "
                                                    "beats the pretrained features on validation")


def test_headline_from_a_runs_lineage():
    lineage = [{"stage": "evaluate", "metrics": {"recall@1": 0.5}},
               {"stage": "finetune", "metrics": baseline.choice_metrics("map@r", baseline.TRAINED, 0.2, 0.1)},
               {"stage": "extract", "params": {"model": None},
                "metrics": {"pretrained_test_recall@1": 0.4, "pretrained_test_map@r": 0.05,
                            "pretrained_val_recall@1": 0.3, "pretrained_val_map@r": 0.1}}]
    effect = baseline.from_lineage(lineage, {"recall@1": 0.5, "map@r": 0.08})
    assert baseline.headline(effect) == ("pretrained features -> trained: R@1 0.4000 -> 0.5000 (+10.0 points), "
                                         "MAP@R 0.0500 -> 0.0800")
    assert effect["choice"]["delivered"] == baseline.TRAINED
    assert baseline.choice_line(effect["choice"]) == ("delivered the trained model (validation MAP@R 0.2000 vs "
                                                      "0.1000 for the pretrained features)")
    skipped = [{"stage": "extract", "params": {}, "metrics": {}, "extra": {"baseline_skipped": "weights=none: x"}}]
    assert baseline.headline(baseline.from_lineage(skipped, {})) == "pretrained features: none (weights=none: x)"
    assert baseline.from_lineage([{"stage": "train-dfml"}], {}) == {}


def _lineage_files(tmp_path: Path, pretrained_r1: float, final_r1: float, delivered: str) -> Path:
    """extract -> cluster -> train -> finetune -> evaluate records in real artifact files."""
    from dcml.contracts import records
    from dcml.contracts.io import write_json

    def stage(name, params, inputs=None, metrics=None):
        rec = records.StageTimer(name, params).finish(inputs=inputs, metrics=metrics)
        folder = tmp_path / name
        folder.mkdir()
        write_json(folder / "record.json", {"record": rec})
        return folder

    extract = stage("extract", {"backbone": "efficientnet_lite0", "model": None, "score": True},
                    metrics={"pretrained_val_recall@1": 0.3, "pretrained_val_map@r": 0.1,
                             "pretrained_test_recall@1": pretrained_r1, "pretrained_test_map@r": 0.05})
    cluster = stage("cluster", {"k": 1}, inputs={"features": extract})
    train = stage("train", {"mode": "shared", "num_slices": 1}, inputs={"clusters": cluster},
                  metrics={"initial_recall@1": 0.2})
    chosen = baseline.choice_metrics("recall@1", delivered, 0.25, 0.3 if delivered == baseline.PRETRAINED else 0.2)
    finetune = stage("finetune", {"epochs": 1}, inputs={"checkpoints": [train]}, metrics=chosen)
    metrics = {"recall@1": final_r1, "map@r": 0.07}
    evaluate = records.StageTimer("evaluate", {"ks": [1]}).finish(inputs={"model": finetune}, metrics=metrics)
    write_json(tmp_path / "metrics.json", {"metrics": metrics, "record": evaluate})
    return tmp_path / "metrics.json"


def test_headline_reaches_the_console_mlflow_and_compare(tmp_path, monkeypatch):
    from click.testing import CliRunner
    from mlflow.tracking import MlflowClient

    from dcml import tracking
    from dcml_app.cli import cli
    from dcml_app.runner import _training_effect, training_lines

    uri = f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    won = _lineage_files(tmp_path / "a", 0.40, 0.50, baseline.TRAINED)
    lost = _lineage_files(tmp_path / "b", 0.45, 0.45, baseline.PRETRAINED)
    lines = training_lines(_training_effect(lost))
    assert lines[0].startswith("pretrained features -> delivered (pretrained features): R@1 0.4500 -> 0.4500 (+0.0 points)")
    assert "[untrained head: R@1 0.2000]" in lines[0]
    assert lines[1] == "delivered the pretrained features: they beat the trained model on validation (R@1 0.3000 vs 0.2500)"
    client = MlflowClient(uri)
    run = client.get_run(tracking.log_pipeline_run(str(won), experiment="headline", run_name="won"))
    assert run.data.metrics["pretrained.recall_at_1"] == pytest.approx(0.40)
    assert run.data.metrics["trained.val_recall_at_1"] == pytest.approx(0.25)
    assert run.data.tags["dcml.delivered"] == baseline.TRAINED
    assert run.data.tags["dcml.headline"].startswith("pretrained features -> trained: R@1 0.4000 -> 0.5000")
    tracking.log_pipeline_run(str(lost), experiment="headline", run_name="lost")
    result = CliRunner().invoke(cli, ["compare", "--experiment", "headline", "--format", "csv"])
    assert result.exit_code == 0, result.output
    header, *rows = [line.split(",") for line in result.output.strip().splitlines()]
    assert header[:3] == ["run", "pretrained -> trained R@1", "delivered"]
    assert rows[0][:3] == ["won", "0.4000 -> 0.5000 (+10.0)", "trained"]
    assert rows[1][:3] == ["lost", "0.4500 -> 0.4500 (+0.0)", "pretrained features"]


def test_dfml_scores_and_weighs_the_pretrained_features_itself(cars, tmp_path):
    """DFML's pipeline has no extract stage: its training stage scores the baseline on test too."""
    from components.dfml.stage import run as train_dfml

    record = train_dfml(manifest=cars, out=tmp_path / "dfml.pt", image_size=48, embedding_dim=8, epochs=1,
                        classes_per_batch=3, images_per_class=3, batches_per_epoch=1, eval_every=0, resume=False)
    m = record["metrics"]
    assert m["delivered"] in (baseline.TRAINED, baseline.PRETRAINED, baseline.WHITENED, baseline.FUSED)
    man = manifest_lib.read(cars)
    pretrained = baseline.backbone_model(load_model(tmp_path / "dfml.pt")[0].config)
    assert m["pretrained_test_recall@1"] == pytest.approx(baseline.score_model(pretrained, man, man.split("test"))["recall@1"])
    delivered = load_model(tmp_path / "dfml.pt")[0]
    beside = m["whitened_width"] if m["whitening_adopted"] else 1280
    assert delivered.embedding_dim == {baseline.PRETRAINED: 1280, baseline.TRAINED: 8, baseline.FUSED: 8 + beside,
                                       baseline.WHITENED: m["whitened_width"]}[m["delivered"]]
    effect = baseline.from_lineage([{"stage": "evaluate", "metrics": {"recall@1": 0.5}}, record], {"recall@1": 0.5})
    assert effect["pretrained_recall@1"] == m["pretrained_test_recall@1"] and effect["choice"]["delivered"] == m["delivered"]
