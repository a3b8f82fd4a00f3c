"""The steps a trainer may change (hooks), with the defaults of plain metric learning.

:class:`~dcml.algorithm.training.Trainer` runs the loop and calls these;
a method's trainer overrides one or a few of them (``DFMLTrainer``:
``param_groups``, ``train_step``, ``epoch_started``/``epoch_finished``,
``evaluate``), as pytorch-metric-learning's trainers override one hook.
The attributes they use (model, losses, miner, optimizer, scorer, ...) are
set up by ``Trainer.__init__``.
"""

from __future__ import annotations

import contextlib

import numpy as np
import pandas as pd
import torch

from dcml.algorithm import distributed
from dcml.algorithm.training import optimisation
from dcml.algorithm.training.rng import MINER_STREAM, batch_seed
from dcml.contracts.errors import DcmlError


class TrainingHooks:
    def backbone_parameters(self) -> list:
        return [p for p in self.model.backbone.parameters() if p.requires_grad]

    def param_groups(self) -> list[dict]:
        """Optimiser groups (hook): backbone, embedding head, loss parameters."""
        from dcml.algorithm.losses import loss_parameters

        s = self.settings
        groups = []
        backbone = self.backbone_parameters()
        if backbone:
            groups.append({"params": backbone, "lr": s.lr_backbone, "name": "backbone"})
        groups.append({"params": list(self.model.head.parameters()), "lr": s.lr_embedding, "name": "embedding"})
        extra = [p for loss in self.losses for p in loss_parameters(loss)]
        if extra:
            groups.append({"params": extra, "lr": s.loss_lr, "name": "loss"})
        return groups

    def epoch_started(self, epoch: int, entry: dict) -> None:
        """Hook: per-epoch state before the first batch."""

    def epoch_finished(self, epoch: int, entry: dict) -> None:
        """Hook: extra history fields after the last batch."""

    def evaluate(self) -> dict:
        """Test R@1 and MAP@R of the current model on ``eval_rows`` (curves only)."""
        return self.scorer.score(self.model, self.eval_rows, f"test metrics on {len(self.eval_rows)} images")

    def validate(self) -> dict:
        """Validation R@1 and MAP@R (keys prefixed ``val_``)."""
        scores = self.scorer.score(self.model, self.val_rows, f"validation on {len(self.val_rows)} images")
        return {f"val_{k}": v for k, v in scores.items()}

    def vectors(self, rows: pd.DataFrame, kind: str, desc: str) -> np.ndarray:
        """Features or embeddings of ``rows`` with the current model, in eval mode."""
        return self.scorer.vectors(self.model, rows, kind, desc)

    def forward(self, inputs: torch.Tensor, learner: int | None) -> torch.Tensor:
        """The embedding of a training batch: images, or cached activations in the fast mode."""
        if self.activations is not None:
            out = self.model.forward_from_lower(inputs, learner=learner)
        else:
            out = self.model(inputs, learner=learner)
        if learner is None and self.model.num_slices > 1:
            # the whole K-slice embedding (slices normalised one by one) as one unit vector, as the
            # reference code's whole-embedding loss sees it
            out = torch.nn.functional.normalize(out, dim=1)
        return out

    def train_step(self, inputs: torch.Tensor, labels: torch.Tensor, learner: int | None) -> dict:
        """One batch (hook): forward, loss, backward, optimiser step; returns numbers to average.

        ``inputs``: this process's share of the batch (all of it in one
        process); ``labels``: the labels of the whole batch. ``gather`` turns the
        share's embeddings into the whole batch's; ``step`` back-propagates,
        adds up the processes' gradients and steps the optimiser.
        """
        embeddings = self.gather(self.forward(inputs, learner))
        loss_fn = self._loss_for(learner)
        with self.batch_rng():
            pairs = self.miner(embeddings, labels) if self.miner is not None else None
            loss = loss_fn(embeddings, labels, pairs)
        extra = self.regulariser(learner)
        if extra is not None:
            loss = loss + extra
        self.check_finite(loss)
        self.optimizer.zero_grad(set_to_none=True)
        if loss.requires_grad:  # the same on every process: all compute the same loss
            self.step(loss)
        pos, neg = optimisation.mined_counts(pairs)
        return {"loss": float(loss.detach()), "mined_pos_pairs": pos, "mined_neg_pairs": neg,
                "nonzero_terms": optimisation.nonzero_terms(loss_fn) or 0}

    def regulariser(self, learner: int | None) -> torch.Tensor | None:
        """Hook: a term added to the batch's loss (None: nothing)."""
        return None

    def extra_state(self) -> dict:
        """Hook: training state of a subclass that the resume file must keep (tensors and primitives)."""
        return {}

    def load_extra_state(self, state: dict) -> None:
        """Hook: put back what ``extra_state`` returned."""

    def _loss_for(self, learner: int | None):
        return self.losses[-1] if learner is None else self.losses[learner]

    def gather(self, embeddings: torch.Tensor) -> torch.Tensor:
        """The whole batch's embeddings from this process's share (itself in one process)."""
        return distributed.gather_batch(embeddings, self._share_sizes)

    def step(self, loss: torch.Tensor) -> None:
        """Backward, the processes' gradients added up (loss parameters: averaged), optimiser step."""
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.world_size > 1:
            summed = [p for g in self.optimizer.param_groups if g.get("name") != "loss" for p in g["params"]]
            replicated = [p for g in self.optimizer.param_groups if g.get("name") == "loss" for p in g["params"]]
            distributed.all_reduce_gradients(summed, replicated)
        self.optimizer.step()

    @contextlib.contextmanager
    def batch_rng(self):
        """A random miner draws from a seed of (seed, epoch, batch): the same on every process and
        whatever their number (a deterministic miner: nothing changes)."""
        if not self._random_miner:
            yield
            return
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(batch_seed(self.settings.seed, self._epoch_now, self._batch_now, MINER_STREAM))
            yield

    def check_finite(self, loss: torch.Tensor, detail: str = "") -> None:
        if not torch.isfinite(loss):
            s = self.settings
            raise DcmlError(
                f"training loss became {loss.item()} at epoch {self._epoch_now + 1}, batch {self._batch_now + 1}{detail}; "
                f"stopped without writing a model; lower the learning rates (lr_backbone={s.lr_backbone}, "
                f"lr_embedding={s.lr_embedding}) or check the input images")

    def initialise_head(self) -> None:
        """Head from principal components of the training images' backbone features (``head_init="pca"``),
        or their whitening (``"whiten"``: dcml.algorithm.whitening, one slice).

        With K slices and clusters, slice k gets its own cluster's components.
        """
        if not self.is_main:  # rank 0's head reaches every process with the model state (resume.share_start)
            return
        features = self.vectors(self.train_rows, "features", f"head init: features of {len(self.train_rows)} images")
        if self.head_init == "whiten":
            from dcml.algorithm import whitening

            if self.num_learners > 1:
                raise DcmlError(f"head_init=whiten: the model has {self.num_learners} slices; whitening initialises "
                                "one embedding (num_clusters=1, or embedding_slices=false); use head_init=pca for slices")
            whitening.init_head(self.model.head, whitening.fit(features, self.model.embedding_dim,
                                                               whitening.HEAD_SHRINKAGE))
            return
        groups = None
        if self.num_learners > 1 and self.clusters is not None and self.head_init == "pca":
            groups = [np.flatnonzero(self.clusters == k) for k in range(self.num_learners)]
        self.model.init_head_from_features(features, groups, deal="round-robin" if self.head_init == "pca-shared"
                                           else "runs")
        if self.only_learner is not None:  # worker: only its own slice may change
            with torch.no_grad():
                self.model.head.weight[self._keep_rows] = self._kept_weight
                self.model.head.bias[self._keep_rows] = self._kept_bias
