"""Training that keeps what the backbone knew: distilling the pretrained features' similarity structure.

With few training classes, metric learning bends the embedding towards
those classes and can lose the general similarity the pretrained features
carry. :class:`DistillTrainer` adds ``distill`` x the mean squared difference
between the batch's pairwise cosine similarities in the embedding and in the
pretrained backbone's pooled features (a frozen copy of the backbone as it
was before training), over the distinct pairs of the whole batch. The
teacher never trains; the delivered model is the student alone.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dcml.algorithm.training.trainer import Trainer
from dcml.contracts.errors import DcmlError


class DistillTrainer(Trainer):
    """The Trainer plus the similarity-distillation term (hooks ``forward`` and ``regulariser``)."""

    def __init__(self, model, manifest, train_rows, settings, **kwargs):
        if settings.distill <= 0:
            raise DcmlError(f"distill={settings.distill}: the distillation trainer needs a weight > 0")
        if str(model.config.get("weights")) == "none":
            raise DcmlError("distill: the backbone has no pretrained weights (weights=none), so there is nothing "
                            "to distil; set distill=0")
        from dcml.algorithm.baseline import backbone_model

        self.teacher = backbone_model(model.config)
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self._student = self._teacher_features = None
        kwargs["fingerprint_extra"] = {"distill": float(settings.distill), "extra": kwargs.get("fingerprint_extra")}
        super().__init__(model, manifest, train_rows, settings, **kwargs)
        self.teacher.to(self.device).eval()

    def forward(self, inputs: torch.Tensor, learner: int | None) -> torch.Tensor:
        out = super().forward(inputs, learner)
        with torch.no_grad():
            self.teacher.eval()
            features = (self.teacher.features_from_lower(inputs) if self.activations is not None
                        else self.teacher.features(inputs))
        self._student, self._teacher_features = out, F.normalize(features.float(), dim=1)
        return out

    def regulariser(self, learner: int | None) -> torch.Tensor | None:
        student = F.normalize(self.gather(self._student), dim=1)
        teacher = self.gather(self._teacher_features)
        n = len(student)
        if n < 2:
            return None
        off = ~torch.eye(n, dtype=torch.bool, device=student.device)
        gap = (student @ student.T - teacher @ teacher.T)[off]
        return self.settings.distill * (gap ** 2).mean()
