"""The delivered model, chosen on validation classes with their noise in view.

A handful of validation classes cannot separate two models a couple of
points apart: which classes happen to be held out moves R@1 by more than
that. So the candidates are compared the way the uncertainty arises, over
classes: a paired bootstrap resamples the validation *classes* (all their
queries with them) and recomputes the difference of the two candidates'
scores on the same draw. A challenger replaces the incumbent only when it is
ahead in at least ``confidence`` of the draws; otherwise the incumbent stays,
and the record says the split could not decide.

The candidates form a ladder from the safest: the pretrained features as
they are (``raw``), their whitening (dcml.algorithm.whitening), then the
trained model. Each step up must win beyond the noise (:func:`ladder`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dcml.contracts.errors import DcmlError

ROUNDS = 2000
CONFIDENCE = 0.8  # the share of class draws a challenger must lead in (measured against 0.75-0.95: BENCHMARKS, small data)


@dataclass(frozen=True)
class PerQuery:
    """One candidate's score of every scored validation query (``values``) and the query's class."""

    name: str
    values: np.ndarray
    classes: np.ndarray

    @property
    def mean(self) -> float:
        return float(self.values.mean())


def per_query(name: str, vectors: np.ndarray, labels: np.ndarray, metric: str = "recall@1") -> PerQuery:
    """Each validation query's ``metric`` (``recall@1`` hit or ``map@r``), each row against the rest."""
    from dcml.algorithm.metrics import evaluate_embeddings

    labels = np.asarray(labels)
    details = {"per_query": True}
    evaluate_embeddings(np.asarray(vectors, dtype=np.float32), labels, ks=(1,), include=("recall", "map@r"),
                        details=details, gpu=False)
    found = details["per_query"]
    scored = found["scored"]
    return PerQuery(name, np.asarray(found[metric])[scored], labels[scored])


@dataclass(frozen=True)
class Comparison:
    """challenger - incumbent on the validation split: the observed difference, a ``confidence``
    interval over class draws, and the shares of draws the challenger leads and trails (a draw of
    classes on which both score the same is neither: with two classes, a gain on one of them
    alone never leads in more than 3 of 4 draws)."""

    incumbent: str
    challenger: str
    difference: float
    low: float
    high: float
    lead_share: float
    trail_share: float
    classes: int
    queries: int
    confidence: float

    @property
    def challenger_wins(self) -> bool:
        return self.lead_share >= self.confidence

    @property
    def decisive(self) -> bool:
        """The split tells the two apart in one direction or the other (at the rule's confidence)."""
        return self.challenger_wins or self.trail_share >= self.confidence

    def as_dict(self) -> dict:
        return {"incumbent": self.incumbent, "challenger": self.challenger, "difference": self.difference,
                "low": self.low, "high": self.high, "lead_share": self.lead_share, "trail_share": self.trail_share,
                "classes": self.classes,
                "queries": self.queries, "confidence": self.confidence, "challenger_wins": self.challenger_wins}


def compare(incumbent: PerQuery, challenger: PerQuery, *, confidence: float = CONFIDENCE, rounds: int = ROUNDS,
            seed: int = 0) -> Comparison:
    """Paired bootstrap over validation classes of ``challenger - incumbent``."""
    if not np.array_equal(incumbent.classes, challenger.classes):
        raise DcmlError("choice: the candidates were scored on different validation queries; score both on the same rows")
    if not 0.5 <= confidence < 1:
        raise DcmlError(f"choice: confidence={confidence} must be in [0.5, 1)")
    names, codes = np.unique(incumbent.classes, return_inverse=True)
    c = len(names)
    diff = challenger.values - incumbent.values
    sums = np.bincount(codes, weights=diff, minlength=c)
    counts = np.bincount(codes, minlength=c).astype(np.float64)
    rng = np.random.default_rng([int(seed), 2019])
    draws = rng.multinomial(c, np.full(c, 1.0 / c), size=int(rounds)).astype(np.float64)
    boot = (draws @ sums) / np.maximum(draws @ counts, 1.0)
    tail = (1.0 - confidence) / 2
    low, high = np.quantile(boot, [tail, 1.0 - tail])
    return Comparison(incumbent.name, challenger.name, float(diff.mean()), float(low), float(high),
                      float(np.mean(boot > 0)), float(np.mean(boot < 0)), c, int(len(diff)), float(confidence))


def ladder(candidates: list[PerQuery], **options) -> tuple[str, list[Comparison]]:
    """Walk the candidates from the safest; each one replaces the current choice only when it wins
    beyond the noise. Returns the chosen name and every comparison made."""
    if not candidates:
        raise DcmlError("choice: no candidate to choose from")
    current, steps = candidates[0], []
    for challenger in candidates[1:]:
        step = compare(current, challenger, **options)
        steps.append(step)
        if step.challenger_wins:
            current = challenger
    return current.name, steps


def argmax(candidates: list[PerQuery]) -> str:
    """The rule without noise: the highest validation mean (ties keep the earlier, safer candidate)."""
    best = candidates[0]
    for c in candidates[1:]:
        if c.mean > best.mean:
            best = c
    return best.name
