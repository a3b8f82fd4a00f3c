"""dcml.algorithm.metrics against pytorch-metric-learning's AccuracyCalculator, value for value."""

from __future__ import annotations

import gzip
from pathlib import Path

import faiss
import numpy as np
import pytest
import torch
from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator
from sklearn.metrics import adjusted_mutual_info_score

from dcml.algorithm import metrics as metrics_lib
from dcml.contracts.errors import DcmlError
from dcml.algorithm.metrics import adjusted_mutual_info, evaluate_embeddings

FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
TOL = 1e-6


def pml_reference(query, query_labels, reference=None, reference_labels=None, ks=(1, 2, 4, 8), k="max_bin_count",
                  clustering=True):
    """PML's numbers under dcml's key names. Recall@K is not built into PML; it
    is added the way PML documents (a ``calculate_<name>`` method over PML's own
    ``knn_labels`` and lone-query mask), so it shares PML's kNN and exclusions."""

    def recall_at(kk):
        def calculate(self, knn_labels, query_labels, not_lone_query_mask, **kwargs):
            knn = knn_labels[not_lone_query_mask][:, :kk]
            labels = query_labels[not_lone_query_mask]
            return torch.any(knn == labels[:, None], dim=1).double().mean().item()
        return calculate

    recall_names = [f"recall_at_{kk}" for kk in ks]
    methods = {f"calculate_{name}": recall_at(kk) for name, kk in zip(recall_names, ks)}
    methods["requires_knn"] = lambda self: AccuracyCalculator.requires_knn(self) + recall_names
    calc_class = type("PMLWithRecall", (AccuracyCalculator,), methods)
    include = ["precision_at_1", "r_precision", "mean_average_precision_at_r", *recall_names]
    if clustering:
        include += ["NMI", "AMI"]
    calc = calc_class(include=tuple(include), k=k, device=torch.device("cpu"))
    got = calc.get_accuracy(query, query_labels, reference, reference_labels)
    out = {f"recall@{kk}": got[name] for name, kk in zip(recall_names, ks)}
    out.update(r_precision=got["r_precision"], **{"map@r": got["mean_average_precision_at_r"]})
    if 1 in ks:  # the added Recall@1 is PML's own precision_at_1
        assert out["recall@1"] == pytest.approx(got["precision_at_1"], abs=1e-12)
    if clustering:
        out.update(nmi=got["NMI"], ami=got["AMI"])
    return out


def assert_same(ours: dict, theirs: dict):
    assert set(ours) == set(theirs)
    for key in theirs:
        assert ours[key] == pytest.approx(theirs[key], abs=TOL), key


def dcml_k(labels_q, labels_r, ks, self_count):
    """The k dcml searches with, to hand PML the same neighbour list."""
    counts = {lab: int(np.sum(labels_r == lab)) for lab in np.unique(labels_q)}
    return min(max(max(counts.values()) - self_count, max(ks)), len(labels_r) - self_count)


def clustered(n, classes, dim, noise, seed, sizes=None):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n) if sizes is None else np.repeat(np.arange(len(sizes)), sizes)
    centres = rng.standard_normal((classes if sizes is None else len(sizes), dim)).astype(np.float32)
    x = centres[labels] + noise * rng.standard_normal((len(labels), dim)).astype(np.float32)
    perm = rng.permutation(len(labels))
    return x[perm].astype(np.float32), labels[perm]


def test_random_embeddings_with_exact_duplicates_match_pml():
    x, y = clustered(600, 25, 16, noise=1.5, seed=0)
    rng = np.random.default_rng(1)
    # Exact duplicate vectors, inside a class and across classes, several copies each:
    # the query's own row is then one of several at distance 0.
    for _ in range(60):
        src = rng.integers(0, len(x))
        dst = rng.choice(len(x), size=rng.integers(1, 6), replace=False)
        x[dst] = x[src]
    # Duplicates of a single vector beyond k+1: some queries don't find themselves in their k+1 list.
    x[:40] = x[40]
    ks = (1, 2, 4, 8)
    k = dcml_k(y, y, ks, 1)
    # Both self-exclusion cases occur: the own row is not first, or not in the k+1 list at all.
    index = faiss.IndexFlatL2(x.shape[1])
    index.add(x)
    _, found = index.search(x, k + 1)
    own = found == np.arange(len(x))[:, None]
    assert (~own[:, 0]).sum() > 40 and (~own.any(axis=1)).sum() > 0
    assert_same(evaluate_embeddings(x, y, ks=ks), pml_reference(x, y, ks=ks, k=k))


def test_self_is_dropped_by_index():
    found = np.array([[7, 5, 9], [6, 8, 2], [3, 4, 1]])  # rows are queries 5, 6, 7
    np.testing.assert_array_equal(metrics_lib._drop_self(found, start=5), [[7, 9], [8, 2], [3, 4]])


def _fashion_mnist(n):
    images = FASHION_MNIST / "t10k-images-idx3-ubyte.gz"
    labels = FASHION_MNIST / "t10k-labels-idx1-ubyte.gz"
    if not images.is_file() or not labels.is_file():
        pytest.skip("Fashion-MNIST not installed at /usr/share/datasets/fashion-mnist")
    with gzip.open(images) as f:
        pixels = np.frombuffer(f.read(), dtype=np.uint8, offset=16).reshape(-1, 784)[:n]
    with gzip.open(labels) as f:
        y = np.frombuffer(f.read(), dtype=np.uint8, offset=8)[:n].astype(np.int64)
    from sklearn.decomposition import PCA

    x = PCA(64, random_state=0).fit_transform(pixels.astype(np.float32) / 255.0).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True), y


def test_real_fashion_mnist_features_match_pml():
    x, y = _fashion_mnist(2000)
    ks = (1, 2, 4, 8)
    ours = evaluate_embeddings(x, y, ks=ks)
    # ten classes of ~200: PML's k="max_bin_count" search is the one dcml does.
    assert_same(ours, pml_reference(x, y, ks=ks))
    assert 0.6 < ours["recall@1"] < 0.95 and 0.3 < ours["nmi"] < 0.8


def test_real_digits_features_match_pml():
    from sklearn.datasets import load_digits

    digits = load_digits()
    x, y = digits.data.astype(np.float32), digits.target
    ks = (1, 2, 4, 8, 16)
    ours = evaluate_embeddings(x, y, ks=ks)
    assert_same(ours, pml_reference(x, y, ks=ks))
    assert ours["recall@1"] > 0.95


def test_query_vs_gallery_matches_pml():
    x, y = clustered(900, 40, 24, noise=1.2, seed=3)
    query, query_labels = x[:300], y[:300]
    gallery, gallery_labels = x[300:], y[300:]
    # A query class missing from the gallery: such queries are left out (R = 0).
    gallery_labels = np.where(gallery_labels == 7, 1000, gallery_labels)
    gallery[:3] = query[:3]  # a gallery copy of a query is a real hit, not "self"
    ks = (1, 5, 10, 20)
    details = {}
    ours = evaluate_embeddings(query, query_labels, gallery, gallery_labels, ks=ks, details=details)
    theirs = pml_reference(query, query_labels, gallery, gallery_labels, ks=ks,
                           k=dcml_k(query_labels, gallery_labels, ks, 0))
    assert_same(ours, theirs)
    assert details["num_lone_queries"] == int(np.sum(query_labels == 7)) > 0
    assert details["ref_includes_query"] is False


def test_sop_style_ks_larger_than_classes_match_pml():
    # SOP-like: many small classes (2..12 images), K up to 100 > every class size.
    rng = np.random.default_rng(5)
    sizes = rng.integers(2, 13, 150)
    x, y = clustered(0, 0, 32, noise=0.9, seed=6, sizes=sizes)
    ks = (1, 10, 100)
    ours = evaluate_embeddings(x, y, ks=ks)
    assert_same(ours, pml_reference(x, y, ks=ks, k=dcml_k(y, y, ks, 1)))
    assert ours["recall@1"] < ours["recall@10"] < ours["recall@100"]


def test_lone_query_is_excluded_from_retrieval_metrics():
    # Label 9 occurs once: R = 0, so it counts for no retrieval metric.
    x = np.array([[0.0, 0], [0.3, 0], [5, 5], [5.1, 5], [-0.1, 0]], dtype=np.float32)
    y = np.array([0, 0, 1, 1, 9])
    details = {}
    ours = evaluate_embeddings(x, y, ks=(1, 2), include=["recall", "r_precision", "map@r"], details=details)
    assert details["num_lone_queries"] == 1 and details["num_scored_queries"] == 4
    # Query 0's nearest other item is the lone one (label 9), then its own class.
    assert ours["recall@1"] == pytest.approx(0.75)
    assert ours["recall@2"] == pytest.approx(1.0)
    assert ours["r_precision"] == pytest.approx(0.75)
    assert ours["map@r"] == pytest.approx(0.75)
    assert_same(ours, {k: v for k, v in pml_reference(x, y, ks=(1, 2), k=2, clustering=False).items()})


def test_chunked_search_equals_one_search(monkeypatch):
    # Several chunks, a short tail, and duplicates: same numbers as PML's single search.
    x, y = clustered(8192 + 7, 900, 8, noise=0.8, seed=8)
    x[100:130] = x[5]
    monkeypatch.setattr(metrics_lib, "MAX_CHUNK_ROWS", 4096)
    assert len(metrics_lib._chunks(len(x), 12)) == 2
    ks = (1, 4)
    ours = evaluate_embeddings(x, y, ks=ks, include=["recall", "r_precision", "map@r"])
    assert_same(ours, pml_reference(x, y, ks=ks, k=dcml_k(y, y, ks, 1), clustering=False))


def test_labels_of_any_type_and_torch_input():
    x, y = clustered(200, 8, 8, noise=1.0, seed=9)
    as_int = evaluate_embeddings(x, y, include=["recall", "map@r"])
    as_str = evaluate_embeddings(torch.from_numpy(x), np.array([f"c{v}" for v in y]), include=["recall", "map@r"])
    assert as_int == as_str


def test_ami_matches_sklearn_on_many_labelings():
    rng = np.random.default_rng(10)
    for n, classes, clusters in [(50, 3, 4), (500, 40, 35), (2000, 300, 280), (1000, 2, 100)]:
        true = rng.integers(0, classes, n)
        pred = np.where(rng.random(n) < 0.5, true % clusters, rng.integers(0, clusters, n))
        assert adjusted_mutual_info(true, pred) == pytest.approx(adjusted_mutual_info_score(true, pred), abs=1e-10)
    assert adjusted_mutual_info([1, 1, 1], [0, 0, 0]) == adjusted_mutual_info_score([1, 1, 1], [0, 0, 0])
    assert adjusted_mutual_info([1, 2, 3], [0, 0, 0]) == adjusted_mutual_info_score([1, 2, 3], [0, 0, 0])


@pytest.mark.parametrize("call, message", [
    (lambda x, y: evaluate_embeddings(x, y[:-1]), "labels"),
    (lambda x, y: evaluate_embeddings(x[:0], y[:0]), "no embeddings"),
    (lambda x, y: evaluate_embeddings(x, np.zeros_like(y)), "at least two classes"),
    (lambda x, y: evaluate_embeddings(x, np.arange(len(y))), "no query has another item"),
    (lambda x, y: evaluate_embeddings(x, y, x[:, :3], y), "dimension"),
    (lambda x, y: evaluate_embeddings(np.where(np.eye(len(x), x.shape[1]) > 0, np.nan, x), y), "NaN"),
    (lambda x, y: evaluate_embeddings(x, y, ks=(0, 1)), "positive"),
    (lambda x, y: evaluate_embeddings(x, y, include=["recall", "f1"]), "unknown metric"),
])
def test_bad_input_is_a_clear_error(call, message):
    x, y = clustered(40, 4, 6, noise=1.0, seed=11)
    with pytest.raises(DcmlError, match=message):
        call(x, y)


def test_kmeans_subsampling_path_matches_pml():
    # More than 256 points per cluster: faiss subsamples (with its default seed) before
    # training, as in PML; NMI/AMI only match if dcml makes the very same call.
    x, y = clustered(3000, 5, 8, noise=2.0, seed=12)
    ours = evaluate_embeddings(x, y, ks=(1,))
    assert_same(ours, pml_reference(x, y, ks=(1,)))
    assert 0.0 < ours["ami"] < 0.99
