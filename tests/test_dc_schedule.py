"""Divide and conquer as the reference code trains it: slices alone, then the whole embedding on
one-cluster batches; and the two controls (no slices; random class groups)."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from dcml.algorithm.clustering import random_class_groups
from dcml.algorithm.models import build_model
from dcml.algorithm.training import Trainer, TrainSettings, seed_everything
from dcml.contracts import manifest as manifest_mod
from dcml.contracts.errors import DcmlError

torch.set_num_threads(1)

_spec = importlib.util.spec_from_file_location(
    "fmnist_data", Path(__file__).resolve().parents[1] / "components" / "train" / "tests" / "fmnist_data.py")
fmnist_data = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fmnist_data)

DIM = 16


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = fmnist_data.make_manifest(tmp_path_factory.mktemp("fm") / "manifest.parquet", per_class=12,
                                     train_classes=(0, 1, 2, 3, 4, 5), test_per_class=8)
    man = manifest_mod.read(path)
    return man, man.split("train")


def settings(**kw):
    base = dict(epochs=4, classes_per_batch=2, images_per_class=4, lr_backbone=1e-3, lr_embedding=1e-3,
                recluster_every=1, kmeans_niter=10, seed=3, eval_every=0)
    return TrainSettings(**{**base, **kw})


def new_model(k=2, seed=3):
    seed_everything(seed)
    return build_model({"backbone": "small_cnn", "embedding_dim": DIM, "num_slices": k})


class Recording(Trainer):
    """Records what the loss of every batch sees and the batches of every epoch."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.seen: list[tuple[int, int | None, int, torch.Tensor]] = []
        self.batches: dict[int, tuple[list[list[int]], np.ndarray | None]] = {}

    def forward(self, inputs, learner):
        out = super().forward(inputs, learner)
        self.seen.append((self._epoch_now, learner, out.shape[1], out.detach().norm(dim=1)))
        return out

    def _sampler(self, epoch):
        sampler = super()._sampler(epoch)
        clusters = None if self.clusters is None else self.clusters.copy()
        self.batches[epoch] = (sampler.epoch_batches(), clusters if sampler.num_clusters > 1 else None)
        return sampler


class Crash(Exception):
    pass


def crash_after(n):
    def callback(trainer, entry):
        if trainer.epoch == n:
            raise Crash
    return callback


def one_cluster_each(batches, clusters):
    return all(len(set(clusters[b].tolist())) == 1 and clusters[b[0]] >= 0 for b in batches)


def test_the_loss_sees_slice_k_before_the_switch_and_the_whole_embedding_from_it(tiny):
    man, train = tiny
    t = Recording(new_model(k=2), man, train, settings(whole_embedding_after=0.5))
    history = t.fit()
    assert t.whole_from == 2
    assert [h["loss_on"] for h in history] == ["slice", "slice", "whole", "whole"]
    assert [h["phase"] for h in history] == ["clusters"] * 4
    assert all("cluster_sizes" in h for h in history)  # re-clustering goes on after the switch
    for epoch in range(4):
        batches, clusters = t.batches[epoch]
        assert clusters is not None and one_cluster_each(batches, clusters), epoch
        seen = [s for s in t.seen if s[0] == epoch]
        assert len(seen) == len(batches)
        for (_, learner, width, norms), batch in zip(seen, batches):
            if epoch < 2:  # slice k of the batch's cluster k, unit length
                assert learner == clusters[batch[0]] and width == DIM // 2
            else:  # the whole embedding, one unit vector (slices normalised, then the whole)
                assert learner is None and width == DIM
            torch.testing.assert_close(norms, torch.ones_like(norms), atol=1e-5, rtol=0)
    assert t.model.num_slices == 2  # evaluation still sees K slices, each normalised


@pytest.mark.parametrize("share,epochs,finetune_epoch,first", [
    (8 / 19, 200, 190, 80),  # the reference command: slices alone for epochs 0-79
    (8 / 19, 16, None, 7),
    (0.0, 4, None, 0),
    (1.0, 4, None, None),  # today's slice-only training
    (0.5, 4, 2, 1),
])
def test_switch_epoch_is_the_share_of_the_epochs_before_finetuning(tiny, share, epochs, finetune_epoch, first):
    man, train = tiny
    t = Trainer(new_model(k=2), man, train, settings(epochs=epochs, finetune_epoch=finetune_epoch,
                                                       whole_embedding_after=share))
    assert t.whole_from == first
    one = Trainer(new_model(k=1), man, train, settings(epochs=epochs, whole_embedding_after=share))
    assert one.whole_from is None


def test_slice_only_share_never_switches(tiny):
    man, train = tiny
    history = Recording(new_model(k=2), man, train, settings(epochs=2, whole_embedding_after=1.0)).fit()
    assert [h["loss_on"] for h in history] == ["slice", "slice"]


def test_resume_across_the_switch_is_bit_identical(tiny, tmp_path):
    man, train = tiny
    s = settings(whole_embedding_after=0.5, finetune_epoch=3, epochs=4)
    straight = Trainer(new_model(), man, train, s, resume_path=tmp_path / "a.pt")
    history = straight.fit()
    assert [h.get("loss_on") for h in history] == ["slice", "slice", "whole", None]
    assert history[-1]["phase"] == "finetune"
    first = Trainer(new_model(), man, train, s, resume_path=tmp_path / "b.pt")
    with pytest.raises(Crash):
        first.fit(callbacks=[crash_after(1)])  # killed before the switch
    resumed = Trainer(new_model(), man, train, s, resume_path=tmp_path / "b.pt")
    resumed.fit()
    assert resumed.resumed_from == 1
    for key, value in straight.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[key]), key
    np.testing.assert_array_equal(straight.clusters, resumed.clusters)


def test_control_a_one_embedding_on_one_cluster_batches(tiny):
    man, train = tiny
    t = Recording(new_model(k=1), man, train, settings(epochs=2, num_groups=3))
    history = t.fit()
    assert t.num_groups == 3 and t.model.num_slices == 1
    assert [h["phase"] for h in history] == ["clusters", "clusters"]
    assert [h["loss_on"] for h in history] == ["whole", "whole"]
    assert len(history[0]["cluster_sizes"]) == 3
    for epoch in range(2):
        batches, clusters = t.batches[epoch]
        assert clusters is not None and one_cluster_each(batches, clusters)
        assert set(clusters[clusters >= 0].tolist()) == {0, 1, 2}
    assert all(learner is None and width == DIM for _, learner, width, _ in t.seen)
    with pytest.raises(DcmlError, match="one group per slice"):
        Trainer(new_model(k=2), man, train, settings(num_groups=3))


def test_random_class_groups_are_whole_classes_in_equal_numbers():
    labels = np.repeat(np.arange(10) * 7 + 3, 5)  # 10 classes, sparse label values
    groups = random_class_groups(labels, 4, seed=0)
    for c in np.unique(labels):
        assert len(set(groups[labels == c].tolist())) == 1  # a class never spans two groups
    classes_per_group = [len(np.unique(labels[groups == g])) for g in range(4)]
    assert sorted(classes_per_group) == [2, 2, 3, 3]
    np.testing.assert_array_equal(groups, random_class_groups(labels, 4, seed=0))
    assert not np.array_equal(groups, random_class_groups(labels, 4, seed=1))
    # the trainer's dense labels (0..C-1) draw the same groups as the raw label values
    dense = np.unique(labels, return_inverse=True)[1]
    np.testing.assert_array_equal(groups, random_class_groups(dense, 4, seed=0))
    with pytest.raises(DcmlError, match="lower num_clusters"):
        random_class_groups(labels, 11)


def test_control_b_random_groups_stay_fixed_through_reclustering(tiny):
    man, train = tiny
    t = Recording(new_model(k=2), man, train, settings(epochs=3, grouping="random", whole_embedding_after=0.5))
    history = t.fit()
    labels = train["label"].to_numpy()
    expected = random_class_groups(labels, 2, seed=3)
    for epoch in range(3):
        _, clusters = t.batches[epoch]
        np.testing.assert_array_equal(clusters, expected)
    assert all("cluster_sizes" in h for h in history)
    assert [h["loss_on"] for h in history] == ["slice", "slice", "whole"]


def test_pca_shared_head_gives_k_slices_what_one_head_keeps(tiny):
    """head_init=pca-shared: the K slices together start as K=1's PCA head (directions dealt round-robin),
    not as each cluster's own top directions."""
    man, train = tiny
    shared = Trainer(new_model(k=2), man, train, settings(epochs=0, head_init="pca-shared"), fresh_head=True)
    shared.fit()
    one = Trainer(new_model(k=1), man, train, settings(epochs=0, head_init="pca"), fresh_head=True)
    one.fit()
    w2, w1 = shared.model.head.weight.detach(), one.model.head.weight.detach()
    torch.testing.assert_close(w2[:DIM // 2], w1[0::2], atol=1e-5, rtol=0)
    torch.testing.assert_close(w2[DIM // 2:], w1[1::2], atol=1e-5, rtol=0)
    per_cluster = Trainer(new_model(k=2), man, train, settings(epochs=0, head_init="pca"), fresh_head=True)
    per_cluster.fit()
    assert not torch.allclose(per_cluster.model.head.weight.detach(), w2, atol=1e-3)


# -- try (c): learned masks (the journal version) -------------------------------------------

def test_learned_masks_orthogonality_and_masked_embedding():
    from dcml.algorithm.training.masks import LearnedMasks

    masks = LearnedMasks(3, 4)
    assert float(masks.orthogonality().detach()) == pytest.approx(1.0)  # all ones: identical
    with torch.no_grad():
        masks.weight.copy_(torch.tensor([[1.0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, -2]]))
    assert float(masks.orthogonality().detach()) == pytest.approx(0.0)  # disjoint after the ReLU
    e = torch.nn.functional.normalize(torch.randn(5, 4), dim=1)
    out = masks(e, 0)
    torch.testing.assert_close(out[:, 2:], torch.zeros(5, 2))
    torch.testing.assert_close(out.norm(dim=1), torch.ones(5))


def test_masked_trainer_learns_masks_before_the_switch_and_freezes_them_after(tiny, tmp_path):
    from dcml.algorithm.training import MaskedTrainer

    man, train = tiny
    s = settings(epochs=4, num_groups=2, whole_embedding_after=0.5, mask_orthogonality=1.0)

    class Watched(MaskedTrainer):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            self.after_epoch = []

        def epoch_finished(self, epoch, entry):
            super().epoch_finished(epoch, entry)
            self.after_epoch.append(self.masks.weight.detach().clone())

    t = Watched(new_model(k=1), man, train, s, resume_path=tmp_path / "a.pt")
    history = t.fit()
    assert [h["loss_on"] for h in history] == ["slice", "slice", "whole", "whole"]
    start = torch.ones(2, DIM)
    assert not torch.equal(t.after_epoch[0], start) and not torch.equal(t.after_epoch[1], t.after_epoch[0])
    assert torch.equal(t.after_epoch[2], t.after_epoch[1]) and torch.equal(t.after_epoch[3], t.after_epoch[1])
    assert all("mask_orthogonality" in h for h in history)
    assert t.model.num_slices == 1 and not any("mask" in k for k in t.model.state_dict())  # not delivered
    # killed in the masked phase, resumed: the same weights and masks
    first = MaskedTrainer(new_model(k=1), man, train, s, resume_path=tmp_path / "b.pt")
    with pytest.raises(Crash):
        first.fit(callbacks=[crash_after(1)])
    resumed = MaskedTrainer(new_model(k=1), man, train, s, resume_path=tmp_path / "b.pt")
    resumed.fit()
    assert resumed.resumed_from == 1
    torch.testing.assert_close(resumed.masks.weight, t.masks.weight, rtol=0, atol=0)
    for key, value in t.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[key]), key
    with pytest.raises(DcmlError, match="one slice and the clusters K >= 2"):
        MaskedTrainer(new_model(k=2), man, train, settings(num_groups=2))
