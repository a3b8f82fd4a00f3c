"""Losses and miners: PML classes by name, and the reference sampler as a PML miner."""

import math

import pytest
import torch
import torch.nn.functional as F
from pytorch_metric_learning import losses as pml_losses
from pytorch_metric_learning import miners as pml_miners
from pytorch_metric_learning.reducers import DivisorReducer

from dcml.contracts.errors import DcmlError
from dcml.algorithm.losses import ReferenceMiner, build_loss, build_miner, loss_parameters

torch.set_num_threads(1)


def unit_vectors(degrees):
    rad = torch.tensor(degrees, dtype=torch.float64) * math.pi / 180
    return torch.stack([torch.cos(rad), torch.sin(rad)], dim=1)


def as_pairs(a, b):
    pairs = list(zip(a.tolist(), b.tolist()))
    assert len(pairs) == len(set(pairs)), "a pair was mined twice"
    return set(pairs)


def test_reference_miner_on_known_distances():
    # Euclidean distance between unit vectors at angle t is 2 sin(t/2);
    # the cutoff 0.5 corresponds to about 29 degrees.
    angles = [0, 10, 20, 25, 60, 105, 180, 182]
    labels = torch.tensor([0, 0, 0, 1, 1, 2, 2, 3])
    a1, p, a2, n = build_miner("reference")(unit_vectors(angles), labels)
    assert as_pairs(a1, p) == {(0, 1), (0, 2), (1, 0), (1, 2), (2, 0), (2, 1), (3, 4), (4, 3), (5, 6), (6, 5)}
    # k = number of positives of the anchor; item 3 (25 deg) is a negative of
    # class 0 closer than the cutoff, so it is never taken by anchors 0-2;
    # item 7 is a singleton: no positives, hence no negatives either.
    assert as_pairs(a2, n) == {(0, 4), (0, 5), (1, 4), (1, 5), (2, 4), (2, 5), (3, 5), (4, 2), (5, 4), (6, 4)}


def test_reference_miner_takes_only_negatives_beyond_cutoff():
    # Class 0 anchors have 2 positives but only one negative farther than 0.5.
    emb = unit_vectors([0, 10, 20, 90, 15])
    labels = torch.tensor([0, 0, 0, 1, 2])
    _, _, a2, n = ReferenceMiner(cutoff=0.5)(emb, labels)
    got = as_pairs(a2, n)
    assert {(0, 3), (1, 3), (2, 3)} <= got
    assert all(neg != 4 for anchor, neg in got if anchor in (0, 1, 2))  # item 4 is within the cutoff
    assert not any(anchor in (3, 4) for anchor, _ in got)  # no positives -> k = 0


def test_margin_loss_with_reference_miner_equals_reference_formula():
    """On a class-balanced batch PML's MarginLoss + the miner gives the reference loss:
    sum of relu(d_ap - beta + m) + relu(beta - d_an + m) over each anchor's positives and
    its k nearest negatives beyond the cutoff, divided by the number of non-zero terms."""
    torch.manual_seed(3)
    classes, per_class, beta, margin = 5, 4, 1.2, 0.2
    labels = torch.arange(classes).repeat_interleave(per_class)
    emb = F.normalize(torch.randn(len(labels), 8, dtype=torch.float64), dim=1)
    loss = build_loss("margin", embedding_dim=8)
    assert isinstance(loss.reducer.reducers["margin_loss"], DivisorReducer)
    ours = loss(emb, labels, build_miner("reference")(emb, labels)).item()

    d = torch.cdist(emb, emb)
    terms = []
    for i in range(len(labels)):
        pos = [j for j in range(len(labels)) if labels[j] == labels[i] and j != i]
        neg = sorted((j for j in range(len(labels)) if labels[j] != labels[i] and d[i, j] >= 0.5), key=lambda j: d[i, j])
        neg = neg[:len(pos)]
        assert len(neg) == len(pos)
        for jp, jn in zip(pos, neg):
            terms += [F.relu(d[i, jp] - beta + margin), F.relu(beta - d[i, jn] + margin)]
    terms = torch.stack(terms)
    expected = (terms.sum() / (terms > 0).sum()).item()
    assert expected > 0
    assert ours == pytest.approx(expected, rel=1e-6)


def toy_problem(seed=0, classes=4, per_class=8, dim=16):
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(classes, dim, generator=g)
    x = means.repeat_interleave(per_class, 0) + 0.8 * torch.randn(classes * per_class, dim, generator=g)
    return x, torch.arange(classes).repeat_interleave(per_class)


@pytest.mark.parametrize("name,miner", [
    ("margin", "reference"), ("margin", "distance_weighted"), ("margin", "none"),
    ("triplet", "none"), ("triplet", "reference"), ("contrastive", "none"), ("proxy_anchor", "none"),
])
def test_loss_decreases_on_separable_toy_problem(name, miner):
    x, y = toy_problem()
    torch.manual_seed(1)
    net = torch.nn.Linear(x.shape[1], 8)
    loss_fn = build_loss(name, embedding_dim=8, num_classes=4)
    mine = build_miner(miner)
    groups = [{"params": net.parameters(), "lr": 0.01}]
    if loss_parameters(loss_fn):
        groups.append({"params": loss_parameters(loss_fn), "lr": 1.0})  # proxies learn faster
    opt = torch.optim.Adam(groups)
    history = []
    for _ in range(30):
        emb = F.normalize(net(x), dim=1)
        value = loss_fn(emb, y, mine(emb, y) if mine else None)
        opt.zero_grad()
        value.backward()
        opt.step()
        history.append(value.item())
    assert history[0] > 0
    assert history[-1] < 0.5 * history[0], history


def test_margin_beta_is_a_parameter_only_when_learned():
    fixed = build_loss("margin", embedding_dim=16)
    assert loss_parameters(fixed) == []
    assert not isinstance(fixed.beta, torch.nn.Parameter)
    assert fixed.beta.tolist() == pytest.approx([1.2]) and fixed.margin == pytest.approx(0.2)
    learned = build_loss("margin", embedding_dim=16, learn_beta=True, margin=0.3)
    params = loss_parameters(learned)
    assert len(params) == 1 and params[0] is learned.beta and learned.margin == pytest.approx(0.3)
    # A class-specific beta only when asked; num_classes alone keeps one beta.
    assert build_loss("margin", embedding_dim=16, num_classes=7).beta.numel() == 1
    assert build_loss("margin", embedding_dim=16, num_classes=7, class_specific_beta=True).beta.numel() == 7


def test_proxy_anchor_proxies_are_listed():
    loss = build_loss("proxy_anchor", embedding_dim=12, num_classes=5)
    assert isinstance(loss, pml_losses.ProxyAnchorLoss)
    params = loss_parameters(loss)
    assert len(params) == 1 and params[0] is loss.proxies and tuple(loss.proxies.shape) == (5, 12)
    assert loss.margin == pytest.approx(0.1) and loss.alpha == 32
    with pytest.raises(DcmlError, match="num_classes"):
        build_loss("proxy_anchor", embedding_dim=12)


def test_loss_defaults_and_margin_option():
    triplet = build_loss("triplet", embedding_dim=8)
    assert isinstance(triplet, pml_losses.TripletMarginLoss) and triplet.margin == pytest.approx(0.05)
    assert build_loss("triplet", embedding_dim=8, margin=0.1).margin == pytest.approx(0.1)
    contrastive = build_loss("contrastive", embedding_dim=8)
    assert (contrastive.pos_margin, contrastive.neg_margin) == (0, 1)
    assert build_loss("contrastive", embedding_dim=8, margin=0.7).neg_margin == pytest.approx(0.7)
    with pytest.raises(DcmlError, match="unknown loss"):
        build_loss("arcface", embedding_dim=8)
    with pytest.raises(DcmlError, match="bad option"):
        build_loss("triplet", embedding_dim=8, not_an_option=1)


def test_miner_names():
    assert build_miner("none") is None and build_miner(None) is None
    dw = build_miner("distance_weighted")
    assert isinstance(dw, pml_miners.DistanceWeightedMiner)
    assert (dw.cutoff, dw.nonzero_loss_cutoff) == (0.5, 1.4)
    torch.manual_seed(0)
    labels = torch.arange(4).repeat_interleave(4)
    a, p, n = dw(F.normalize(torch.randn(16, 8), dim=1), labels)
    assert len(a) > 0 and (labels[a] == labels[p]).all() and (labels[a] != labels[n]).all()
    with pytest.raises(DcmlError, match="unknown miner"):
        build_miner("hardest")
