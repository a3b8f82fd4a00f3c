"""PCA-whitening of the pretrained features: a no-training candidate and a head to start training from.

The backbone's pooled features are dominated by a few directions of large
variance that say little about fine-grained identity; projecting onto the
top principal components and rescaling each by the inverse square root of
its (shrunk) variance lets the rest count. Fitted on the training images
only (no labels), it is a linear map ``W x + b`` -- exactly an embedding
head -- so the candidate is a plain dcml model (the pretrained backbone, the
head ``W``, ``b``) that every later stage takes as any other model.

Shrinkage ``a`` in [0, 1] blends each component's variance with the mean
variance of all of them (Ledoit-Wolf style): ``scale_i = 1 / sqrt((1 - a)
lambda_i + a mean(lambda))``. ``a = 0`` is full whitening (every kept
direction unit variance), ``a = 1`` is plain PCA (the embedding is
L2-normalised, so a common scale does not matter). Width and shrinkage are
chosen on the validation classes (:func:`choose`); the grid is :data:`WIDTHS`
x :data:`SHRINKAGES`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from dcml.contracts.errors import DcmlError

WIDTHS = (128, 256, 512, 1024)
SHRINKAGES = (0.1, 0.25, 0.5, 1.0)
CV_FOLDS = 3  # class folds of the cross-validated raw -> whitened choice (measured: BENCHMARKS, small data)
HEAD_SHRINKAGE = 0.25  # head_init=whiten (a training start, not chosen on validation)


@dataclass(frozen=True)
class Whitening:
    """``W`` [width, D] and ``b`` [width]: the embedding is ``normalize(W x + b)``."""

    weight: np.ndarray
    bias: np.ndarray
    shrinkage: float

    @property
    def width(self) -> int:
        return int(self.weight.shape[0])

    def apply(self, features: np.ndarray) -> np.ndarray:
        """L2-normalised whitened vectors of ``features`` [N, D]."""
        y = np.asarray(features, dtype=np.float64) @ self.weight.T + self.bias
        return (y / np.maximum(np.linalg.norm(y, axis=1, keepdims=True), 1e-12)).astype(np.float32)


class Spectrum:
    """One SVD of the (centred) training features, from which every width and shrinkage is cut."""

    def __init__(self, features: np.ndarray):
        x = np.asarray(features, dtype=np.float64)
        if x.ndim != 2 or len(x) < 3:
            raise DcmlError(f"whitening: needs at least 3 training feature vectors, got shape {list(x.shape)}")
        self.mean = x.mean(axis=0)
        _, s, vh = np.linalg.svd(x - self.mean, full_matrices=False)
        self.variances = s ** 2 / (len(x) - 1)
        self.dim = x.shape[1]
        # Components beyond the data's rank carry no variance: never keep them.
        self.rank = int((self.variances > self.variances[0] * 1e-10).sum())
        self.components = vh[:self.rank]
        self.variances = self.variances[:self.rank]

    def width(self, wanted: int) -> int:
        return max(1, min(int(wanted), self.rank))

    def whitening(self, width: int, shrinkage: float) -> Whitening:
        if not 0.0 <= float(shrinkage) <= 1.0:
            raise DcmlError(f"whitening: shrinkage={shrinkage} must be in [0, 1]")
        k = self.width(width)
        mean_variance = float(self.variances.sum() / self.dim)
        scale = 1.0 / np.sqrt((1.0 - shrinkage) * self.variances[:k] + shrinkage * mean_variance)
        weight = self.components[:k] * scale[:, None]
        return Whitening(weight=weight, bias=-(weight @ self.mean), shrinkage=float(shrinkage))


def fit(features: np.ndarray, width: int = 512, shrinkage: float = 0.25) -> Whitening:
    """The whitening of ``features`` (training images' pooled features) at one setting."""
    return Spectrum(features).whitening(width, shrinkage)


def grid(spectrum: Spectrum, widths=WIDTHS, shrinkages=SHRINKAGES) -> list[Whitening]:
    """Every (width, shrinkage) setting, widths capped at the data's rank (duplicates dropped)."""
    seen, out = set(), []
    for width in widths:
        k = spectrum.width(width)
        for a in shrinkages:
            if (k, a) not in seen:
                seen.add((k, a))
                out.append(spectrum.whitening(k, a))
    return out


def choose(train_features: np.ndarray, val_features: np.ndarray, score, widths=WIDTHS,
           shrinkages=SHRINKAGES) -> tuple[Whitening, float, list[dict]]:
    """The setting whose whitened validation vectors score best (``score(vectors) -> float``;
    ties keep the earlier, narrower one), its score, and every setting's score."""
    spectrum = Spectrum(train_features)
    best, best_score, table = None, -np.inf, []
    for w in grid(spectrum, widths, shrinkages):
        value = float(score(w.apply(val_features)))
        table.append({"width": w.width, "shrinkage": w.shrinkage, "score": value})
        if value > best_score:
            best, best_score = w, value
    return best, best_score, table


def init_head(head: torch.nn.Linear, w: Whitening) -> None:
    """Put ``w`` into ``head`` (its first ``w.width`` rows when the head is wider; the rest stay as they are)."""
    if head.in_features != w.weight.shape[1]:
        raise DcmlError(f"whitening: head takes {head.in_features}-d features, the whitening {w.weight.shape[1]}-d")
    n = min(head.out_features, w.width)
    # One common scale (the embedding is normalised, so it changes nothing) that makes the rows unit
    # vectors on average, as the PCA head's are: the optimiser's steps keep the size they have there.
    scale = float(np.linalg.norm(w.weight[:n], axis=1).mean())
    with torch.no_grad():
        head.weight[:n] = torch.as_tensor(w.weight[:n] / scale, dtype=head.weight.dtype)
        head.bias[:n] = torch.as_tensor(w.bias[:n] / scale, dtype=head.bias.dtype)


def class_folds(labels: np.ndarray, folds: int = 5) -> list[np.ndarray]:
    """Row indices of ``folds`` groups of whole classes (classes dealt round-robin in sorted order);
    fewer groups when there are fewer than 2 classes per group."""
    classes = np.unique(labels)
    k = max(1, min(int(folds), len(classes) // 2))
    return [np.flatnonzero(np.isin(labels, classes[i::k])) for i in range(k)]


def cross_validate(features: np.ndarray, labels: np.ndarray, metric: str = "recall@1", folds: int = 5,
                   widths=WIDTHS, shrinkages=SHRINKAGES):
    """Raw against whitened features, scored over every labelled class instead of a few validation ones.

    Whitening needs no labels, so every labelled image can score it: the classes are split into
    ``folds`` groups, each group is whitened with the setting fitted on the *other* groups' images
    and retrieved among itself. Returns (raw per-query scores, the best setting fitted on all
    ``features``, its per-query scores, every setting's mean) -- the per-query scores of both
    cover every class, so their comparison (dcml.algorithm.choice) has all the classes' evidence.
    """
    from dcml.algorithm.choice import PerQuery, per_query

    labels = np.asarray(labels)
    groups = class_folds(labels, folds)
    if len(groups) < 2:
        raise DcmlError(f"whitening: cross-validation needs at least 4 labelled classes, got {len(np.unique(labels))}")
    raw = [per_query("raw", _unit(features[g]), labels[g], metric) for g in groups]
    per_setting: dict[tuple[int, float], list] = {}
    for g in groups:
        spectrum = Spectrum(features[np.setdiff1d(np.arange(len(labels)), g)])
        for width in widths:
            for a in shrinkages:  # keyed by the width asked for: each fold caps it at its own data's rank
                per_setting.setdefault((int(width), float(a)), []).append(
                    per_query("whitened", spectrum.whitening(width, a).apply(features[g]), labels[g], metric))
    join = lambda name, parts: PerQuery(name, np.concatenate([p.values for p in parts]),  # noqa: E731
                                        np.concatenate([p.classes for p in parts]))
    table = [{"width": w, "shrinkage": a, "score": join("w", parts).mean} for (w, a), parts in per_setting.items()]
    best = max(table, key=lambda t: t["score"])  # the first of the ties: narrower, less shrunk
    chosen = Spectrum(features).whitening(best["width"], best["shrinkage"])
    return join("raw", raw), chosen, join("whitened", per_setting[(best["width"], best["shrinkage"])]), table


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
