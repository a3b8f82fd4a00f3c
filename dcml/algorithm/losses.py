"""pytorch-metric-learning losses and miners by name.

Losses are PML's own classes; this module only chooses defaults and adds the
reference code's sampler as a PML miner, so any PML loss can use it.

- "margin": MarginLoss(margin=0.2, beta=1.2). Beta is fixed unless
  ``learn_beta=True`` (then it is a parameter returned by ``loss_parameters``;
  the reference declares beta a Parameter but never gives it to an optimiser).
  Reduction: PML's default for MarginLoss is DivisorReducer with divisor =
  number of non-zero positive terms + number of non-zero negative terms, i.e.
  "sum of the loss divided by the number of non-zero terms" as in the
  reference, so it is kept (AvgNonZeroReducer would count a triplet whose two
  terms are both non-zero once instead of twice).
- "triplet": TripletMarginLoss (margin 0.05, PML's default).
- "contrastive": ContrastiveLoss(pos_margin=0, neg_margin=1); ``margin`` sets neg_margin.
- "proxy_anchor": ProxyAnchorLoss(margin=0.1, alpha=32); needs ``num_classes``
  (labels must be 0..num_classes-1) and ``embedding_dim``. Its proxies are
  returned by ``loss_parameters`` (give them a larger learning rate, ~x100).
- "multi_similarity": MultiSimilarityLoss(alpha=2, beta=50, base=0.5), PML's
  defaults (Wang et al. 2019); ``margin`` sets ``base``.

Miners: "reference" (:class:`ReferenceMiner`), "distance_weighted" (PML's
DistanceWeightedMiner, cutoff 0.5, nonzero_loss_cutoff 1.4),
"multi_similarity" (PML's MultiSimilarityMiner, epsilon 0.1), "none" (None),
and "auto": the loss's own (reference for margin, multi_similarity for
multi_similarity, none for the others, which weigh all pairs themselves).
"""

from __future__ import annotations

import torch
from pytorch_metric_learning import losses as pml_losses
from pytorch_metric_learning import miners as pml_miners
from pytorch_metric_learning.miners import BaseMiner

from dcml.contracts.errors import DcmlError

from dcml.contracts.params import LOSSES, MINERS
AUTO_MINER = {"margin": "reference", "multi_similarity": "multi_similarity"}


def build_loss(name: str, *, embedding_dim: int, num_classes: int | None = None,
               margin: float | None = None, **kwargs):
    """A PML loss module. Extra ``kwargs`` go to the PML constructor (e.g.
    ``learn_beta``, ``beta``, ``nu``, ``alpha``, ``pos_margin``)."""
    try:
        if name == "margin":
            opts = {"margin": 0.2, "beta": 1.2, "learn_beta": False, **kwargs}
            if margin is not None:
                opts["margin"] = float(margin)
            # One beta per class only when asked for; num_classes alone keeps a single beta.
            if opts.pop("class_specific_beta", False):
                if not num_classes:
                    raise DcmlError("loss 'margin': class_specific_beta needs num_classes; pass num_classes")
                opts["num_classes"] = int(num_classes)
            return pml_losses.MarginLoss(**opts)
        if name == "triplet":
            opts = dict(kwargs)
            if margin is not None:
                opts["margin"] = float(margin)
            return pml_losses.TripletMarginLoss(**opts)
        if name == "contrastive":
            opts = {"pos_margin": 0.0, "neg_margin": 1.0, **kwargs}
            if margin is not None:
                opts["neg_margin"] = float(margin)
            return pml_losses.ContrastiveLoss(**opts)
        if name == "proxy_anchor":
            if not num_classes or not embedding_dim:
                raise DcmlError("loss 'proxy_anchor': needs num_classes and embedding_dim; pass the number of training classes")
            opts = {"margin": 0.1, "alpha": 32, **kwargs}
            if margin is not None:
                opts["margin"] = float(margin)
            return pml_losses.ProxyAnchorLoss(num_classes=int(num_classes), embedding_size=int(embedding_dim), **opts)
        if name == "multi_similarity":
            opts = {"alpha": 2.0, "beta": 50.0, "base": 0.5, **kwargs}
            if margin is not None:
                opts["base"] = float(margin)
            return pml_losses.MultiSimilarityLoss(**opts)
    except TypeError as exc:  # an unknown keyword for the PML class
        raise DcmlError(f"loss {name!r}: bad option ({exc}); see the pytorch-metric-learning docs for its arguments") from None
    raise DcmlError(f"unknown loss {name!r}; use one of {', '.join(LOSSES)}")


def loss_parameters(loss) -> list[torch.nn.Parameter]:
    """Parameters of a loss that need an optimiser (proxies, a learnable beta)."""
    if loss is None:
        return []
    return [p for p in loss.parameters() if p.requires_grad]


class ReferenceMiner(BaseMiner):
    """The divide-and-conquer reference sampler as a PML miner.

    Every anchor takes all its positives and, as negatives, its k nearest
    other-class items at distance >= ``cutoff``, where k is the anchor's number
    of positives. Returns pair indices ``(a1, p, a2, n)``.

    Differences from the reference code, on purpose: k is per anchor (the
    reference uses the batch average, identical for class-balanced batches),
    and an anchor with fewer than k negatives beyond the cutoff gets only those
    (the reference's top-k then silently picks positives or itself).
    With k = #positives and PML's MarginLoss (which pairs every positive of an
    anchor with every negative of it), the loss on a class-balanced batch
    equals the reference's.
    """

    def __init__(self, cutoff: float = 0.5, **kwargs):
        super().__init__(**kwargs)
        self.cutoff = float(cutoff)
        self.add_to_recordable_attributes(list_of_names=["cutoff"], is_stat=False)

    def mine(self, embeddings, labels, ref_emb, ref_labels):
        mat = self.distance(embeddings, ref_emb)
        same = labels.unsqueeze(1) == ref_labels.unsqueeze(0)
        positives = same.clone()
        if ref_emb is embeddings:
            positives.fill_diagonal_(False)
        if self.distance.is_inverted:  # a similarity: "farther" means smaller
            beyond, closeness = mat <= self.cutoff, -mat
        else:
            beyond, closeness = mat >= self.cutoff, mat
        candidates = ~same & beyond
        k = positives.sum(dim=1, keepdim=True)
        inf = torch.tensor(float("inf"), device=mat.device, dtype=mat.dtype)
        ranked, order = torch.where(candidates, closeness, inf).sort(dim=1, stable=True)
        ranks = torch.arange(mat.shape[1], device=mat.device).unsqueeze(0)
        take = (ranks < k) & torch.isfinite(ranked)
        a2, col = torch.where(take)
        n = order[a2, col]
        a1, p = torch.where(positives)
        return a1, p, a2, n


def build_miner(name: str | None, loss: str | None = None, **kwargs):
    """A PML miner by name, or None for "none"; "auto" picks the one that goes with ``loss``."""
    if name == "auto":
        name = AUTO_MINER.get(loss, "none")
    if name in (None, "none"):
        return None
    try:
        if name == "reference":
            return ReferenceMiner(**{"cutoff": 0.5, **kwargs})
        if name == "distance_weighted":
            return pml_miners.DistanceWeightedMiner(**{"cutoff": 0.5, "nonzero_loss_cutoff": 1.4, **kwargs})
        if name == "multi_similarity":
            return pml_miners.MultiSimilarityMiner(**{"epsilon": 0.1, **kwargs})
    except TypeError as exc:
        raise DcmlError(f"miner {name!r}: bad option ({exc})") from None
    raise DcmlError(f"unknown miner {name!r}; use one of {', '.join(MINERS)}")
