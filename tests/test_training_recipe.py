"""The training recipe: fast mode, PCA head initialisation, validation-selected epoch.

Fast mode (``train_blocks`` + the activation cache): the frozen lower part run
once, the top trained on its cached output. PCA head init
(``EmbeddingModel.init_head_from_features``, ``head_init``). Validation
selection (``select_on``, ``patience``; the epoch kept).

Tolerances. Exact equality is asserted only where the same operations run in
the same order (parameters that must not change, a computation repeated with
the same inputs). Elsewhere:

* lower part then top vs the whole backbone: the same layers on the same
  tensors, so float32 rounding only (a kernel may block the work differently);
  atol 1e-5 x the features' largest magnitude is ~100 float32 ulps of it.
* the cache stores float16: a relative rounding of 2^-11 ~ 5e-4 per value, so
  the cached activations match the model's to 1e-3 relative plus 1e-3 of the
  largest value (measured: 2e-3 absolute on values up to 7), and the unit-norm
  embeddings the top computes from them match the whole network's on the
  images to 5e-3 (measured: 3e-4; the rounding propagated through two MBConv
  blocks, the 1x1 head conv and the head).
* PCA head: the components are computed in float64 and stored in float32
  (relative 6e-8); compared with numpy's float64 SVD to 1e-5.
"""

from __future__ import annotations

import copy

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from dcml.algorithm import activations
from dcml.algorithm.models import build_model
from dcml.algorithm.samplers import ClusterBatchSampler
from dcml.algorithm.training import Trainer, TrainSettings, seed_everything
from dcml.contracts import manifest as manifest_mod
from dcml.contracts.errors import DcmlError

torch.set_num_threads(1)

SIZE = 64  # EfficientNet-Lite0 input side: 64 px reach 2 x 2 at the top blocks
TOP = 2  # blocks that train in the fast-mode tests
VIEWS = 2


# -- data ------------------------------------------------------------------------

def _t10k() -> tuple[np.ndarray, np.ndarray]:
    from data_prep import fashion_mnist

    try:
        root = fashion_mnist.locate(allow_download=False)
    except DcmlError as exc:
        pytest.skip(str(exc))
    images_stem, labels_stem = fashion_mnist.PARTS["t10k"]

    def idx(stem):
        path = next(p for p in (root / f"{stem}.gz", root / stem) if p.is_file())
        return fashion_mnist.read_idx(path)

    return idx(images_stem), idx(labels_stem).astype(np.int64)


def _png(image: np.ndarray) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def manifest_path(tmp_path_factory):
    """10 classes x 10 real Fashion-MNIST test images; 40% of the classes carved out as validation."""
    images, labels = _t10k()
    rows = []
    for c in range(10):
        for i in np.flatnonzero(labels == c)[:10]:
            rows.append({"image_id": f"fm{i:05d}", "path": None, "image_bytes": _png(images[i]), "label": int(c),
                         "class_name": f"class{c}", "split": "train"})
    df, info = manifest_mod.carve_validation(pd.DataFrame(rows), 0.4)
    assert info["val_classes"] == 4 and info["train_classes"] == 6
    dest = tmp_path_factory.mktemp("recipe") / "manifest.parquet"
    manifest_mod.write(dest, df, {"dataset": "fashion-mnist-recipe", "root": str(dest.parent),
                                  "fingerprint": f"recipe-{len(df)}", "split_mode": "class-disjoint"})
    return dest


@pytest.fixture(scope="module")
def man(manifest_path):
    return manifest_mod.read(manifest_path)


@pytest.fixture(scope="module")
def test_manifest_path(man, tmp_path_factory):
    """The same images with the validation classes as test classes: no validation, so training
    keeps its last epoch (with validation the kept epoch may be the untrained model)."""
    dest = tmp_path_factory.mktemp("recipe_test") / "manifest.parquet"
    df = man.df.assign(split=man.df["split"].replace({"val": "test"}))
    manifest_mod.write(dest, df, {**man.meta, "root": str(dest.parent), "fingerprint": "recipe-test"})
    return dest


@pytest.fixture(scope="module")
def tman(test_manifest_path):
    return manifest_mod.read(test_manifest_path)


def test_the_validation_split_holds_whole_classes(man):
    train, val = man.split("train"), man.split("val")
    assert len(train) == 60 and len(val) == 40
    assert not set(train["label"]) & set(val["label"])
    assert val.groupby("label").size().tolist() == [10] * 4


def _state(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


# -- fast mode -------------------------------------------------------------------

@pytest.fixture(scope="module")
def effnet_weights(tmp_path_factory):
    """A local EfficientNet-Lite0 weights file (the package's layout): random weights whose
    BatchNorm statistics were measured on inputs, so eval-mode features are not ~0
    (fresh running statistics shrink a random network's output to ~1e-9)."""
    seed_everything(0)
    net = build_model({"backbone": "efficientnet_lite0", "weights": "none", "image_size": SIZE}).backbone
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None  # cumulative average
            m.reset_running_stats()
    net.train()
    with torch.no_grad():
        for _ in range(2):
            net(torch.randn(16, 3, SIZE, SIZE))
    path = tmp_path_factory.mktemp("weights") / "effnet_lite0.pt"
    torch.save(net.net.state_dict(), path)
    return str(path)


def _effnet(weights, train_blocks, **extra):
    return build_model({"backbone": "efficientnet_lite0", "weights": weights, "image_size": SIZE,
                        "embedding_dim": 16, "train_blocks": train_blocks, **extra})


@pytest.mark.parametrize("train_blocks", [0, 1, TOP, 5, 16])
def test_lower_part_then_top_computes_the_whole_backbone(effnet_weights, train_blocks):
    model = _effnet(effnet_weights, train_blocks).eval()
    backbone = model.backbone
    # train_blocks = t: the last t blocks and the tail train (t = 0: only the embedding head).
    assert model.has_frozen_part
    assert model.split == (backbone.num_units if train_blocks == 0 else backbone.num_blocks + 1 - train_blocks)
    # The frozen part does not train; the convolutions above it do (BatchNorm stays frozen: pretrained weights).
    assert all(not p.requires_grad for m in model.frozen_modules() for p in m.parameters())
    top = [m for unit in range(model.split, backbone.num_units) for m in backbone.unit_modules(unit)]
    convs = [c for m in top for c in m.modules() if isinstance(c, nn.Conv2d)]
    assert (len(convs) > 0) == (train_blocks > 0)
    assert all(p.requires_grad for c in convs for p in c.parameters())
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == \
        sum(p.numel() for c in convs for p in c.parameters()) + sum(p.numel() for p in model.head.parameters())

    torch.manual_seed(1)
    x = torch.randn(3, 3, SIZE, SIZE)
    with torch.no_grad():
        whole = model.features(x)  # no autograd: the whole backbone in one run
        embedding = model(x)
    lower = model.lower(x)
    assert not lower.requires_grad
    if train_blocks == 0:
        assert lower.shape == whole.shape  # everything is frozen: the cache holds the pooled features
    else:
        assert lower.ndim == 4 and lower.shape[0] == 3
    assert whole.abs().max() > 0.1
    atol = 1e-5 * float(whole.abs().max())
    torch.testing.assert_close(model.features_from_lower(lower), whole, rtol=0, atol=atol)
    torch.testing.assert_close(model.forward_from_lower(lower), embedding, rtol=0, atol=1e-5)


def test_lower_part_then_top_with_untrained_weights():
    """weights="none" as built (fresh BatchNorm statistics: eval-mode features ~1e-9): the same
    identity, relative to the features' scale."""
    seed_everything(0)
    model = build_model({"backbone": "efficientnet_lite0", "weights": "none", "image_size": 32,
                         "train_blocks": 5}).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        whole = model.features(x)
    scale = float(whole.abs().max())
    assert scale > 0
    torch.testing.assert_close(model.features_from_lower(model.lower(x)), whole, rtol=0, atol=1e-5 * scale)


def test_the_whole_backbone_training_has_nothing_to_cache(effnet_weights, man, tmp_path):
    model = _effnet(effnet_weights, -1)
    assert not model.has_frozen_part and model.split == 0 and model.frozen_modules() == []
    with pytest.raises(DcmlError, match="no frozen part"):
        activations.build(tmp_path / "cache", model, man, views=1)
    assert not (tmp_path / "cache").exists()


@pytest.fixture(scope="module")
def cache_dir(effnet_weights, test_manifest_path, tmp_path_factory):
    """The extract stage's fast-mode cache: top TOP blocks train, VIEWS augmented views."""
    from components.extract import stage as extract

    out = tmp_path_factory.mktemp("extract")
    extract.run(manifest=str(test_manifest_path), out=str(out / "features.parquet"), device="cpu",
                activations_out=str(out / "cache"), backbone="efficientnet_lite0", weights=effnet_weights,
                image_size=SIZE, train_blocks=TOP, views=VIEWS, seed=5, batch_size=48)
    return out / "cache"


STAGE_TRAIN = dict(backbone="efficientnet_lite0", image_size=SIZE, embedding_dim=16, train_blocks=TOP,
                   classes_per_batch=4, images_per_class=4, lr_backbone=1e-3, lr_embedding=1e-3, epochs=2,
                   eval_every=0, seed=5, threads=1, device="cpu", resume=False)


def test_fast_mode_trains_only_the_top_and_writes_an_ordinary_model(effnet_weights, test_manifest_path, tman,
                                                                    cache_dir, tmp_path):
    from components.train import stage as train
    from dcml.algorithm.inference import compute_vectors
    from dcml.model_files import load_model

    cache = activations.ActivationCache(cache_dir)
    n_train, n_test = len(tman.split("train")), len(tman.split("test"))
    assert cache.views == VIEWS and cache.meta["model_config"]["train_blocks"] == TOP
    assert cache.train.dtype == np.float16 and cache.train.shape[:2] == (n_train, 1 + VIEWS)
    assert cache.eval.shape[0] == n_test  # the test rows' eval view

    fast = train.run(manifest=str(test_manifest_path), out=str(tmp_path / "fast.pt"), activations=str(cache_dir),
                     work_dir=str(tmp_path), weights=effnet_weights, **STAGE_TRAIN)
    assert fast["extra"]["fast_mode"] is True and fast["extra"]["head_init"] == "pca"  # auto: a weights file
    trained = [h for h in fast["history"] if h["epoch"] > 0]
    assert len(trained) == 2 and all(h["images"] > 0 for h in trained)

    model, ckpt = load_model(tmp_path / "fast.pt")
    assert model.config["train_blocks"] == TOP and not model.training
    start = _effnet(effnet_weights, TOP)  # the backbone training started from (the head was initialised anew)
    # The frozen lower part, BatchNorm statistics included, is bit for bit the one training started from.
    for before, after in zip(start.frozen_modules(), model.frozen_modules()):
        _assert_same_state(before.state_dict(), after.state_dict())
    # Each of the top blocks and the 1x1 head conv moved; BatchNorm is frozen everywhere (freeze_bn auto:
    # a pretrained backbone), so its statistics and affine parameters are those of the start too.
    for unit in range(model.split, model.backbone.num_units):
        pairs = list(zip(start.backbone.unit_modules(unit), model.backbone.unit_modules(unit)))
        moved = [not torch.equal(a, b) for before, after in pairs
                 for a, b in zip(before.state_dict().values(), after.state_dict().values())]
        assert any(moved), f"unit {unit} did not train"
    norms = [(a, b) for a, b in zip(start.modules(), model.modules()) if isinstance(a, nn.BatchNorm2d)]
    assert len(norms) > 40
    for before, after in norms:
        _assert_same_state(before.state_dict(), after.state_dict())
    # The head started as the PCA of the cached eval views' features (head_init auto -> pca) and moved from it.
    with torch.no_grad():
        start.eval().init_head_from_features(
            start.features_from_lower(torch.from_numpy(np.asarray(cache.train[:, 0], dtype=np.float32))))
    assert float((start.head.weight - model.head.weight).detach().abs().max()) > 1e-4

    # The cache is the checkpoint's own lower part (float16 storage: 1e-3 relative).
    train_rows, test_rows = tman.split("train"), tman.split("test")
    images = torch.stack([compute_input(model, tman, train_rows, i) for i in range(4)])
    cached = torch.from_numpy(np.asarray(cache.train[:4, 0], dtype=np.float32))
    lower = model.lower(images)
    torch.testing.assert_close(cached, lower, rtol=1e-3, atol=1e-3 * float(lower.abs().max()))

    # The checkpoint embeds raw images with the whole network; on the test rows
    # that agrees with the top run on their cached activations.
    embedded = compute_vectors(model, tman, test_rows, kind="embedding", batch_size=64)
    assert embedded.shape == (n_test, 16) and np.allclose(np.linalg.norm(embedded, axis=1), 1, atol=1e-5)
    positions = cache.locate(test_rows["image_id"], "eval")
    with torch.no_grad():
        from_cache = model.forward_from_lower(torch.from_numpy(np.asarray(cache.eval[positions], dtype=np.float32)))
    torch.testing.assert_close(torch.from_numpy(embedded), from_cache, rtol=0, atol=5e-3)

    # Trained on images instead, the same stage writes a checkpoint of the same format. There the
    # lower part runs in every step; with BatchNorm left to train (freeze_bn false) the frozen
    # part's statistics still stay as they were, while those of the top blocks move.
    plain = train.run(manifest=str(test_manifest_path), out=str(tmp_path / "plain.pt"), work_dir=str(tmp_path),
                      weights=effnet_weights, **{**STAGE_TRAIN, "epochs": 1, "freeze_bn": "false"})
    assert plain["extra"]["fast_mode"] is False
    other, ckpt_plain = load_model(tmp_path / "plain.pt")
    assert ckpt.keys() == ckpt_plain.keys()
    assert ckpt["model_config"] == {**ckpt_plain["model_config"], "freeze_bn": True}
    assert {k: (v.shape, v.dtype) for k, v in ckpt["model"].items()} == \
        {k: (v.shape, v.dtype) for k, v in ckpt_plain["model"].items()}
    for before, after in zip(start.frozen_modules(), other.frozen_modules()):
        _assert_same_state(before.state_dict(), after.state_dict())
    top_bn = other.backbone.unit_modules(model.split)[0]._bn0
    assert not torch.equal(top_bn.running_mean, start.backbone.unit_modules(model.split)[0]._bn0.running_mean)


def compute_input(model, man, rows, i):
    """The eval-transformed image i of ``rows``: what the cache's view 0 was computed from."""
    from dcml.algorithm.data import ManifestImageDataset, build_transform

    return ManifestImageDataset(man, rows, build_transform(model.config, train=False))[i][0]


def test_the_views_of_an_epoch_are_a_function_of_seed_epoch_and_row(cache_dir, tman):
    cache = activations.ActivationCache(cache_dir)
    rows = tman.split("train")
    positions = cache.locate(rows["image_id"], "train")
    labels = rows["label"].to_numpy()

    def views(seed, epoch):
        return activations.TrainViews(cache, positions, labels, seed, epoch)

    a, again = views(5, 1), views(5, 1)
    assert np.array_equal(a.view, again.view)
    assert a.view.min() >= 1 and a.view.max() <= VIEWS  # augmented views only (0 is the eval view)
    assert set(a.view) == set(range(1, VIEWS + 1))
    assert not np.array_equal(a.view, views(5, 2).view)  # another epoch draws other views
    assert not np.array_equal(a.view, views(6, 1).view)  # so does another seed
    for i in (0, 7, len(a) - 1):
        x, label, row = a[i]
        assert row == i and label == labels[i] and x.dtype == torch.float32
        assert torch.equal(x, torch.from_numpy(cache.train[positions[i], a.view[i]].astype(np.float32)))
    # The augmented views differ from each other and from the eval view.
    assert not np.array_equal(cache.train[:, 1], cache.train[:, 2])
    assert not np.array_equal(cache.train[:, 0], cache.train[:, 1])

    def batches(epoch):
        sampler = ClusterBatchSampler(labels, None, classes_per_batch=4, images_per_class=4, seed=5, epoch=epoch)
        return list(activations.batch_loader(views(5, epoch), sampler))

    first, second = batches(1), batches(1)
    assert len(first) == len(second) > 1
    for (x1, y1, r1), (x2, y2, r2) in zip(first, second):
        assert torch.equal(x1, x2) and torch.equal(y1, y2) and torch.equal(r1, r2)
    assert any(not torch.equal(r1, r2) for (_, _, r1), (_, _, r2) in zip(first, batches(2)))


def test_the_cache_is_a_function_of_its_seed(effnet_weights, tman, cache_dir, tmp_path):
    model = _effnet(effnet_weights, TOP)
    cache = activations.ActivationCache(cache_dir)
    activations.build(tmp_path / "same", model, tman, views=VIEWS, seed=5, batch_size=48)
    activations.build(tmp_path / "other", model, tman, views=VIEWS, seed=6, batch_size=48)
    same, other = activations.ActivationCache(tmp_path / "same"), activations.ActivationCache(tmp_path / "other")
    assert np.array_equal(same.train, cache.train) and np.array_equal(same.eval, cache.eval)
    assert np.array_equal(other.train[:, 0], cache.train[:, 0]) and np.array_equal(other.eval, cache.eval)
    assert not np.array_equal(other.train[:, 1:], cache.train[:, 1:])


def _fast_fit(effnet_weights, tman, cache_dir, seed=5):
    seed_everything(seed)  # the head's random init
    model = _effnet(effnet_weights, TOP)
    settings = TrainSettings(epochs=2, classes_per_batch=4, images_per_class=4, lr_backbone=1e-3,
                             lr_embedding=1e-3, eval_every=0, head_init="random", seed=seed)
    trainer = Trainer(model, tman, tman.split("train"), settings, activations=activations.ActivationCache(cache_dir),
                      fresh_head=True, device="cpu")
    trainer.fit()
    return _state(model)


def test_a_fast_mode_run_is_repeatable(effnet_weights, tman, cache_dir):
    a = _fast_fit(effnet_weights, tman, cache_dir)
    _assert_same_state(a, _fast_fit(effnet_weights, tman, cache_dir))
    b = _fast_fit(effnet_weights, tman, cache_dir, seed=6)
    assert any(not torch.equal(a[k], b[k]) for k in a)


# -- PCA head initialisation ------------------------------------------------------

F_DIM = 128  # small_cnn's pooled features


def _features(n, seed, decay=0.85, offset=3.0):
    """[n, 128] features: a random rotation of independent axes with variances decaying
    geometrically (distinct principal directions), around a non-zero mean."""
    rng = np.random.default_rng(seed)
    rotation, _ = np.linalg.qr(rng.standard_normal((F_DIM, F_DIM)))
    scales = 5.0 * decay ** np.arange(F_DIM)
    return (rng.standard_normal((n, F_DIM)) * scales) @ rotation.T + offset * rng.standard_normal(F_DIM)


def _principal(x):
    """Principal directions (rows, largest variance first) and mean, by numpy's float64 SVD."""
    mean = x.mean(axis=0)
    return np.linalg.svd(x - mean, full_matrices=False)[2], mean


def _head_model(dim=8, k=1):
    seed_everything(0)
    return build_model({"backbone": "small_cnn", "embedding_dim": dim, "num_slices": k})


def _assert_rows_match(rows, directions):
    """Unit, orthonormal rows equal to ``directions`` up to the sign of each."""
    rows = rows.detach().double().numpy()
    np.testing.assert_allclose(rows @ rows.T, np.eye(len(rows)), atol=1e-6)
    np.testing.assert_allclose(np.abs(np.sum(rows * directions, axis=1)), 1.0, atol=1e-5)


@pytest.mark.parametrize("k", [1, 2, 4])
def test_pca_head_rows_are_the_top_principal_directions(k):
    x = _features(300, seed=1)
    model = _head_model(8, k)
    model.init_head_from_features(x.astype(np.float32))
    w, b = model.head.weight, model.head.bias
    assert w.dtype == torch.float32
    vt, mean = _principal(x.astype(np.float32).astype(np.float64))
    # Without groups slice k takes the k-th run of the global directions, so the whole head is
    # the top 8 principal directions in order (one orthonormal set across the slices).
    _assert_rows_match(w, vt[:8])
    # The bias centres the projection: b = -W mean, so the mean pre-normalisation embedding is 0.
    np.testing.assert_allclose(b.detach().double().numpy(), -(w.detach().double().numpy() @ mean), atol=1e-5)
    projected = x @ w.detach().double().numpy().T + b.detach().double().numpy()
    assert np.abs(projected.mean(axis=0)).max() < 1e-4 * projected.std()
    # The projection keeps the variance along each direction: descending, as the singular values.
    assert np.all(np.diff(projected.var(axis=0)) < 0)


@pytest.mark.parametrize("k", [2, 4])
def test_pca_shared_head_deals_the_global_directions_round_robin(k):
    """head_init=pca-shared: slice s gets global directions s, s+K, ...; all slices together are K=1's head."""
    x = _features(300, seed=4)
    model = _head_model(8, k)
    model.init_head_from_features(x.astype(np.float32), deal="round-robin")
    vt, _ = _principal(x.astype(np.float32).astype(np.float64))
    for s in range(k):
        start, stop = model.slice_bounds(s)
        _assert_rows_match(model.head.weight[start:stop], vt[:8][s::k])
    with pytest.raises(DcmlError, match="deal="):
        model.init_head_from_features(x.astype(np.float32), deal="spread")


def test_pca_head_with_groups_gives_each_slice_its_groups_directions():
    first, second = _features(200, seed=2), _features(150, seed=3, decay=0.8, offset=-2.0)
    x = np.concatenate([second[:70], first, second[70:]])  # rows in any order: groups are index lists
    groups = [np.arange(70, 270), np.concatenate([np.arange(70), np.arange(270, 350)])]
    model = _head_model(8, 2)
    model.init_head_from_features(x, groups=groups)
    for k, rows in enumerate(groups):
        start, stop = model.slice_bounds(k)
        w = model.head.weight[start:stop].detach().double().numpy()
        b = model.head.bias[start:stop].detach().double().numpy()
        vt, mean = _principal(x[rows])
        _assert_rows_match(model.head.weight[start:stop], vt[:stop - start])
        centred = x[rows] @ w.T + b
        assert np.abs(centred.mean(axis=0)).max() < 1e-4 * centred.std()
    # The two groups' directions differ: slice 1 is not the other group's PCA.
    vt0, _ = _principal(x[groups[0]])
    assert np.abs(model.head.weight[4:8].detach().double().numpy() @ vt0[:4].T).max() < 0.9


def test_pca_head_keeps_random_rows_a_small_group_cannot_fill():
    model = _head_model(8, 2)
    before = model.head.weight.detach().clone(), model.head.bias.detach().clone()
    x = _features(50, seed=4)
    # Group 0 has 3 images for 4 dimensions: 3 rows from its components, the 4th stays;
    # group 1 has a single image, no component at all: its slice stays as it was.
    model.init_head_from_features(x, groups=[[0, 1, 2], [10]])
    w, b = model.head.weight.detach(), model.head.bias.detach()
    assert not torch.equal(w[:3], before[0][:3]) and not torch.equal(b[:3], before[1][:3])
    assert torch.equal(w[3:], before[0][3:]) and torch.equal(b[3:], before[1][3:])
    np.testing.assert_allclose(w[:3].double().numpy() @ w[:3].double().numpy().T, np.eye(3), atol=1e-6)
    vt, _ = _principal(x[:3])
    _assert_rows_match(w[:2], vt[:2])  # the two directions 3 centred points span


def test_pca_head_rejects_features_of_the_wrong_shape():
    model = _head_model(8, 2)
    with pytest.raises(DcmlError, match=r"features must be \[N, 128\]"):
        model.init_head_from_features(np.zeros((10, 64)))
    with pytest.raises(DcmlError, match="3 groups for 2 slices"):
        model.init_head_from_features(np.zeros((10, F_DIM)), groups=[[0], [1], [2]])


@pytest.fixture(scope="module")
def small_cnn_weights(tmp_path_factory):
    """A local small_cnn weights file: a backbone that counts as pretrained (weights != "none")."""
    seed_everything(1)
    path = tmp_path_factory.mktemp("small_cnn") / "small_cnn.pt"
    torch.save(build_model({"backbone": "small_cnn"}).backbone.state_dict(), path)
    return str(path)


@pytest.mark.parametrize("weights, head_init, fresh, resolved", [
    ("none", "auto", True, "random"),
    ("file", "auto", True, "pca"),
    ("none", "pca", True, "pca"),
    ("file", "random", True, "random"),
    ("file", "auto", False, None),  # a loaded head is left as it is
])
def test_head_init_resolution_and_what_training_starts_from(man, small_cnn_weights, weights, head_init, fresh,
                                                           resolved):
    seed_everything(0)
    model = build_model({"backbone": "small_cnn", "embedding_dim": 8,
                         "weights": small_cnn_weights if weights == "file" else "none"})
    built = _state(model)
    rows = man.split("train")
    trainer = Trainer(model, man, rows, TrainSettings(epochs=0, head_init=head_init, eval_every=0),
                      fresh_head=fresh, device="cpu")
    assert trainer.head_init == resolved
    trainer.fit()  # no epochs: only what happens before epoch 1
    if resolved != "pca":
        _assert_same_state(built, _state(model))
        return
    from dcml.algorithm.inference import compute_vectors

    expected = copy.deepcopy(model)
    expected.load_state_dict(built)
    expected.init_head_from_features(compute_vectors(expected, man, rows, kind="features"))
    torch.testing.assert_close(model.head.weight, expected.head.weight, rtol=0, atol=1e-5)
    torch.testing.assert_close(model.head.bias, expected.head.bias, rtol=0, atol=1e-5)
    w = model.head.weight.detach().double()
    torch.testing.assert_close(w @ w.T, torch.eye(8, dtype=torch.float64), rtol=0, atol=1e-6)
    assert all(torch.equal(v, built[k]) for k, v in model.state_dict().items() if not k.startswith("head."))


# -- validation: the epoch kept ---------------------------------------------------

def _validated_fit(man, *, seed=3, lr_backbone=1e-3, lr_embedding=1e-3, epochs=4, **settings):
    """A small_cnn trained on the train classes, validated on the val classes; returns
    (trainer, history, weights before training, weights after each epoch, final weights)."""
    seed_everything(seed)
    model = build_model({"backbone": "small_cnn", "embedding_dim": 16, "dropout": 0.0})  # BatchNorm trains
    s = TrainSettings(epochs=epochs, classes_per_batch=4, images_per_class=4, lr_backbone=lr_backbone,
                      lr_embedding=lr_embedding, eval_every=0, head_init="random", seed=seed, **settings)
    trainer = Trainer(model, man, man.split("train"), s, val_rows=man.split("val"), fresh_head=True, device="cpu")
    initial = _state(model)
    after = {}
    history = trainer.fit(callbacks=[lambda t, entry: after.__setitem__(entry["epoch"], _state(t.model))])
    return trainer, history, initial, after, _state(model)


@pytest.mark.parametrize("select_on", ["recall@1", "map@r"])
def test_the_kept_weights_are_those_of_the_best_validated_epoch(man, select_on):
    trainer, history, initial, after, final = _validated_fit(man, select_on=select_on)
    key = f"val_{select_on}"
    assert [h["epoch"] for h in history] == [0, 1, 2, 3, 4]
    assert history[0]["phase"] == "initial" and "best_epoch" not in history[0]
    scores = [h[key] for h in history]
    assert all(0.0 <= v <= 1.0 for v in scores)
    # best_epoch after each epoch: the first epoch with the highest score so far (ties keep the earlier).
    for e in range(1, 5):
        assert history[e]["best_epoch"] == int(np.argmax(scores[:e + 1]))
    best = int(np.argmax(scores))
    assert trainer.best_epoch == best and not trainer.stopped_early
    assert not any(h.get("stopped_early") for h in history)
    after[0] = initial  # epoch 0: the untrained model is a candidate too
    _assert_same_state(final, after[best])
    # The weights did change from epoch to epoch, so which one is kept matters.
    for e in range(1, 5):
        assert any(not torch.equal(after[e][k], after[e - 1][k]) for k in final)


def test_a_ruined_model_is_never_kept(man):
    """An absurd head learning rate: Adam moves every head weight by ~lr per step, whatever its
    gradient, so the head becomes a near rank-one sign pattern and every image lands near the
    same direction (validation R@1 near chance for 4 classes, from ~0.7 before training)."""
    trainer, history, initial, after, final = _validated_fit(man, seed=1, lr_backbone=0.0, lr_embedding=1e4,
                                                             epochs=3)
    scores = [h["val_recall@1"] for h in history]
    assert max(scores[1:]) < scores[0] - 0.1, scores  # the premise: every epoch is worse than none
    assert trainer.best_epoch == 0 and all(h["best_epoch"] == 0 for h in history[1:])
    # Training changed the model (the head, and the BatchNorm statistics the lr does not govern) ...
    changed = {k for k in final if not torch.equal(after[3][k], initial[k])}
    assert "head.weight" in changed and any("running_mean" in k for k in changed)
    # ... and what comes out is exactly the model before training.
    _assert_same_state(final, initial)


@pytest.mark.parametrize("patience", [1, 2])
def test_patience_stops_early_and_says_so(man, patience):
    trainer, history, initial, after, final = _validated_fit(man, seed=1, lr_backbone=0.0, lr_embedding=1e4,
                                                             epochs=6, patience=patience)
    # No epoch beats the untrained model (the previous test's premise), so the run stops
    # `patience` epochs after epoch 0.
    assert [h["epoch"] for h in history] == list(range(patience + 1))
    assert trainer.epoch == patience and trainer.stopped_early
    assert history[-1]["stopped_early"] is True and history[-1]["best_epoch"] == 0
    assert not any(h.get("stopped_early") for h in history[:-1])
    _assert_same_state(final, initial)


def test_patience_counts_from_the_best_epoch(man):
    trainer, history, *_ = _validated_fit(man, epochs=6, patience=2)
    last = history[-1]
    for h in history[1:-1]:  # no stop while the best epoch is less than `patience` epochs back
        assert h["epoch"] - h["best_epoch"] < 2 and "stopped_early" not in h
    if trainer.stopped_early:
        assert last["stopped_early"] and last["epoch"] - last["best_epoch"] == 2 and last["epoch"] < 6
    else:
        assert last["epoch"] == 6


def test_without_validation_rows_the_last_epoch_is_kept(man):
    seed_everything(3)
    model = build_model({"backbone": "small_cnn", "embedding_dim": 16, "dropout": 0.0})
    s = TrainSettings(epochs=2, classes_per_batch=4, images_per_class=4, lr_backbone=0.0, lr_embedding=1e4,
                      eval_every=0, head_init="random", seed=3, patience=1)
    trainer = Trainer(model, man, man.split("train"), s, fresh_head=True, device="cpu")
    after = {}
    history = trainer.fit(callbacks=[lambda t, entry: after.__setitem__(entry["epoch"], _state(t.model))])
    assert [h["epoch"] for h in history] == [1, 2] and trainer.best_epoch is None
    assert not any("best_epoch" in h or "val_recall@1" in h for h in history)
    _assert_same_state(_state(model), after[2])
