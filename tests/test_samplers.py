from collections import Counter

import numpy as np
import pytest
import torch

from dcml.contracts.errors import DcmlError
from dcml.algorithm.samplers import ClusterBatchSampler, usable_members


def make_data(seed=0, n_classes=30, k=3):
    """Labels with uneven class sizes (1..15 images) and uneven clusters."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, 16, size=n_classes)
    labels = np.repeat(np.arange(n_classes), sizes)
    clusters = rng.choice(k, size=len(labels), p=[0.6, 0.3, 0.1][:k] if k == 3 else None)
    clusters[rng.random(len(labels)) < 0.05] = -1
    return labels, clusters


def test_every_batch_is_one_cluster_p_classes_m_images():
    labels, clusters = make_data()
    sampler = ClusterBatchSampler(labels, clusters, classes_per_batch=4, images_per_class=3, seed=1)
    usable = usable_members(labels, clusters)
    batches = list(sampler)
    assert len(batches) == sampler.batches_per_epoch > 0
    for batch in batches:
        cl = clusters[batch]
        assert len(set(cl)) == 1 and cl[0] >= 0
        per_class = Counter(labels[batch])
        assert len(per_class) == 4
        assert set(per_class.values()) == {3}
        assert usable[batch].all()


def test_round_robin_and_epoch_ends_with_largest_cluster():
    labels, clusters = make_data()
    sampler = ClusterBatchSampler(labels, clusters, classes_per_batch=4, images_per_class=3, seed=1)
    batches = sampler.epoch_batches()
    order = [int(clusters[b[0]]) for b in batches]
    k = sampler.num_clusters
    assert sampler.cluster_ids == [0, 1, 2]
    assert order == [0, 1, 2] * (len(batches) // k)
    # The largest cluster is used up exactly once: no image of it repeats
    # (apart from top-up chunks), so its batch count equals its pass length.
    largest = max(sampler._pass_len, key=sampler._pass_len.get)
    assert order.count(largest) == sampler._pass_len[largest] == len(batches) // k
    # Smaller clusters restart: some of their images appear more than once.
    smallest = min(sampler._pass_len, key=sampler._pass_len.get)
    assert sampler._pass_len[smallest] < sampler._pass_len[largest]
    seen = Counter(i for b in batches if clusters[b[0]] == smallest for i in b)
    assert max(seen.values()) > 1


def test_one_pass_uses_every_image_of_a_large_class_once():
    # 3 classes x 12 images, P=3, M=4 -> a pass is exactly 3 batches, every image once.
    labels = np.repeat(np.arange(3), 12)
    sampler = ClusterBatchSampler(labels, None, classes_per_batch=3, images_per_class=4, seed=5)
    batches = list(sampler)
    assert len(batches) == 3
    assert sorted(i for b in batches for i in b) == list(range(36))


def test_singletons_and_left_out_rows_are_excluded():
    labels = np.array([0, 0, 1, 1, 2, 3, 3, 4, 4, 5, 5])
    clusters = np.array([0, 0, 0, 0, 0, 1, 1, 1, 1, -1, -1])
    # class 2 has one image in cluster 0; class 5 is left out (-1).
    sampler = ClusterBatchSampler(labels, clusters, classes_per_batch=2, images_per_class=2, seed=0)
    used = {i for _ in range(5) for b in sampler for i in b}
    assert used == {0, 1, 2, 3, 5, 6, 7, 8}
    # A class split 1 + 1 across clusters is a singleton in both.
    labels = np.array([0, 0, 1, 1, 2, 2, 3, 3, 9, 9])
    clusters = np.array([0, 0, 0, 0, 1, 1, 1, 1, 0, 1])
    assert not usable_members(labels, clusters)[8:].any()


def test_plain_class_balanced_when_no_clusters():
    labels = np.repeat(np.arange(10), [2, 3, 4, 5, 6, 7, 8, 9, 10, 1])
    sampler = ClusterBatchSampler(labels, None, classes_per_batch=5, images_per_class=4, seed=2)
    batches = list(sampler)
    assert sampler.num_clusters == 1
    assert all(len(b) == 20 and len(set(labels[b])) == 5 for b in batches)
    assert 54 not in {i for b in batches for i in b}  # the single image of class 9
    # Classes with fewer than M images are drawn with replacement.
    assert any(Counter(b).most_common(1)[0][1] > 1 for b in batches)


def test_same_seed_same_batches_other_seed_other_batches_epochs_differ():
    labels, clusters = make_data()
    a = ClusterBatchSampler(labels, clusters, classes_per_batch=4, images_per_class=3, seed=7)
    b = ClusterBatchSampler(labels, clusters, classes_per_batch=4, images_per_class=3, seed=7)
    c = ClusterBatchSampler(labels, clusters, classes_per_batch=4, images_per_class=3, seed=8)
    first_a, first_b, first_c = list(a), list(b), list(c)
    assert first_a == first_b
    assert first_a != first_c
    assert list(a) != first_a  # the next epoch reshuffles
    assert a.epoch == 2


def test_resume_mid_epoch_yields_the_same_remaining_batches():
    labels, clusters = make_data(seed=3)
    straight = ClusterBatchSampler(labels, clusters, classes_per_batch=3, images_per_class=2, seed=4)
    list(straight)  # epoch 0
    epoch1 = list(straight)
    epoch2 = list(straight)

    interrupted = ClusterBatchSampler(labels, clusters, classes_per_batch=3, images_per_class=2, seed=4)
    list(interrupted)
    it = iter(interrupted)
    taken = [next(it) for _ in range(5)]
    state = interrupted.state_dict()
    assert state["epoch"] == 1 and state["position"] == 5
    # The state survives a weights_only round trip.
    state = _roundtrip(state)

    resumed = ClusterBatchSampler(labels, clusters, classes_per_batch=3, images_per_class=2, seed=4)
    resumed.load_state_dict(state)
    assert len(resumed) == len(epoch1) - 5
    assert taken + list(resumed) == epoch1
    assert list(resumed) == epoch2


def test_resume_with_other_data_is_refused():
    labels, clusters = make_data()
    s = ClusterBatchSampler(labels, clusters, classes_per_batch=3, images_per_class=2, seed=0)
    other = ClusterBatchSampler(labels, np.where(clusters == 2, 1, clusters), classes_per_batch=3, images_per_class=2, seed=0)
    with pytest.raises(DcmlError, match="different"):
        other.load_state_dict(s.state_dict())


def test_works_as_dataloader_batch_sampler():
    labels, clusters = make_data()
    sampler = ClusterBatchSampler(labels, clusters, classes_per_batch=4, images_per_class=2, seed=0)
    dataset = torch.utils.data.TensorDataset(torch.arange(len(labels)), torch.as_tensor(labels))
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler)
    got = [idx.tolist() for idx, _ in loader]
    assert got == sampler.epoch_batches(0)


def test_bad_inputs():
    with pytest.raises(DcmlError, match="two classes"):
        ClusterBatchSampler([0, 0, 1], None, classes_per_batch=2, images_per_class=2)
    with pytest.raises(DcmlError, match="entries"):
        ClusterBatchSampler([0, 0, 1, 1], [0, 0], classes_per_batch=2, images_per_class=2)
    with pytest.raises(DcmlError, match="images_per_class"):
        ClusterBatchSampler([0, 0, 1, 1], None, classes_per_batch=2, images_per_class=1)
    with pytest.warns(UserWarning, match="no batches"):
        s = ClusterBatchSampler([0, 0, 1, 1, 2, 2], [0, 0, 0, 0, 1, 1], classes_per_batch=2, images_per_class=2)
    assert s.cluster_ids == [0]


def _roundtrip(obj):
    import io

    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)
