import faiss
import numpy as np
import pytest
from sklearn.cluster import KMeans

from dcml.algorithm.clustering import cluster_sizes, drop_singletons, kmeans, match_to_previous
from dcml.contracts.errors import DcmlError


def blobs(n=20000, d=8, k=4, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(scale=4.0, size=(k, d))
    which = rng.integers(0, k, size=n)
    return (centers[which] + rng.normal(size=(n, d))).astype(np.float32), which


def centroid_gap(x, result):
    """Largest distance between a centroid and the mean of the points assigned to it."""
    return max(np.abs(result.centroids[c] - x[result.assignments == c].mean(axis=0)).max()
               for c in range(len(result.centroids)))


def test_same_seed_same_result_other_seed_differs():
    x = np.random.default_rng(1).random((3000, 16), dtype=np.float32)
    a = kmeans(x, 8, niter=20, seed=3)
    b = kmeans(x, 8, niter=20, seed=3)
    c = kmeans(x, 8, niter=20, seed=4)
    assert a.assignments.dtype == np.int64 and a.assignments.shape == (3000,)
    np.testing.assert_array_equal(a.assignments, b.assignments)
    np.testing.assert_array_equal(a.centroids, b.centroids)
    assert a.inertia == b.inertia
    assert not np.array_equal(a.centroids, c.centroids)


def test_all_points_are_used_not_faiss_default_subsample():
    # 20000 points > 256 * 4: faiss's default trains on a 1024-point sample,
    # so its centroids are means of the sample, not of all assigned points.
    x, _ = blobs()
    ours = kmeans(x, 4, niter=100, seed=0, normalize=False)
    assert centroid_gap(x, ours) < 1e-4

    plain = faiss.Kmeans(x.shape[1], 4, niter=100, seed=0)
    plain.train(x)
    _, labels = plain.index.search(x, 1)
    plain_result = type(ours)(labels[:, 0].astype(np.int64), plain.centroids, 0.0)
    assert centroid_gap(x, plain_result) > 1e-3


def test_inertia_is_the_sum_of_squared_distances_and_matches_sklearn():
    x, _ = blobs(n=4000, d=6, k=5, seed=2)
    ours = kmeans(x, 5, niter=50, nredo=3, seed=0, normalize=False)
    direct = ((x - ours.centroids[ours.assignments]) ** 2).sum()
    assert ours.inertia == pytest.approx(direct, rel=1e-4)
    reference = KMeans(n_clusters=5, n_init=5, random_state=0).fit(x)
    assert ours.inertia <= reference.inertia_ * 1.01
    assert ours.inertia >= reference.inertia_ * 0.99


def test_normalize_and_spherical():
    x, _ = blobs(n=3000, d=6, k=3, seed=4)
    res = kmeans(x, 3, niter=30, seed=0, normalize=True)
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    direct = ((xn - res.centroids[res.assignments]) ** 2).sum()
    assert res.inertia == pytest.approx(direct, rel=1e-4)
    sph = kmeans(x, 3, niter=30, seed=0, normalize=True, spherical=True)
    np.testing.assert_allclose(np.linalg.norm(sph.centroids, axis=1), 1.0, atol=1e-5)
    direct = ((xn - sph.centroids[sph.assignments]) ** 2).sum()
    assert sph.inertia == pytest.approx(direct, rel=1e-3)


def test_k_equals_one_and_bad_k():
    x = np.random.default_rng(0).random((10, 3), dtype=np.float32)
    one = kmeans(x, 1, normalize=False)
    assert (one.assignments == 0).all()
    np.testing.assert_allclose(one.centroids[0], x.mean(axis=0), rtol=1e-6)
    with pytest.raises(DcmlError, match="cannot make 11 clusters"):
        kmeans(x, 11)
    with pytest.raises(DcmlError, match="NaN"):
        kmeans(np.full((10, 3), np.nan, dtype=np.float32), 2)


def test_hungarian_recovers_a_permuted_labelling():
    rng = np.random.default_rng(0)
    k = 6
    previous = rng.integers(0, k, size=500)
    perm = rng.permutation(k)
    current = perm[previous]
    np.testing.assert_array_equal(match_to_previous(previous, current, k), previous)
    # With 15% of the points moved the mapping is still the inverse permutation.
    noisy = current.copy()
    moved = rng.random(500) < 0.15
    noisy[moved] = rng.integers(0, k, size=moved.sum())
    np.testing.assert_array_equal(match_to_previous(previous, noisy, k), np.argsort(perm)[noisy])
    # Left-out rows stay left out and are ignored for the matching.
    with_gaps = current.copy()
    with_gaps[:50] = -1
    out = match_to_previous(previous, with_gaps, k)
    assert (out[:50] == -1).all()
    np.testing.assert_array_equal(out[50:], previous[50:])


def test_drop_singletons_and_sizes():
    labels = np.array([0, 0, 1, 2, 2, 3])
    assignments = np.array([0, 0, 0, 1, 1, 1])
    np.testing.assert_array_equal(drop_singletons(assignments, labels), [0, 0, -1, 1, 1, -1])
    assert cluster_sizes(drop_singletons(assignments, labels), 3) == [2, 2, 0]
