"""The epoch kept: the best validation score so far (the initial model counts as epoch 0), the
end-of-epoch scoring that feeds it, and early stopping after ``patience`` epochs without a better one."""

from __future__ import annotations

import time


class EpochSelector:
    """Keeps the weights of the best validated epoch; ties keep the earlier one."""

    def __init__(self, select_on: str, patience: int = 0):
        self.key = f"val_{select_on}"
        self.patience = int(patience)
        self.best: dict | None = None  # {"epoch", "score", "state", "num_slices"}

    @property
    def best_epoch(self) -> int | None:
        return None if self.best is None else int(self.best["epoch"])

    def consider(self, epoch: int, scores: dict, model) -> None:
        """Keep ``model``'s weights when ``scores`` beat the best so far."""
        score = scores[self.key]
        if self.best is None or score > self.best["score"]:
            self.best = {"epoch": epoch, "score": score, "num_slices": int(model.num_slices),
                         "state": {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}}

    def out_of_patience(self, epochs_done: int) -> bool:
        return bool(self.patience) and epochs_done - self.best_epoch >= self.patience

    def restore(self, model) -> None:
        """Put the best validated weights back in ``model``."""
        if self.best is None:
            return
        if self.best["num_slices"] != model.num_slices:
            model.set_num_slices(self.best["num_slices"])
        model.load_state_dict(self.best["state"])

    def state(self) -> dict | None:
        if self.best is None:
            return None
        return {"epoch": int(self.best["epoch"]), "score": float(self.best["score"]),
                "num_slices": int(self.best["num_slices"]), "state": self.best["state"]}


def after_epoch(trainer, epoch: int, entry: dict) -> None:
    """The end of an epoch: rank 0 validates (the epoch kept, stopping early) and scores the test curve;
    every process learns whether training stops."""
    from dcml.algorithm import distributed

    s = trainer.settings
    if not trainer.is_main:
        trainer.stopped_early = distributed.broadcast_object(None)
        return
    if trainer.val_rows is not None:
        t1 = time.perf_counter()
        entry.update(trainer.validate())
        entry["val_s"] = round(time.perf_counter() - t1, 3)
        trainer.selector.consider(epoch + 1, entry, trainer.model)
        entry["best_epoch"] = trainer.best_epoch
        if trainer.selector.out_of_patience(epoch + 1):
            trainer.stopped_early = True
            entry["stopped_early"] = True
    if s.eval_every and trainer.eval_rows is not None and (
            (epoch + 1) % s.eval_every == 0 or epoch + 1 == s.epochs or trainer.stopped_early):
        t1 = time.perf_counter()
        entry.update(trainer.evaluate())
        entry["eval_s"] = round(time.perf_counter() - t1, 3)
    if trainer.world_size > 1:
        distributed.broadcast_object(trainer.stopped_early)
