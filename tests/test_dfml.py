"""DFML: lossless factorisation, exact merge back, router, objective."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dcml.methods import dfml
from dcml.contracts.errors import DcmlError
from dcml.algorithm.models import build_model

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def lite0():
    """EfficientNet-Lite0 with the real offline ImageNet weights, eval mode."""
    torch.manual_seed(0)  # the embedding head's init
    return build_model({"backbone": "efficientnet_lite0", "weights": "imagenet", "image_size": 64}).eval()


def _vit():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    # LayerScale on, and non-zero biases everywhere, so "bias / G" is really exercised.
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, num_classes=0, init_values=0.3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
    return model.eval()


def _images(n=4, size=64, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g)


# -- lossless factorisation ----------------------------------------------------

def test_lite0_factorised_output_equals_original(lite0):
    fm = dfml.factorize(lite0, groups=3)
    assert len(dfml.routed_units(fm)) == 16  # every MBConv block of Lite0
    assert all(len(u.sub_blocks) == 3 for _, u in dfml.routed_units(fm))
    x = _images()
    with torch.no_grad():
        assert torch.allclose(fm(x), lite0(x), rtol=0, atol=1e-5)
        feats = lite0.features(x)
        assert (fm.features(x) - feats).abs().max() < 1e-5 * feats.abs().max()
    # In float64 the only difference left is summation order: exact to ~1e-12.
    m64, f64 = lite0.double(), dfml.factorize(lite0, groups=3).double()
    x = _images(n=2, size=32).double()
    try:
        with torch.no_grad():
            assert torch.allclose(f64.features(x), m64.features(x), rtol=0, atol=1e-10)
    finally:
        lite0.float()


def test_lite0_full_pass_is_exact_in_training_mode(lite0):
    """Train mode: frozen BN + stochastic depth (same random draws) still match."""
    fm = dfml.factorize(lite0, groups=3)
    x = _images(size=32)
    lite0.train(), fm.train()
    try:
        torch.manual_seed(5)
        ref = lite0.features(x)
        torch.manual_seed(5)
        got = fm.features(x)
    finally:
        lite0.eval()
    assert (got - ref).abs().max() < 1e-5 * ref.abs().max()


def test_uneven_groups_are_exact(lite0):
    fm = dfml.factorize(lite0, groups=5)  # 32, 96, 144 ... hidden channels: uneven splits
    sizes = [s.bn1.num_features for s in fm.backbone.net._blocks[0].sub_blocks]
    assert sizes == [7, 7, 6, 6, 6]
    x = _images(n=2, size=32)
    with torch.no_grad():
        assert torch.allclose(fm(x), lite0(x), rtol=0, atol=1e-5)


def test_vit_factorised_output_equals_original():
    vit = _vit()
    fv = dfml.factorize(vit, groups=3)
    units = dict(dfml.routed_units(fv))
    assert len(units) == 2 * len(vit.blocks)  # attention + MLP of every block
    assert [p.num_heads for p in units["blocks.0.attn"].sub_blocks] == [1, 1, 1]
    assert [p.fc1.out_features for p in units["blocks.0.mlp"].sub_blocks] == [256, 256, 256]
    x = _images(n=2, size=32)
    with torch.no_grad():
        ref = vit(x)
        assert ref.abs().max() > 0.1
        assert torch.allclose(fv(x), ref, rtol=0, atol=1e-5)


# -- merge back ----------------------------------------------------------------

def _assert_same_state(a: nn.Module, b: nn.Module):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def test_defactorize_round_trip_is_identity(lite0):
    back = dfml.defactorize(dfml.factorize(lite0))
    assert type(back.backbone.net._blocks[5]) is type(lite0.backbone.net._blocks[5])
    assert not dfml.is_factorized(back)
    _assert_same_state(back, lite0)
    # The rebuilt model is a plain EmbeddingModel: its weights load into a fresh one.
    fresh = build_model(dict(lite0.config), load_weights=False)
    fresh.load_state_dict(back.state_dict())
    vit = _vit()
    _assert_same_state(dfml.defactorize(dfml.factorize(vit)), vit)


def _perturb(model: nn.Module, seed: int = 0):
    """Change every factorised weight as training would (different per sub-block)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, unit in dfml.routed_units(model):
            for p in unit.sub_blocks.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.02 * (p.abs().mean() + 1e-3))


def test_defactorize_is_exact_after_training_changes(lite0):
    fm = dfml.factorize(lite0)
    _perturb(fm)
    merged = dfml.defactorize(fm).eval()
    x = _images(size=32)
    with torch.no_grad():
        assert (merged(x) - lite0(x)).abs().max() > 1e-3  # the weights did change ...
        assert torch.allclose(merged(x), fm(x), rtol=0, atol=1e-5)  # ... and the merge keeps them
    vit = _vit()
    fv = dfml.factorize(vit)
    _perturb(fv)
    xv = _images(n=2, size=32)
    with torch.no_grad():
        assert torch.allclose(dfml.defactorize(fv)(xv), fv(xv), rtol=0, atol=1e-5)


# -- router --------------------------------------------------------------------

def test_straight_through_one_hot_forward_and_gradient():
    logits = torch.randn(6, 3, requires_grad=True)
    gates, index = dfml.straight_through_one_hot(logits)
    assert torch.equal(gates.detach(), nn.functional.one_hot(logits.argmax(1), 3).float())
    assert torch.equal(index, logits.argmax(1))
    weights = torch.tensor([1.0, -2.0, 0.5])
    (gates * weights).sum().backward()
    # Backward is the softmax Jacobian: d/dlogits = p * (w - <p, w>).
    p = logits.detach().softmax(1)
    expected = p * (weights - (p * weights).sum(1, keepdim=True))
    assert torch.allclose(logits.grad, expected, atol=1e-6)


def test_routed_mbconv_runs_only_the_chosen_sub_block(lite0):
    fm = dfml.factorize(lite0)
    unit = fm.backbone.net._blocks[2]  # 24 -> 24 channels, stride 1: has the skip connection
    assert unit.has_skip
    torch.manual_seed(0)
    x = torch.randn(8, 24, 16, 16)
    with torch.no_grad():
        unit.router.linear.weight.normal_(0, 1.0)
        with dfml.route_mode(fm, "routed"):
            out = unit(x)
        _, index = unit.router(x.mean((2, 3)))
        for n in range(len(x)):
            sub = unit.sub_blocks[int(index[n])]
            expected = unit.routed_output(sub(x[n:n + 1])) + x[n:n + 1]
            assert torch.allclose(out[n:n + 1], expected, atol=1e-5)
    assert unit.route_counts.sum() == 8
    assert unit.route_counts.tolist() == torch.bincount(index, minlength=3).tolist()


def test_gradient_reaches_every_router_through_the_routed_pass(lite0):
    fm = dfml.factorize(lite0).train()
    x = _images(n=6, size=32)
    with dfml.route_mode(fm, "routed"):
        emb = fm(x)
    assert all(u.route_mode == "full" for _, u in dfml.routed_units(fm))  # restored
    (emb[:3] @ emb[3:].T).sum().backward()
    for name, unit in dfml.routed_units(fm):
        grad = unit.router.linear.weight.grad
        assert grad is not None and grad.abs().sum() > 0, name
    counts = dfml.routing_counts(fm)
    assert all(sum(row) == 6 for row in counts.values())
    # The full pass uses no router.
    dfml.reset_routing_counts(fm)
    fm(x)
    assert all(sum(row) == 0 for row in dfml.routing_counts(fm).values())


def test_vit_routes_per_token():
    fv = dfml.factorize(_vit())
    x = _images(n=2, size=32)
    with dfml.route_mode(fv, "routed"):
        out = fv(x)
    # Not out.sum(): the final LayerNorm makes that constant in the block outputs.
    (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(0))).sum().backward()
    counts = dfml.routing_counts(fv)
    tokens = 2 * (1 + (32 // 16) ** 2)  # class token + 4 patches, per image
    assert all(sum(row) == tokens for row in counts.values())
    assert fv.blocks[0].attn.router.linear.weight.grad.abs().sum() > 0
    assert fv.blocks[0].mlp.router.linear.weight.grad.abs().sum() > 0


def test_routers_start_from_a_data_dependent_init(lite0):
    """The first training-mode routed batch centres each router's logits: no collapse at the start."""
    torch.manual_seed(0)
    fm = dfml.factorize(lite0).train()
    units = dfml.routed_units(fm)
    assert all(bool(u.router.init_pending) for _, u in units)
    x = _images(n=16, size=32)
    inputs = {}
    hooks = [u.register_forward_pre_hook(lambda m, args, name=name: inputs.__setitem__(name, args[0].detach()))
             for name, u in units]
    with torch.no_grad(), dfml.route_mode(fm, "routed"):
        fm(x)
    for h in hooks:
        h.remove()
    for name, unit in units:
        assert not bool(unit.router.init_pending)
        logits = unit.router.linear(inputs[name].mean(dim=(2, 3)))
        assert logits.mean(0).abs().max() < 1e-3, name
        assert torch.allclose(logits.std(0), torch.ones(3), atol=1e-3), name
    used = [sum(c > 0 for c in row) for row in dfml.routing_counts(fm).values()]
    assert sum(n >= 2 for n in used) >= 14  # nearly every block routes the batch to several sub-blocks
    # Done once: a resumed run keeps its trained routers.
    assert "backbone.net._blocks.0.router.init_pending" in fm.state_dict()


def test_router_balance_term():
    collapsing = dfml.Router(4, 3)
    with torch.no_grad():
        collapsing.linear.weight.copy_(torch.tensor([[1.0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]))
    x = torch.rand(32, 4) + 1.0  # feature 0 > 1 for every row: all rows go to sub-block 0
    collapsing(x)
    p0 = torch.softmax(collapsing.linear(x), 1)[:, 0].mean()
    assert collapsing.balance.item() == pytest.approx(3 * p0.item(), rel=1e-5)  # G * 1 * P(0)
    # Its gradient lowers the over-used sub-block's logit: d/dw[0, 0] > 0.
    collapsing.balance.backward()
    assert collapsing.linear.weight.grad[0, 0] > 0

    even = dfml.Router(3, 3)
    with torch.no_grad():
        even.linear.weight.copy_(torch.eye(3) * 20)
    even(torch.eye(3).repeat(10, 1))  # 10 rows to each sub-block, probabilities ~one-hot
    assert even.balance.item() == pytest.approx(1.0, abs=1e-6)


def test_balance_loss_is_read_once_and_optional_in_the_objective(lite0):
    from dcml.algorithm.losses import build_loss

    fm = dfml.factorize(lite0)
    x = _images(n=6, size=32)
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    full = fm(x)
    with dfml.route_mode(fm, "routed"):
        routed = fm(x)
    balance = dfml.balance_loss(fm)
    assert 1.0 <= balance.item() <= 3.0 + 1e-6
    assert dfml.balance_loss(fm) is None
    metric_loss = build_loss("proxy_anchor", embedding_dim=fm.embedding_dim, num_classes=3)
    plain, parts = dfml.dfml_loss(metric_loss, full, routed, labels, balance=balance)
    weighted, parts_w = dfml.dfml_loss(metric_loss, full, routed, labels, balance=balance, balance_weight=0.1)
    assert parts["balance"] == parts_w["balance"] == pytest.approx(balance.item())
    assert weighted.item() == pytest.approx(plain.item() + 0.1 * balance.item(), rel=1e-5)
    dfml.defactorize(fm)  # copying works after routed passes


def test_routing_summary():
    summary = dfml.routing_summary({"a": [5, 5, 0], "b": [0, 9, 0], "c": [3, 3, 3]})
    assert summary["fractions"]["a"] == [0.5, 0.5, 0.0]
    assert summary["collapsed_units"] == 1
    assert summary["mean_normalized_entropy"] == pytest.approx((0.6309 + 0 + 1) / 3, abs=1e-3)


def test_unsupported_model_is_a_clear_error():
    with pytest.raises(DcmlError, match="no block that can be factorised"):
        dfml.factorize(build_model({"backbone": "small_cnn"}))
    with pytest.raises(DcmlError, match="at least 2"):
        dfml.factorize(nn.Linear(2, 2), groups=1)


# -- objective -----------------------------------------------------------------

def test_similarity_distillation():
    torch.manual_seed(0)
    teacher = torch.randn(8, 16, requires_grad=True)
    student = torch.randn(8, 16, requires_grad=True)
    assert dfml.similarity_distillation(teacher, teacher).abs() < 1e-6
    kd = dfml.similarity_distillation(student, teacher)
    assert kd > 0.01
    kd.backward()
    assert teacher.grad is None  # the full pass is the (detached) teacher
    assert student.grad.abs().sum() > 0


def test_routed_pass_does_not_collapse(lite0):
    """G x the chosen sub-block keeps the routed embeddings apart at the start."""
    torch.manual_seed(3)
    fm = dfml.factorize(lite0)
    assert {u.routed_scale for _, u in dfml.routed_units(fm)} == {3.0}
    x = _images(n=8, size=32)
    with torch.no_grad(), dfml.route_mode(fm, "routed"):
        emb = fm(x)
    off_diagonal = ~torch.eye(8, dtype=torch.bool)
    assert (emb @ emb.T)[off_diagonal].mean() < 0.95
    assert dfml.factorize(lite0, routed_scale=1.0).backbone.net._blocks[0].routed_scale == 1.0


def test_dfml_loss_decreases_on_a_tiny_batch(lite0):
    from dcml.algorithm.losses import build_loss, loss_parameters

    torch.manual_seed(0)
    fm = dfml.factorize(lite0).eval()  # eval: no stochastic depth / dropout, a deterministic descent
    labels = torch.arange(4).repeat_interleave(3)
    # Class-dependent images so there is something to learn.
    x = _images(n=12, size=32) * 0.5 + labels.view(-1, 1, 1, 1).float() * 0.4
    metric_loss = build_loss("proxy_anchor", embedding_dim=fm.embedding_dim, num_classes=4)
    optimizer = torch.optim.Adam([
        {"params": [p for n, p in fm.backbone.named_parameters() if "router" not in n and p.requires_grad], "lr": 1e-4},
        {"params": fm.head.parameters(), "lr": 1e-3},
        {"params": dfml.router_parameters(fm), "lr": 1e-3},
        {"params": loss_parameters(metric_loss), "lr": 1e-2},
    ])
    history = []
    for _ in range(6):
        full = fm(x)
        with dfml.route_mode(fm, "routed"):
            routed = fm(x)
        loss, parts = dfml.dfml_loss(metric_loss, full, routed, labels)
        assert parts["loss"] == pytest.approx(parts["loss_full"] + 0.5 * parts["loss_routed"] + 0.5 * parts["distill"], rel=1e-5)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append(parts)
    first, last_two = history[0], history[-2:]
    assert min(h["loss"] for h in last_two) < 0.85 * first["loss"], history
    for key in ("loss_full", "loss_routed"):
        assert sum(h[key] for h in last_two) / 2 < first[key], (key, history)
