"""The DFML training loop: dcml's :class:`~dcml.algorithm.training.Trainer` with
its hooks overridden for the two-pass step (full and routed), the routers'
parameter group and the per-epoch routing counts."""

from __future__ import annotations

import torch

from dcml.algorithm.training import Trainer, TrainSettings
from dcml.contracts.errors import DcmlError
from dcml.methods.dfml.loss import dfml_loss
from dcml.methods.dfml.model import balance_loss, is_factorized, route_mode, router_parameters
from dcml.methods.dfml.router import reset_routing_counts, routed_units, routing_counts, routing_summary


class DFMLTrainer(Trainer):
    """dcml's Trainer (sampler, loader, evaluation, resume) with the two-pass DFML step.

    ``model`` must be factorised (``dcml.methods.dfml.factorize``) and have K=1.
    """

    def __init__(self, model, manifest, train_rows, settings: TrainSettings, *, lr_router: float = 1e-4,
                 routed_weight: float = 0.5, distill_weight: float = 0.5, temperature: float = 0.1,
                 balance_weight: float = 0.0, eval_routed: bool = False, fingerprint_extra=None, **kwargs):
        if not is_factorized(model):
            raise DcmlError("DFMLTrainer needs a factorised model; build it with dcml.methods.dfml.factorize(model)")
        if model.num_slices != 1:
            raise DcmlError(f"DFML trains one embedding; got a model with K={model.num_slices} slices")
        for name, value in (("lr_router", lr_router), ("routed_weight", routed_weight),
                            ("distill_weight", distill_weight), ("balance_weight", balance_weight)):
            if not value >= 0:
                raise DcmlError(f"{name}={value}: must be >= 0")
        if not temperature > 0:
            raise DcmlError(f"temperature={temperature}: must be > 0")
        self.lr_router = float(lr_router)
        self.routed_weight = float(routed_weight)
        self.distill_weight = float(distill_weight)
        self.temperature = float(temperature)
        self.balance_weight = float(balance_weight)
        self.eval_routed = bool(eval_routed)
        options = {"lr_router": self.lr_router, "routed_weight": self.routed_weight,
                   "distill_weight": self.distill_weight, "temperature": self.temperature,
                   "balance_weight": self.balance_weight}
        super().__init__(model, manifest, train_rows, settings,
                         fingerprint_extra={"dfml": options, "extra": fingerprint_extra}, **kwargs)

    def backbone_parameters(self) -> list:
        routers = {id(p) for p in router_parameters(self.model)}
        return [p for p in super().backbone_parameters() if id(p) not in routers]

    def param_groups(self) -> list[dict]:
        """The Trainer's groups plus the routers' (their own learning rate)."""
        groups = super().param_groups()
        groups.insert(2 if groups[0]["name"] == "backbone" else 1,
                      {"params": router_parameters(self.model), "lr": self.lr_router, "name": "router"})
        return groups

    def evaluate(self) -> dict:
        """R@1 of the full model; with ``eval_routed`` also of the routed model and its routing."""
        metrics = super().evaluate()
        if self.eval_routed:
            saved = {name: unit.route_counts.clone() for name, unit in routed_units(self.model)}
            reset_routing_counts(self.model)
            with route_mode(self.model, "routed"):
                metrics["routed_recall@1"] = super().evaluate()["recall@1"]
            metrics["eval_routing"] = routing_counts(self.model)
            for name, unit in routed_units(self.model):
                unit.route_counts.copy_(saved[name])
        return metrics

    def epoch_started(self, epoch: int, entry: dict) -> None:
        entry["phase"] = "dfml"
        reset_routing_counts(self.model)

    def train_step(self, inputs, labels, learner) -> dict:
        """Two passes: the full model and the routed one; loss = L(full) + w_r L(routed) + w_d KD."""
        metric_loss = self._loss_for(None)

        def loss_of(embeddings, labels):
            pairs = self.miner(embeddings, labels) if self.miner is not None else None
            return metric_loss(embeddings, labels, pairs)

        # Data parallel: both passes' embeddings are gathered, so the metric losses and the
        # distillation see the whole batch, as in one process.
        full = self.gather(self.model(inputs))
        with route_mode(self.model, "routed"):
            routed = self.gather(self.model(inputs))
        balance = balance_loss(self.model)
        if balance is not None and self.world_size > 1:
            # The routers' load balance is a statistic of this process's share; the summed
            # gradients then are those of the processes' mean balance term.
            balance = balance / self.world_size
        with self.batch_rng():
            loss, parts = dfml_loss(loss_of, full, routed, labels, routed_weight=self.routed_weight,
                                    distill_weight=self.distill_weight, temperature=self.temperature,
                                    balance=balance, balance_weight=self.balance_weight)
        self.check_finite(loss, f" ({parts}); lr_router={self.lr_router}")
        self.step(loss)
        return {key: parts[key] for key in ("loss", "loss_full", "loss_routed", "distill", "balance")}

    def epoch_finished(self, epoch: int, entry: dict) -> None:
        if self.world_size > 1:  # every process routed its own share: the epoch's counts are their sum
            from dcml.algorithm import distributed

            for _, unit in routed_units(self.model):
                distributed.all_reduce_sum_(unit.route_counts)
                # A routed unit's BatchNorm saw only the images this process routed to it (no collective
                # there: a process that routed none would wait forever): its running statistics are
                # averaged over the processes each epoch so they all end with one model.
                stats = [s for m in unit.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
                         for s in (m.running_mean, m.running_var) if s is not None]
                with torch.no_grad():
                    for stat in stats:
                        distributed.all_reduce_sum_(stat).div_(self.world_size)
        counts = routing_counts(self.model)
        summary = routing_summary(counts)
        entry.update({"routing": counts, "routing_entropy": summary["mean_normalized_entropy"],
                      "collapsed_units": summary["collapsed_units"]})
