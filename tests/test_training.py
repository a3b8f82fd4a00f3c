import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from dcml.contracts import checkpoint
from dcml.contracts import manifest as manifest_mod
from dcml.contracts.errors import DcmlError
from dcml.algorithm.models import build_model
from dcml.algorithm.training import Trainer, TrainSettings, rng_state, seed_everything, set_rng_state

torch.set_num_threads(1)

_spec = importlib.util.spec_from_file_location(
    "fmnist_data", Path(__file__).resolve().parents[1] / "components" / "train" / "tests" / "fmnist_data.py")
fmnist_data = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fmnist_data)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = fmnist_data.make_manifest(tmp_path_factory.mktemp("fm") / "manifest.parquet", per_class=12, train_classes=(0, 1, 2, 3, 4), test_per_class=8)
    man = manifest_mod.read(path)
    return man, man.split("train"), man.split("test")


def settings(**kw):
    base = dict(epochs=3, classes_per_batch=3, images_per_class=4, lr_backbone=1e-3, lr_embedding=1e-3,
                recluster_every=1, finetune_epoch=2, kmeans_niter=10, seed=3)
    base.update(kw)
    return TrainSettings(**base)


def new_model(k=2, seed=3):
    seed_everything(seed)
    return build_model({"backbone": "small_cnn", "embedding_dim": 16, "num_slices": k})


class Crash(Exception):
    pass


def crash_after(n):
    def callback(trainer, entry):
        if trainer.epoch == n:
            raise Crash
    return callback


def strip_timing(history):
    drop = {"seconds", "images_per_s", "clustering_s", "eval_s"}
    return [{k: v for k, v in h.items() if k not in drop} for h in history]


def test_resume_after_a_crash_ends_with_identical_weights(tiny, tmp_path):
    man, train, test = tiny
    s = settings(eval_every=2)
    straight = Trainer(new_model(), man, train, s, eval_rows=test, resume_path=tmp_path / "a.pt")
    history = straight.fit()
    # The run covers every phase: clustering, a re-clustering, fine-tuning.
    assert [h["phase"] for h in history] == ["clusters", "clusters", "finetune"]
    assert "cluster_sizes" in history[0] and "cluster_sizes" in history[1]
    assert history[2]["num_slices"] == 1
    assert "recall@1" not in history[0] and 0 <= history[1]["recall@1"] <= 1 and "recall@1" in history[2]

    first = Trainer(new_model(), man, train, s, eval_rows=test, resume_path=tmp_path / "b.pt")
    with pytest.raises(Crash):
        first.fit(callbacks=[crash_after(1)])
    saved = torch.load(tmp_path / "b.pt", weights_only=True)  # the resume file needs no pickle
    assert saved["epoch"] == 1 and saved["cluster_state"]["assignments"] is not None

    resumed = Trainer(new_model(), man, train, s, eval_rows=test, resume_path=tmp_path / "b.pt")
    resumed_history = resumed.fit()
    assert resumed.epoch == 3
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert strip_timing(resumed_history) == strip_timing(history)
    np.testing.assert_array_equal(straight.clusters, resumed.clusters)


def test_resume_with_worker_processes(tiny, tmp_path):
    man, train, _ = tiny
    s = settings(epochs=2, finetune_epoch=None, recluster_every=0, num_workers=1)
    straight = Trainer(new_model(k=1), man, train, s, resume_path=tmp_path / "a.pt")
    straight.fit()
    first = Trainer(new_model(k=1), man, train, s, resume_path=tmp_path / "b.pt")
    with pytest.raises(Crash):
        first.fit(callbacks=[crash_after(1)])
    resumed = Trainer(new_model(k=1), man, train, s, resume_path=tmp_path / "b.pt")
    resumed.fit()
    for key, value in straight.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[key]), key


def test_a_resume_file_of_other_settings_is_not_used(tiny, tmp_path):
    man, train, _ = tiny
    s = settings(epochs=1, finetune_epoch=None)
    t = Trainer(new_model(), man, train, s, resume_path=tmp_path / "r.pt")
    t.fit()
    other = Trainer(new_model(), man, train, settings(epochs=1, finetune_epoch=None, lr_embedding=5e-4),
                    resume_path=tmp_path / "r.pt")
    with pytest.warns(UserWarning, match="other inputs or settings"):
        assert not other.try_resume()
    same = Trainer(new_model(), man, train, s, resume_path=tmp_path / "r.pt")
    assert same.try_resume() and same.epoch == 1


def test_loss_goes_down_on_real_images(tiny):
    man, train, _ = tiny
    from dcml.algorithm.data import ManifestImageDataset, build_transform
    from dcml.algorithm.losses import build_loss, build_miner

    model = new_model(k=1, seed=0)
    eval_set = ManifestImageDataset(man, train, build_transform(model.config, train=False))
    x = torch.stack([eval_set[i][0] for i in range(len(eval_set))])
    y = torch.tensor(train["label"].to_numpy())
    loss_fn, miner = build_loss("margin", embedding_dim=16), build_miner("reference")

    def fixed_loss():
        model.eval()
        with torch.no_grad():
            emb = model(x)
            return float(loss_fn(emb, y, miner(emb, y)))

    before = fixed_loss()
    history = Trainer(model, man, train, settings(epochs=4, finetune_epoch=None, classes_per_batch=6)).fit()
    after = fixed_loss()
    assert after < before, (before, after)
    assert history[-1]["loss"] < 0.8 * history[0]["loss"], [h["loss"] for h in history]
    assert all(h["mined_pos_pairs"] > 0 and h["nonzero_terms"] > 0 for h in history)


def test_nan_loss_stops_with_a_clear_error(tiny, tmp_path):
    man, train, _ = tiny
    t = Trainer(new_model(k=1), man, train, settings(epochs=3, finetune_epoch=None, lr_backbone=1e30, lr_embedding=1e30),
                resume_path=tmp_path / "r.pt")
    with pytest.raises(DcmlError, match="loss became nan.*without writing a model"):
        t.fit()


def test_worker_trains_only_its_slice_and_frozen_backbone_stays(tiny):
    man, train, _ = tiny
    clusters = np.arange(len(train)) % 3  # every class is in every cluster
    model = new_model(k=3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    t = Trainer(model, man, train, settings(epochs=1, finetune_epoch=None, recluster_every=0, freeze_backbone=True),
                clusters=clusters, only_learner=1)
    history = t.fit()
    assert history[0]["phase"] == "worker"
    assert "backbone" not in history[0]["lr"]
    after = model.state_dict()
    start, stop = model.slice_bounds(1)
    for key in before:
        if key.startswith("backbone."):
            assert torch.equal(before[key], after[key]), key  # BatchNorm buffers included
    for key in ("head.weight", "head.bias"):
        assert torch.equal(before[key][:start], after[key][:start])
        assert torch.equal(before[key][stop:], after[key][stop:])
        assert not torch.equal(before[key][start:stop], after[key][start:stop])
    # Only cluster 1's rows were used.
    assert set(t._sampler(0).cluster_ids) == {1}


def test_settings_and_input_errors(tiny):
    man, train, _ = tiny
    with pytest.raises(DcmlError, match="cluster_on"):
        settings(cluster_on="pixels")
    with pytest.raises(DcmlError, match="out of range"):
        Trainer(new_model(k=2), man, train, settings(), clusters=np.zeros(len(train)), only_learner=2)
    with pytest.raises(DcmlError, match="K=2"):
        Trainer(new_model(k=2), man, train, settings(), clusters=np.full(len(train), 2))
    with pytest.raises(DcmlError, match="one per training row"):
        Trainer(new_model(k=2), man, train, settings(), clusters=np.zeros(3))


def test_rng_state_roundtrip_is_weights_only_loadable(tmp_path):
    import random

    seed_everything(5)
    state = rng_state()
    checkpoint.save(tmp_path / "rng.pt", {"model_config": {}, "model": {}, "rng": state})
    expected = (torch.rand(3), np.random.rand(3), random.random())
    torch.manual_seed(0), np.random.seed(0), random.seed(0)
    set_rng_state(checkpoint.load(tmp_path / "rng.pt")["rng"])
    got = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(expected[0], got[0]) and np.array_equal(expected[1], got[1]) and expected[2] == got[2]


def test_evaluating_during_training_does_not_change_what_is_trained(tiny, tmp_path):
    man, train, test = tiny
    weights = []
    for every in (0, 1):
        t = Trainer(new_model(), man, train, settings(eval_every=every), eval_rows=test, val_rows=test.iloc[:20])
        t.fit()
        weights.append(t.model.state_dict())
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
