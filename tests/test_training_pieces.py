"""The training package's pieces, each on its own: epoch selection, resume store, grouping and the
divide-and-conquer schedule, batch source, scorer, learning rates, RNG helpers."""

import importlib.util
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dcml.algorithm.models import build_model
from dcml.algorithm.training import TrainSettings, item_seed, seed_everything
from dcml.algorithm.training.batches import BatchSource
from dcml.algorithm.training.grouping import Grouping
from dcml.algorithm.training.optimisation import mined_counts, set_learning_rates
from dcml.algorithm.training.resume import ResumeStore
from dcml.algorithm.training.scoring import Scorer
from dcml.algorithm.training.selection import EpochSelector
from dcml.algorithm.training.settings import resolved_head_init
from dcml.contracts import checkpoint
from dcml.contracts import manifest as manifest_mod
from dcml.contracts.errors import DcmlError

torch.set_num_threads(1)

_spec = importlib.util.spec_from_file_location(
    "fmnist_data", Path(__file__).resolve().parents[1] / "components" / "train" / "tests" / "fmnist_data.py")
fmnist_data = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fmnist_data)


def small_model(k=1, seed=0):
    seed_everything(seed)
    return build_model({"backbone": "small_cnn", "embedding_dim": 8, "num_slices": k})


# -- EpochSelector ------------------------------------------------------------------

def test_selector_keeps_the_best_epoch_ties_keep_the_earlier_and_restores_its_slices():
    model = small_model(k=2)
    sel = EpochSelector("recall@1", patience=2)
    sel.consider(0, {"val_recall@1": 0.5}, model)
    kept = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model.head.weight.add_(1.0)
    model.set_num_slices(1)
    sel.consider(1, {"val_recall@1": 0.5}, model)  # a tie: the earlier stays
    sel.consider(2, {"val_recall@1": 0.4}, model)
    assert sel.best_epoch == 0 and not sel.out_of_patience(1) and sel.out_of_patience(2)
    sel.restore(model)
    assert model.num_slices == 2
    assert all(torch.equal(v, kept[k]) for k, v in model.state_dict().items())
    state = sel.state()
    assert state["epoch"] == 0 and state["score"] == 0.5 and state["num_slices"] == 2
    assert EpochSelector("map@r").state() is None and not EpochSelector("map@r", 0).patience


# -- ResumeStore --------------------------------------------------------------------

def test_resume_store_roundtrip_and_a_foreign_file_is_not_used(tmp_path):
    store = ResumeStore(tmp_path / "r.pt")
    assert store.read("abc") is None  # nothing there yet
    store.save(lambda: {"model_config": {}, "model": {}, "fingerprint": "abc", "x": torch.arange(3)})
    assert torch.equal(store.read("abc")["x"], torch.arange(3))
    with pytest.warns(UserWarning, match="other inputs or settings"):
        assert store.read("other") is None
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.warns(UserWarning, match="unreadable resume file"):
        assert ResumeStore(tmp_path / "bad.pt").read("abc") is None
    assert ResumeStore(None).read("abc") is None


def test_resume_store_lock_sends_a_second_live_run_to_a_private_file(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, sys, time; f = open(sys.argv[1], 'a'); fcntl.flock(f, fcntl.LOCK_EX); "
        "print('held', flush=True); time.sleep(60)"), str(tmp_path / "r.pt.lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        store = ResumeStore(tmp_path / "r.pt")
        with store.lock():
            assert store.path == tmp_path / f"r.{os.getpid()}.pt"
        free = ResumeStore(tmp_path / "s.pt")
        with free.lock():
            assert free.path == tmp_path / "s.pt"
    finally:
        holder.kill()
        holder.wait()


# -- Grouping and the schedule --------------------------------------------------------

def test_grouping_due_epochs_and_whole_embedding_epoch():
    labels = np.repeat(np.arange(6), 4)
    g = Grouping(TrainSettings(epochs=10, recluster_every=3, whole_embedding_after=0.5), labels, 2)
    assert g.clustering and g.due(0)  # no clusters yet
    g.clusters, g.clustered_at = np.zeros(len(labels), np.int64), 0
    assert [e for e in range(10) if g.due(e)] == [3, 6, 9]
    assert g.whole_from == 5
    worker = Grouping(TrainSettings(epochs=10), labels, 2, only_learner=1, clusters=np.arange(24) % 2)
    assert not worker.clustering and worker.whole_from is None
    assert set(worker.clusters[worker.clusters >= 0].tolist()) == {1}  # other clusters' rows left out
    with pytest.raises(DcmlError, match="out of range"):
        Grouping(TrainSettings(), labels, 2, only_learner=2, clusters=np.zeros(24))
    with pytest.raises(DcmlError, match="one per training row"):
        Grouping(TrainSettings(), labels, 2, clusters=np.zeros(3))


def test_grouping_regroup_matches_the_previous_clusters_and_drops_singletons():
    rng = np.random.default_rng(0)
    centres = np.eye(3, 8) * 5
    vectors = np.concatenate([c + 0.1 * rng.normal(size=(20, 8)) for c in centres]).astype(np.float32)
    labels = np.concatenate([b * 10 + np.arange(20) % 5 for b in range(3)])
    labels[0] = 99  # a class of one image
    previous = np.repeat([2, 0, 1], 20)
    g = Grouping(TrainSettings(kmeans_niter=20, seed=1), labels, 3, clusters=previous)
    new = g.regroup(2, lambda kind: vectors)
    np.testing.assert_array_equal(new[1:], previous[1:])  # same blobs keep their learners
    assert new[0] == -1


# -- BatchSource -----------------------------------------------------------------------

def test_batch_source_gives_one_cluster_batches_and_each_process_its_share(tmp_path):
    path = fmnist_data.make_manifest(tmp_path / "m.parquet", per_class=8, train_classes=(0, 1, 2, 3), test_per_class=4)
    man = manifest_mod.read(path)
    rows = man.split("train").reset_index(drop=True)
    labels = np.unique(rows["label"], return_inverse=True)[1]
    clusters = (labels >= 2).astype(np.int64)
    settings = TrainSettings(classes_per_batch=2, images_per_class=4, seed=5)
    model = small_model()
    whole = BatchSource(model, man, rows, labels, settings, torch.device("cpu"))
    sampler = whole.sampler(0, clusters)
    batches = sampler.epoch_batches()
    assert all(len(set(clusters[b].tolist())) == 1 for b in batches)
    images = [x for x, _, _ in whole.loader(whole.sampler(0, clusters), 0)]
    halves = [BatchSource(model, man, rows, labels, settings, torch.device("cpu"), rank=r, world_size=2)
              for r in (0, 1)]
    shares = [[x for x, _, _ in h.loader(h.sampler(0, clusters), 0)] for h in halves]
    for b, x in enumerate(images):
        torch.testing.assert_close(torch.cat([shares[0][b], shares[1][b]]), x, rtol=0, atol=0)


# -- Scorer --------------------------------------------------------------------------

def test_scorer_scores_on_a_forked_rng(tmp_path):
    from dcml.algorithm.metrics import evaluate_embeddings

    path = fmnist_data.make_manifest(tmp_path / "m.parquet", per_class=6, train_classes=(0, 1), test_per_class=6)
    man = manifest_mod.read(path)
    test = man.split("test")
    model = small_model()
    scorer = Scorer(man, torch.device("cpu"), eval_batch_size=7, num_workers=0)
    torch.manual_seed(11)
    expected_next = torch.rand(1)
    torch.manual_seed(11)
    scores = scorer.score(model, test, "test")
    assert torch.equal(torch.rand(1), expected_next)  # scoring drew nothing from the training stream
    vectors = scorer.vectors(model, test, "embedding", "test")
    assert vectors.shape == (len(test), 8)
    reference = evaluate_embeddings(vectors, test["label"].to_numpy(), ks=(1,), include=("recall", "map@r"))
    assert scores == {"recall@1": pytest.approx(reference["recall@1"]), "map@r": pytest.approx(reference["map@r"])}


# -- learning rates, miners' counts, RNG helpers, head init choice ------------------------

def test_learning_rates_warm_up_then_cosine():
    head, backbone = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.Adam([{"params": [backbone], "lr": 1e-3, "name": "backbone"},
                            {"params": [head], "lr": 1e-2, "name": "embedding"}])
    s = TrainSettings(epochs=5, warmup_epochs=1, schedule="cosine")
    set_learning_rates(opt, [1e-3, 1e-2], s, epoch=0, step=0, steps=10, warming_up=True)
    assert [g["lr"] for g in opt.param_groups] == [0.0, 1e-2]
    set_learning_rates(opt, [1e-3, 1e-2], s, epoch=3, step=0, steps=10, warming_up=False)
    factor = 0.5 * (1 + math.cos(math.pi * 2 / 4))
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([1e-3 * factor, 1e-2 * factor])


def test_mined_counts_item_seeds_and_head_init_choice():
    assert mined_counts(None) == (0, 0)
    assert mined_counts((torch.arange(3), torch.arange(3), torch.arange(5), torch.arange(5))) == (3, 5)
    assert mined_counts((torch.arange(4), torch.arange(4), torch.arange(4))) == (4, 4)
    assert item_seed(1, 2, 3, 4) == item_seed(1, 2, 3, 4) != item_seed(1, 2, 3, 5)
    assert resolved_head_init("auto", "imagenet", True) == "pca"
    assert resolved_head_init("auto", "none", True) == "random"
    assert resolved_head_init("pca", "none", False) is None


def test_checkpoint_format_of_a_snapshot_is_weights_only(tmp_path):
    from dcml.algorithm.training import Trainer

    path = fmnist_data.make_manifest(tmp_path / "m.parquet", per_class=6, train_classes=(0, 1, 2), test_per_class=4)
    man = manifest_mod.read(path)
    t = Trainer(small_model(k=1), man, man.split("train"),
                TrainSettings(epochs=1, classes_per_batch=2, images_per_class=3), resume_path=tmp_path / "r.pt")
    t.fit()
    state = torch.load(tmp_path / "r.pt", weights_only=True)
    assert state["epoch"] == 1 and state["fingerprint"] == t.fingerprint
    assert checkpoint.load(tmp_path / "r.pt")["cluster_state"]["k"] == 1
