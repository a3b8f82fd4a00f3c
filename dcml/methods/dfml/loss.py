"""The DFML objective: the metric loss of the full and the routed pass plus the
similarity distillation of the routed embedding towards the full one."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def similarity_distillation(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """KL(teacher || student) between row-wise softmaxes of the in-batch cosine similarities.

    Retrieval only uses who is near whom, so the routed embedding is asked to
    reproduce the full embedding's neighbour distribution over the batch, not
    its coordinates; the diagonal (self-similarity, always 1) is left out.
    ``teacher`` is detached here.
    """
    n = student.shape[0]
    if n < 3:
        return student.sum() * 0.0
    off_diagonal = ~torch.eye(n, dtype=torch.bool, device=student.device)
    s = F.normalize(student, dim=1)
    t = F.normalize(teacher.detach(), dim=1)
    log_q = F.log_softmax((s @ s.T)[off_diagonal].view(n, n - 1) / temperature, dim=1)
    log_p = F.log_softmax((t @ t.T)[off_diagonal].view(n, n - 1) / temperature, dim=1)
    return F.kl_div(log_q, log_p, log_target=True, reduction="batchmean")


def dfml_loss(metric_loss, full: torch.Tensor, routed: torch.Tensor, labels: torch.Tensor, *,
              routed_weight: float = 0.5, distill_weight: float = 0.5, temperature: float = 0.1,
              balance: torch.Tensor | None = None, balance_weight: float = 0.0) -> tuple[torch.Tensor, dict]:
    """L(full) + routed_weight * L(routed) + distill_weight * KD(routed -> full.detach())
    [+ balance_weight * balance, the routers' load-balancing term (``balance_loss``)]."""
    loss_full = metric_loss(full, labels)
    loss_routed = metric_loss(routed, labels)
    distill = similarity_distillation(routed, full, temperature)
    total = loss_full + routed_weight * loss_routed + distill_weight * distill
    parts = {"loss_full": float(loss_full.detach()), "loss_routed": float(loss_routed.detach()),
             "distill": float(distill.detach())}
    if balance is not None:
        parts["balance"] = float(balance.detach())
        if balance_weight:
            total = total + balance_weight * balance
    parts["loss"] = float(total.detach())
    return total, parts
