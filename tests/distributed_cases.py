"""Trainer runs the data-parallel tests start in torchrun processes (dcml.launch targets).

Not a test module: tests/test_distributed.py calls ``dcml.launch.run_processes("tests.distributed_cases:fit", ...)``.
"""

from __future__ import annotations

import torch

from dcml import stagekit
from dcml.algorithm.models import build_model
from dcml.algorithm.training import Trainer, TrainSettings, seed_everything
from dcml.contracts import manifest as manifest_mod
from dcml.contracts.errors import DcmlError


def settings(**overrides) -> TrainSettings:
    base = dict(epochs=3, classes_per_batch=4, images_per_class=4, lr_backbone=1e-3, lr_embedding=1e-3,
                miner="none", recluster_every=1, kmeans_niter=10, eval_every=0, seed=3)
    return TrainSettings(**{**base, **overrides})


def fit(manifest, resume_path, out, crash_after=None, settings_overrides=None, dropout=0.0):
    """Shared mode, K=2, re-clustering every epoch; rank 0 saves the final state_dict to ``out``.

    ``crash_after``: every process stops with an error once that many epochs are done
    (their resume checkpoint is written by then), as a run killed there would.
    """
    man = manifest_mod.read(manifest)
    train = man.split("train")
    seed_everything(3)
    model = build_model({"backbone": "small_cnn", "weights": "none", "embedding_dim": 16, "num_slices": 2,
                         "freeze_bn": True, "dropout": dropout})

    def crash(trainer, entry):
        if crash_after is not None and trainer.epoch == crash_after:
            raise DcmlError(f"stopped after epoch {crash_after}")

    with stagekit.processes("cpu") as device:
        trainer = Trainer(model, man, train, settings(**(settings_overrides or {})), resume_path=resume_path,
                          device=device)
        trainer.fit(callbacks=[crash])
        if stagekit.is_main():
            torch.save(model.state_dict(), out)
    return {"epoch": trainer.epoch, "resumed_from": trainer.resumed_from,
            "clusters": trainer.clusters.tolist(), "world_size": trainer.world_size}
