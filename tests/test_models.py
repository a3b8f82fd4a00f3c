"""Backbones, the sliced embedding head, frozen BatchNorm, config round-trip."""

import math

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from dcml.algorithm.data import build_transform
from dcml.contracts.errors import DcmlError
from dcml.algorithm.models import (EmbeddingModel, build_model, default_config, efficientnet_lite0_weights_path,
                         slice_bounds)

torch.set_num_threads(1)


def small(**overrides):
    torch.manual_seed(0)
    return build_model({"backbone": "small_cnn", **overrides})


def grey_batch(n=6, size=28, seed=0):
    return torch.randn(n, 1, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("dim,k", [(128, 4), (10, 3), (16, 1)])
def test_each_slice_is_unit_norm_and_learner_selects_its_slice(dim, k):
    model = small(embedding_dim=dim, num_slices=k).eval()
    x = grey_batch()
    full = model(x)
    assert full.shape == (6, dim)
    assert torch.allclose(full.norm(dim=1), torch.full((6,), math.sqrt(k)), atol=1e-5)
    for learner in range(k):
        start, stop = model.slice_bounds(learner)
        assert torch.allclose(full[:, start:stop].norm(dim=1), torch.ones(6), atol=1e-5)
        assert torch.allclose(model(x, learner=learner), full[:, start:stop], atol=1e-6)
    feats = model.features(x)
    assert feats.shape == (6, model.backbone.out_features)
    assert torch.allclose(model.embed(feats), full, atol=1e-6)
    with pytest.raises(IndexError):
        model(x, learner=k)


def test_a_learner_loss_reaches_only_its_slice_of_the_head():
    model = small(embedding_dim=12, num_slices=3)
    model(grey_batch(), learner=1).sum().backward()
    start, stop = model.slice_bounds(1)
    grad = model.head.weight.grad.abs().sum(dim=1)
    assert (grad[start:stop] > 0).all()
    assert grad[:start].sum() == 0 and grad[stop:].sum() == 0
    assert model.backbone.net[0].weight.grad.abs().sum() > 0  # the shared backbone learns from every learner


def test_slice_bounds_are_contiguous_and_even():
    assert slice_bounds(10, 3) == [(0, 4), (4, 7), (7, 10)]
    for d, k in [(128, 8), (128, 3), (64, 64), (100, 7)]:
        bounds = slice_bounds(d, k)
        sizes = [b - a for a, b in bounds]
        assert bounds[0][0] == 0 and bounds[-1][1] == d
        assert all(bounds[i][1] == bounds[i + 1][0] for i in range(k - 1))
        assert max(sizes) - min(sizes) <= 1
    # Identical to the reference's ceil(d/K) chunks when K divides d.
    assert slice_bounds(128, 8) == [(16 * i, 16 * (i + 1)) for i in range(8)]


def test_set_num_slices_regroups_without_touching_weights():
    model = small(num_slices=4).eval()
    x = grey_batch()
    raw = model.head(model.features(x))
    weights = model.head.weight.clone()
    model.set_num_slices(1)
    assert model.num_slices == 1 and model.config["num_slices"] == 1
    assert torch.equal(model.head.weight, weights)
    out = model(x)
    assert torch.allclose(out.norm(dim=1), torch.ones(6), atol=1e-5)
    assert torch.allclose(out, torch.nn.functional.normalize(raw, dim=1), atol=1e-6)


def test_each_slice_gets_its_own_xavier_init():
    # Xavier-normal per slice: std = sqrt(2 / (fan_in + slice size)), not the whole layer's.
    model = small(embedding_dim=256, num_slices=8)
    fan_in = model.head.in_features
    for k in range(8):
        start, stop = model.slice_bounds(k)
        std = model.head.weight[start:stop].std().item()
        assert std == pytest.approx(math.sqrt(2 / (fan_in + (stop - start))), rel=0.1)
    assert math.sqrt(2 / (fan_in + 256)) < 0.8 * math.sqrt(2 / (fan_in + 32))  # the two inits differ


def batchnorms(model):
    return [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]


def train_step(model, x):
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model.train()
    loss = model(x).sum(dim=1).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()


def test_frozen_batchnorm_stays_frozen_after_train_and_a_step():
    model = small(freeze_bn=True)
    bns = batchnorms(model)
    before = [(bn.running_mean.clone(), bn.running_var.clone(), bn.weight.clone()) for bn in bns]
    conv_before = model.backbone.net[0].weight.clone()
    train_step(model, grey_batch())
    assert model.training and all(not bn.training for bn in bns)
    for bn, (mean, var, weight) in zip(bns, before):
        assert torch.equal(bn.running_mean, mean) and torch.equal(bn.running_var, var)
        assert torch.equal(bn.weight, weight)
        assert bn.weight.grad is None and bn.bias.grad is None
    assert not torch.equal(model.backbone.net[0].weight, conv_before)  # the rest did train


def test_unfrozen_batchnorm_trains():
    model = small(freeze_bn=False)
    bn = batchnorms(model)[0]
    mean = bn.running_mean.clone()
    train_step(model, grey_batch())
    assert bn.training and not torch.equal(bn.running_mean, mean) and bn.weight.grad is not None


def test_config_round_trip_gives_identical_outputs():
    model = small(embedding_dim=24, num_slices=3, dropout=0.2)
    train_step(model, grey_batch())  # move the weights away from their init
    model.eval()
    clone = build_model(model.config)
    clone.load_state_dict(model.state_dict())
    clone.eval()
    x = grey_batch(seed=5)
    assert clone.config == model.config
    assert torch.equal(clone(x), model(x))


def test_default_config_and_validation():
    cfg = default_config()
    assert cfg["backbone"] == "efficientnet_lite0" and cfg["weights"] == "imagenet"
    assert (cfg["embedding_dim"], cfg["num_slices"], cfg["dropout"], cfg["freeze_bn"]) == (128, 1, 0.01, True)
    cnn = default_config(backbone="small_cnn")
    assert (cnn["image_size"], cnn["in_channels"], cnn["weights"], cnn["freeze_bn"]) == (28, 1, "none", False)
    with pytest.raises(DcmlError, match="unknown key"):
        default_config(embeding_dim=64)
    with pytest.raises(DcmlError, match="unknown backbone"):
        build_model({"backbone": "vgg16"})
    with pytest.raises(DcmlError, match="in_channels"):
        default_config(backbone="resnet18", in_channels=1)
    with pytest.raises(DcmlError, match="num_slices"):
        default_config(backbone="small_cnn", embedding_dim=4, num_slices=8)
    with pytest.raises(DcmlError, match="ImageNet"):
        default_config(backbone="small_cnn", weights="imagenet")


def test_resnet_loads_a_local_weights_file(tmp_path):
    torch.manual_seed(1)
    reference = torchvision.models.resnet18(weights=None)
    path = tmp_path / "resnet18.pth"
    torch.save(reference.state_dict(), path)
    model = build_model({"backbone": "resnet18", "weights": str(path), "image_size": 64})
    assert model.backbone.out_features == 512
    assert torch.equal(model.backbone.net.conv1.weight, reference.conv1.weight)
    assert torch.equal(model.backbone.net.layer4[1].bn2.running_var, reference.layer4[1].bn2.running_var)
    model.eval()
    reference.fc = torch.nn.Identity()
    reference.eval()
    x = torch.randn(2, 3, 64, 64)
    # dcml runs convolutions channels-last, the reference NCHW: the sums run in
    # another order. In float32 (eps 1.2e-7) over ResNet-18's 20 layers with up
    # to 4,608-term sums that moves features of order 1 by up to ~1e-5 (seen:
    # 2e-6 to 8e-6 on different CPUs); 1e-4 leaves room and still catches a
    # wrongly loaded weight, which moves them by O(1).
    torch.testing.assert_close(model.features(x), reference(x), rtol=1e-4, atol=1e-4)

    bad = tmp_path / "other.pth"
    torch.save({"conv1.weight": torch.zeros(3)}, bad)
    with pytest.raises(DcmlError, match="do not fit"):
        build_model({"backbone": "resnet18", "weights": str(bad)})
    with pytest.raises(DcmlError, match="not found"):
        build_model({"backbone": "resnet18", "weights": str(tmp_path / "missing.pth")})


@pytest.fixture(scope="module")
def efficientnet():
    model = build_model({"backbone": "efficientnet_lite0", "weights": "imagenet", "image_size": 224}).eval()
    state = torch.load(efficientnet_lite0_weights_path(), map_location="cpu", weights_only=True)
    return model, state["_fc.weight"], state["_fc.bias"]


def test_efficientnet_lite0_offline_weights_classify_real_photos(efficientnet):
    skimage_data = pytest.importorskip("skimage.data")
    model, fc_weight, fc_bias = efficientnet
    assert model.backbone.out_features == 1280
    transform = build_transform(model.config, train=False)
    expected = {"chelsea": {281, 282, 283, 284, 285},  # tabby / tiger / Persian / Siamese / Egyptian cat
                "coffee": {967, 968, 504}}  # espresso / cup / coffee mug
    for name, classes in expected.items():
        image = Image.fromarray(getattr(skimage_data, name)())
        with torch.no_grad():
            logits = model.features(transform(image)[None]) @ fc_weight.T + fc_bias
        top = int(logits.argmax())
        assert top in classes, f"{name}: predicted ImageNet class {top}"
        assert logits.softmax(1)[0, sorted(classes)].sum() > 0.5


def test_efficientnet_random_init_does_not_recognise_the_cat(efficientnet):
    skimage_data = pytest.importorskip("skimage.data")
    _, fc_weight, fc_bias = efficientnet
    torch.manual_seed(0)
    random_model = build_model({"backbone": "efficientnet_lite0", "weights": "none", "image_size": 224}).eval()
    image = Image.fromarray(skimage_data.chelsea())
    with torch.no_grad():
        logits = random_model.features(build_transform(random_model.config, False)(image)[None]) @ fc_weight.T + fc_bias
    assert logits.softmax(1)[0, 281:286].sum() < 0.5


def test_efficientnet_backbone_equals_the_package_model(efficientnet):
    # Our backbone swaps stride-1 "SAME" convolutions for nn.Conv2d and runs in
    # NHWC; the features must equal the package's own network.
    from efficientnet_lite_pytorch import EfficientNet

    model = efficientnet[0]
    reference = EfficientNet.from_name("efficientnet-lite0", image_size=None)
    reference.load_state_dict(torch.load(efficientnet_lite0_weights_path(), map_location="cpu", weights_only=True))
    reference.eval()
    x = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = reference.extract_features(x).mean(dim=(2, 3))
        assert torch.allclose(model.features(x), expected, atol=1e-4)
    plain = sum(type(m) is torch.nn.Conv2d for m in model.backbone.modules())
    assert plain > 40  # the swap happened (stride-2 convolutions keep TF padding)


def test_efficientnet_backbone_accepts_any_input_size(efficientnet):
    model = efficientnet[0]
    with torch.no_grad():
        for size in (64, 97):
            assert model.features(torch.zeros(1, 3, size, size)).shape == (1, 1280)


def test_model_is_an_embedding_model():
    model = small()
    assert isinstance(model, EmbeddingModel)
    assert isinstance(model.head, torch.nn.Linear) and model.head.out_features == model.embedding_dim
    assert np.isclose(model.config["dropout"], 0.01)
