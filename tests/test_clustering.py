import faiss
import numpy as np
import pytest
from sklearn.cluster import KMeans

from dcml.algorithm.clustering import TOL, cluster_sizes, drop_singletons, kmeans, l2_normalize, match_to_previous
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
    ours = kmeans(x, 4, niter=100, seed=0, normalize=False, tol=0)  # tol=0: until the objective stops changing
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


def fashion_mnist_pixels(limit):
    from bench.bench_speed import fashion_mnist_pixels as load

    x = load(limit)
    if x is None:
        pytest.skip("Fashion-MNIST not installed (make fashion-mnist)")
    return x


def test_convergence_stop_is_faiss_own_run_stopped_early():
    """Warm-started single iterations follow faiss's own continuous run and stop where its rule stops."""
    x = l2_normalize(fashion_mnist_pixels(6000))
    ours = kmeans(x, 10, niter=100, seed=1, normalize=False, gpu=False)  # default tol 1e-4
    assert 2 < ours.iterations < 100
    if not hasattr(faiss.ClusteringParameters(), "early_stop_threshold"):
        pytest.skip("this faiss build has no early_stop_threshold to compare with")
    seeding = {"init_method": faiss.ClusteringInitMethod_KMEANS_PLUS_PLUS} if hasattr(
        faiss, "ClusteringInitMethod_KMEANS_PLUS_PLUS") else {}
    native = faiss.Kmeans(x.shape[1], 10, niter=100, seed=1, max_points_per_centroid=600, min_points_per_centroid=1,
                          early_stop_threshold=TOL, **seeding)
    native.train(x)
    assert len(native.obj) == ours.iterations
    np.testing.assert_allclose(ours.centroids, native.centroids, atol=1e-5)
    # Running on changes the objective by less than tol per iteration; it never gets worse.
    longer = kmeans(x, 10, niter=100, seed=1, normalize=False, tol=0, gpu=False)
    assert longer.iterations > ours.iterations
    assert longer.inertia <= ours.inertia * (1 + 1e-6)


@pytest.mark.parametrize("k", [10, 40])
def test_stopped_early_inertia_within_1pct_of_sklearn_on_real_data(k):
    """Fashion-MNIST pixels, as bench_speed compares: scikit-learn run until no label changes."""
    x = l2_normalize(fashion_mnist_pixels(12000))
    ours = kmeans(x, k, seed=0, normalize=False, gpu=False)
    assert ours.iterations < 100
    theirs = KMeans(n_clusters=k, init="k-means++", n_init=1, max_iter=100, tol=0.0, algorithm="lloyd",
                    random_state=0).fit(x)
    sk_inertia = float(((x - theirs.cluster_centers_[theirs.labels_]) ** 2).sum())
    assert ours.inertia <= sk_inertia * 1.01
    direct = ((x.astype(np.float64) - ours.centroids[ours.assignments]) ** 2).sum()
    assert ours.inertia == pytest.approx(direct, rel=1e-4)


def test_restarts_keep_the_best_and_are_reproducible():
    x = l2_normalize(fashion_mnist_pixels(4000))
    singles = [kmeans(x, 8, seed=5 + r, normalize=False, gpu=False).inertia for r in range(3)]
    best = kmeans(x, 8, nredo=3, seed=5, normalize=False, gpu=False)
    assert best.inertia == pytest.approx(min(singles), rel=1e-6)
    again = kmeans(x, 8, nredo=3, seed=5, normalize=False, gpu=False)
    np.testing.assert_array_equal(best.assignments, again.assignments)
    np.testing.assert_array_equal(best.centroids, again.centroids)


def test_k_equals_one_and_bad_k():
    x = np.random.default_rng(0).random((10, 3), dtype=np.float32)
    one = kmeans(x, 1, normalize=False)
    assert (one.assignments == 0).all()
    np.testing.assert_allclose(one.centroids[0], x.mean(axis=0), rtol=1e-6)
    with pytest.raises(DcmlError, match="cannot make 11 clusters"):
        kmeans(x, 11)
    with pytest.raises(DcmlError, match="NaN"):
        kmeans(np.full((10, 3), np.nan, dtype=np.float32), 2)
    with pytest.raises(DcmlError, match="tol=1.5"):
        kmeans(x, 2, tol=1.5)


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
