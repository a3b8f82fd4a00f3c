"""ManifestImageDataset (path- and bytes-based manifests), transforms, compute_vectors."""

import io

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from dcml.contracts import manifest as manifest_lib
from dcml.algorithm.data import IMAGENET_MEAN, IMAGENET_STD, ManifestImageDataset, build_transform, eval_resize_size
from dcml.contracts.errors import DcmlError
from dcml.algorithm.inference import compute_vectors
from dcml.algorithm.models import build_model, default_config

torch.set_num_threads(1)


def make_image(i, size=(48, 40), mode="RGB"):
    rng = np.random.default_rng(i)
    base = rng.integers(0, 256, size=3)
    arr = np.clip(base + rng.normal(0, 30, size=(size[1], size[0], 3)), 0, 255).astype(np.uint8)
    img = Image.fromarray(arr)
    return img.convert(mode)


def encode(img, fmt):
    buf = io.BytesIO()
    img.save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def write_manifest(tmp_path, embedded=False, n=6, name="manifest.parquet"):
    """n images, 3 classes: JPEG colour, PNG grey, alternating; on disk or embedded."""
    root = tmp_path / "images"
    rows = []
    for i in range(n):
        label = i % 3
        fmt, mode = ("JPEG", "RGB") if i % 2 == 0 else ("PNG", "L")
        data = encode(make_image(i, mode=mode), fmt)
        rel = f"c{label}/img{i}.{fmt.lower()}"
        if not embedded:
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_bytes(data)
        rows.append({"image_id": f"img{i}", "path": None if embedded else rel, "image_bytes": data if embedded else None,
                     "label": label, "class_name": f"class{label}", "split": "train" if i < n - 2 else "test"})
    dest = tmp_path / name
    manifest_lib.write(dest, pd.DataFrame(rows), {"dataset": "tiny", "root": str(root), "fingerprint": "f" * 64})
    return manifest_lib.read(dest)


@pytest.mark.parametrize("embedded", [False, True])
def test_dataset_reads_path_and_bytes_manifests(tmp_path, embedded):
    man = write_manifest(tmp_path, embedded=embedded)
    cfg = default_config(backbone="efficientnet_lite0", image_size=32)
    ds = ManifestImageDataset(man, man.df, build_transform(cfg, train=False))
    assert len(ds) == 6
    for i in range(6):
        x, label, row = ds[i]
        assert x.shape == (3, 32, 32) and x.dtype == torch.float32
        assert label == man.df["label"][i] and row == i
        assert -1.0 <= x.min() and x.max() <= 1.0  # mean = std = 0.5 maps [0, 1] to [-1, 1]
    grey, _, _ = ds[1]  # a PNG in mode L: repeated to 3 identical channels
    assert torch.equal(grey[0], grey[1]) and torch.equal(grey[1], grey[2])
    colour, _, _ = ds[0]
    assert not torch.equal(colour[0], colour[1])


def test_path_and_bytes_manifests_give_the_same_tensors(tmp_path):
    on_disk = write_manifest(tmp_path / "a")
    embedded = write_manifest(tmp_path / "b", embedded=True)
    t = build_transform(default_config(backbone="resnet18", image_size=32, weights="none"), train=False)
    a = ManifestImageDataset(on_disk, on_disk.df, t)
    b = ManifestImageDataset(embedded, embedded.df, t)
    for i in range(6):
        assert torch.equal(a[i][0], b[i][0])


def test_small_cnn_gets_one_channel_and_identity_eval(tmp_path):
    man = write_manifest(tmp_path)
    cfg = default_config(backbone="small_cnn")
    ds = ManifestImageDataset(man, man.df, build_transform(cfg, train=False))
    x, _, _ = ds[0]  # a colour JPEG converted to L and fitted to 28 x 28
    assert x.shape == (1, 28, 28)
    img28 = make_image(0, size=(28, 28), mode="L")
    out = build_transform(cfg, train=False)(img28)
    expected = (torch.from_numpy(np.asarray(img28, dtype=np.float32)) / 255 - 0.5) / 0.5
    assert torch.allclose(out[0], expected, atol=1e-6)  # 28 px input: no resampling at eval
    train_t = build_transform(cfg, train=True)
    assert train_t(img28).shape == (1, 28, 28)
    assert build_transform({"backbone": "small_cnn"}, train=False).mode == "L"  # partial config: defaults filled
    torch.manual_seed(0)
    assert any(not torch.equal(train_t(img28), out) for _ in range(5))  # crops and flips vary


def test_resnet_normalisation_and_train_transform():
    cfg = default_config(backbone="resnet50", image_size=40, weights="none")
    white = Image.new("RGB", (60, 50), (255, 255, 255))
    x = build_transform(cfg, train=False)(white)
    expected = torch.tensor([(1 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)])
    assert torch.allclose(x.mean(dim=(1, 2)), expected, atol=1e-5)
    assert eval_resize_size(224) == 256
    torch.manual_seed(0)
    img = make_image(3, size=(90, 70))
    train_t = build_transform(cfg, train=True)
    outs = [train_t(img) for _ in range(3)]
    assert all(o.shape == (3, 40, 40) for o in outs)
    assert not torch.equal(outs[0], outs[1])
    eval_t = build_transform(cfg, train=False)
    assert torch.equal(eval_t(img), eval_t(img))


def test_jpeg_draft_decodes_large_images_smaller_but_close(tmp_path):
    big = make_image(7, size=(960, 720)).resize((960, 720))
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "big.jpg").write_bytes(encode(big, "JPEG"))
    df = pd.DataFrame([{"image_id": "big", "path": "big.jpg", "label": 0, "class_name": "c", "split": "train"}])
    manifest_lib.write(tmp_path / "m.parquet", df, {"dataset": "t", "root": str(tmp_path / "images"), "fingerprint": "x"})
    man = manifest_lib.read(tmp_path / "m.parquet")
    cfg = default_config(backbone="efficientnet_lite0", image_size=64)
    eval_t = build_transform(cfg, train=False)
    ds = ManifestImageDataset(man, man.df, eval_t)
    drafted = ds.load_image(0)
    assert min(drafted.size) >= eval_resize_size(64) and drafted.size[0] <= 960 // 4
    full = eval_t(Image.open(tmp_path / "images" / "big.jpg").convert("RGB"))
    assert (ds[0][0] - full).abs().mean() < 0.05
    train_ds = ManifestImageDataset(man, man.df, build_transform(cfg, train=True))
    assert train_ds.load_image(0).size == (960, 720)  # training crops keep full resolution


def test_missing_and_corrupt_images_raise_clear_errors(tmp_path):
    man = write_manifest(tmp_path)
    t = build_transform(default_config(backbone="small_cnn"), train=False)
    (man.root / man.df["path"][0]).unlink()
    (man.root / man.df["path"][1]).write_bytes(b"not an image")
    ds = ManifestImageDataset(man, man.df, t)
    with pytest.raises(DcmlError, match="img0.jpeg: image file not found"):
        ds[0]
    with pytest.raises(DcmlError, match="img1.png: cannot decode image"):
        ds[1]
    # Through a DataLoader worker the message stays the one-line error, not a traceback.
    model = build_model({"backbone": "small_cnn"})
    with pytest.raises(DcmlError, match=r"^\S*img0.jpeg: image file not found") as info:
        compute_vectors(model, man, man.df, num_workers=1)
    assert "Traceback" not in str(info.value)


def test_compute_vectors_matches_a_direct_forward_and_restores_mode(tmp_path):
    man = write_manifest(tmp_path, n=9)
    rows = man.split("train")
    torch.manual_seed(0)
    model = build_model({"backbone": "small_cnn", "num_slices": 2, "embedding_dim": 16})
    model.train()
    emb = compute_vectors(model, man, rows, kind="embedding", batch_size=4)
    feats = compute_vectors(model, man, rows, kind="features", batch_size=3)
    assert model.training  # restored
    assert emb.dtype == np.float32 and emb.shape == (len(rows), 16)
    assert feats.shape == (len(rows), model.backbone.out_features)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), np.sqrt(2), atol=1e-5)
    ds = ManifestImageDataset(man, rows, build_transform(model.config, train=False))
    batch = torch.stack([ds[i][0] for i in range(len(ds))])
    model.eval()
    with torch.no_grad():
        np.testing.assert_allclose(emb, model(batch).numpy(), atol=1e-5)
        np.testing.assert_allclose(feats, model.features(batch).numpy(), atol=1e-5)
    empty = compute_vectors(model, man, rows.iloc[:0], kind="features")
    assert empty.shape == (0, model.backbone.out_features)
    with pytest.raises(ValueError):
        compute_vectors(model, man, rows, kind="logits")
