"""Divide and conquer with learned masks (the journal version, metric-learning-divide-and-conquer-improved).

Instead of a fixed slice, learner k weights the whole embedding with its own
mask: its batches (from cluster k) are embedded as ``normalize(e * relu(m_k))``
with ``e`` the model's embedding and ``m_k`` a learned vector initialised to
ones. A penalty ``mask_orthogonality`` x the mean cosine similarity of the
masks (after the ReLU) pushes them apart, so each learner comes to own a soft
subset of the dimensions. From ``whole_embedding_after`` of the epochs on, the
loss sees the whole (unmasked) embedding and the masks stop changing, as in
the reference. The masks are a training device: the delivered model embeds
with the whole embedding, so checkpoints, indexes and exports are unchanged.

Differences from the journal code, on purpose: K is fixed (the journal version
starts from one mask and splits masks as K doubles), and the masks' learning
rate is the embedding head's (the journal's default multiplier is 1, its
weight decay 0, both kept).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dcml.algorithm.training.grouping import switch_epoch
from dcml.algorithm.training.trainer import Trainer
from dcml.contracts.errors import DcmlError


class LearnedMasks(torch.nn.Module):
    """K mask vectors over a D-dimensional embedding."""

    def __init__(self, k: int, dim: int):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(k, dim))

    def forward(self, embeddings: torch.Tensor, k: int) -> torch.Tensor:
        return F.normalize(embeddings * F.relu(self.weight[k]), dim=1)

    def orthogonality(self) -> torch.Tensor:
        """Mean cosine similarity of distinct masks after the ReLU (0 when they share no dimension)."""
        m = F.normalize(F.relu(self.weight), dim=1, eps=1e-8)
        sim = m @ m.T
        k = len(m)
        return (sim.sum() - sim.diagonal().sum()) / max(k * (k - 1), 1)


class MaskedTrainer(Trainer):
    """The Trainer with K learned masks over a one-slice model trained on batches from K clusters."""

    def __init__(self, model, manifest, train_rows, settings, **kwargs):
        k = int(settings.num_groups or 0)
        if model.num_slices != 1 or k < 2:
            raise DcmlError(f"embedding_masks: the model must have one slice and the clusters K >= 2 "
                            f"(got {model.num_slices} slices, K={k}); set num_clusters >= 2")
        if kwargs.get("only_learner") is not None:
            raise DcmlError("embedding_masks is for the shared mode; a parallel worker trains its own slice")
        self.masks = LearnedMasks(k, model.embedding_dim)
        self.mask_until = switch_epoch(settings)
        kwargs["fingerprint_extra"] = {"masks": k, "extra": kwargs.get("fingerprint_extra")}
        super().__init__(model, manifest, train_rows, settings, **kwargs)
        self.masks.to(self.device)

    def whole_embedding(self, epoch: int) -> bool:
        return self.finetuning(epoch) or (self.mask_until is not None and epoch >= self.mask_until)

    def param_groups(self) -> list[dict]:
        return super().param_groups() + [{"params": [self.masks.weight], "lr": self.settings.lr_embedding,
                                          "weight_decay": 0.0, "name": "masks"}]

    def forward(self, inputs: torch.Tensor, learner: int | None) -> torch.Tensor:
        out = super().forward(inputs, None)  # the whole embedding, one unit vector
        return out if learner is None else self.masks(out, learner)

    def _loss_for(self, learner: int | None):
        return self.losses[-1]

    def regulariser(self, learner: int | None) -> torch.Tensor | None:
        if learner is None or not self.settings.mask_orthogonality:
            return None
        return self.settings.mask_orthogonality * self.masks.orthogonality()

    def epoch_finished(self, epoch: int, entry: dict) -> None:
        super().epoch_finished(epoch, entry)
        with torch.no_grad():
            entry["mask_orthogonality"] = round(float(self.masks.orthogonality()), 4)
            active = F.relu(self.masks.weight) > 0.1 * F.relu(self.masks.weight).amax(dim=1, keepdim=True)
            entry["mask_active_dims"] = active.sum(dim=1).tolist()

    def extra_state(self) -> dict:
        return {"masks": self.masks.weight.detach().cpu().clone()}

    def load_extra_state(self, state: dict) -> None:
        if "masks" in state:
            with torch.no_grad():
                self.masks.weight.copy_(state["masks"].to(self.masks.weight.device))
