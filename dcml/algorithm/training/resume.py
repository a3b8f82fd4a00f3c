"""Resume files: what a training's state after an epoch is, its fingerprint, and the file on disk.

After every epoch rank 0 writes the state atomically (model, optimiser, loss
parameters, groups, history, the best epoch, every process's RNG state), all
as tensors and primitives so ``torch.load(weights_only=True)`` reads it. A
run killed at any moment restarts from the last finished epoch and ends with
exactly the weights an uninterrupted run ends with. The fingerprint (settings,
model config and initial weights, data, groups, anything extra) tells a
resume file of this run from one of another.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import warnings
from pathlib import Path

import torch

from dcml.algorithm import distributed
from dcml.algorithm.training import resume_lock
from dcml.algorithm.training.rng import rng_state, set_rng_state
from dcml.contracts import checkpoint
from dcml.contracts.errors import DcmlError


def fingerprint(trainer, extra) -> str:
    """What makes a training run this one: a resume file of another is not used."""
    h = hashlib.sha256()
    h.update(json.dumps(dataclasses.asdict(trainer.settings), sort_keys=True, default=str).encode())
    h.update(json.dumps(trainer.model.config, sort_keys=True).encode())
    h.update(json.dumps([trainer.only_learner, extra, trainer.head_init], sort_keys=True, default=str).encode())
    h.update("\0".join(trainer.train_rows["image_id"].astype(str)).encode())
    h.update(trainer.labels.tobytes())
    if trainer.val_rows is not None:
        h.update("\0".join(trainer.val_rows["image_id"].astype(str)).encode())
    if trainer.activations is not None:
        meta = trainer.activations.meta
        h.update(json.dumps({k: meta.get(k) for k in ("views", "seed", "shape", "manifest_fingerprint")},
                            sort_keys=True).encode())
    if trainer.clusters is not None:
        h.update(trainer.clusters.tobytes())
    for key, tensor in trainer.model.state_dict().items():
        h.update(key.encode())
        h.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def snapshot(trainer) -> dict:
    """The resume checkpoint after ``trainer.epoch`` finished epochs."""
    return {
        "format": checkpoint.FORMAT,
        "model_config": dict(trainer.model.config),
        "model": trainer.model.state_dict(),
        "record": json.dumps({"stage": "train", "resume": True}),
        "optimizer": trainer.optimizer.state_dict(),
        "losses": trainer.losses.state_dict(),
        "epoch": trainer.epoch,
        "num_slices": int(trainer.model.num_slices),
        "cluster_state": trainer.cluster_state(),
        "sampler_state": {"epoch": trainer.epoch, "position": 0},
        "rng": rng_state(),
        "history": json.dumps(trainer.history),
        "best": trainer.selector.state(),
        "stopped_early": bool(trainer.stopped_early),
        "initial": json.dumps(trainer.initial),
        "fingerprint": trainer.fingerprint,
        "extra": trainer.extra_state(),
    }


def restore(trainer, state: dict) -> None:
    """Put a resume checkpoint's state into ``trainer`` (this process's RNG state included)."""
    if state["num_slices"] != trainer.model.num_slices:
        trainer.model.set_num_slices(state["num_slices"])
    trainer.model.load_state_dict(state["model"])
    trainer.optimizer.load_state_dict(state["optimizer"])
    trainer.losses.load_state_dict(state["losses"])
    trainer.grouping.load(state["cluster_state"])
    trainer.epoch = int(state["epoch"])
    trainer.history = json.loads(state["history"])
    trainer.selector.best = state.get("best")
    trainer.stopped_early = bool(state.get("stopped_early", False))
    trainer.initial = json.loads(state.get("initial", "{}"))
    trainer.load_extra_state(state.get("extra") or {})
    by_rank = state.get("rng_by_rank")
    if by_rank and len(by_rank) == trainer.world_size:
        set_rng_state(by_rank[trainer.rank])
    else:  # another number of processes than the run that wrote it: rank 0's stream
        set_rng_state(state["rng"])
    trainer.resumed_from = trainer.epoch


def share_start(trainer) -> None:
    """Data parallel: every process starts from rank 0's state (its model and head init, its clusters)."""
    if trainer.world_size == 1:
        return
    distributed.broadcast_tensors(list(trainer.model.state_dict().values())
                                  + list(trainer.losses.state_dict().values()))
    g = trainer.grouping
    g.clusters, g.clustered_at = distributed.broadcast_object((g.clusters, g.clustered_at))


class ResumeStore:
    """The resume file of one training (None: no resume), shared by its data-parallel processes."""

    def __init__(self, path: Path | None, rank: int = 0, world_size: int = 1):
        self.path, self.rank, self.world_size = path, rank, world_size

    @contextlib.contextmanager
    def lock(self):
        """Hold the resume file for this process; if another live process holds it
        (the same training running twice at once), use a private one instead (resume_lock)."""
        if self.path is None:
            yield
            return
        if self.rank:  # rank 0 holds the lock and says which file the run uses
            self.path = Path(distributed.broadcast_object(None))
            yield
            return
        with resume_lock.hold(self.path) as self.path:  # the lock file goes with it
            distributed.broadcast_object(str(self.path))
            yield

    def save(self, make_state) -> None:
        """Rank 0 writes ``make_state()`` (atomically), with every process's RNG state."""
        if self.path is None:
            return
        rngs = distributed.all_gather_object(rng_state()) if self.world_size > 1 else None
        if self.rank == 0:
            state = make_state()
            if rngs is not None:
                state["rng_by_rank"] = rngs
            checkpoint.save(self.path, state)

    def _readable(self, fingerprint: str) -> dict | None:
        """The resume checkpoint of this run, or None (missing, unreadable, other settings)."""
        if self.path is None or not self.path.exists():
            return None
        try:
            state = checkpoint.load(self.path)  # CPU: RNG states must stay there
        except DcmlError as exc:
            warnings.warn(f"ignoring unreadable resume file ({exc}); starting afresh", stacklevel=3)
            return None
        if state.get("fingerprint") != fingerprint:
            warnings.warn(f"{self.path}: written by a run with other inputs or settings; starting afresh", stacklevel=3)
            return None
        return state

    def read(self, fingerprint: str) -> dict | None:
        """This run's resume state for this process, or None. Data parallel: rank 0 decides; every
        process then reads the same file (on a node's disk, or a volume all nodes mount)."""
        state = self._readable(fingerprint) if self.rank == 0 else None
        if self.world_size > 1 and not distributed.broadcast_object(state is not None):
            return None
        if self.world_size > 1 and self.rank:
            if not self.path.exists():
                raise DcmlError(f"{self.path}: rank 0 resumes from this file but process {self.rank} cannot see it; "
                                "put the resume folder on a volume every node mounts (DCML_RESUME_ROOT or --work-dir)")
            state = checkpoint.load(self.path)
        return state
