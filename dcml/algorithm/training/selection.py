"""The epoch kept: the best validation score so far (the initial model counts as epoch 0), and
early stopping after ``patience`` epochs without a better one."""

from __future__ import annotations


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
