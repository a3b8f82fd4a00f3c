"""Match decisions: the score threshold for "same item or not", chosen at a false-match rate.

Given labelled, L2-normalised embeddings of held-out images (the validation
split: classes the model did not train on and the test never sees), every
pair of images is scored (cosine, as search scores hits). Pairs of one class
are *genuine*, pairs of two classes *impostor*. The threshold for a requested
false-match rate ``f`` is the smallest score that at most ``f`` of the
impostor pairs reach; a hit is a match when ``score >= threshold``. The
true-match rate at that threshold (genuine pairs reaching it) says what the
choice costs. ``threshold_table`` gives the same at several rates (the ROC's
points) for MLflow and the index's ``index.json``.

With more than :data:`MAX_IMAGES` images a seeded sample of them is scored
(all pairs of the sample).
"""

from __future__ import annotations

import numpy as np

from dcml.contracts.errors import DcmlError

DEFAULT_FALSE_MATCH_RATE = 0.01
TABLE_RATES = (0.0001, 0.001, 0.01, 0.05, 0.1)
MAX_IMAGES = 4000


def check_rate(rate: float, name: str = "--false-match-rate") -> float:
    rate = float(rate)
    if not 0.0 < rate < 1.0:
        raise DcmlError(f"{name} {rate:g}: must be in (0, 1), e.g. 0.01 for 1 %")
    return rate


def pair_scores(vectors: np.ndarray, labels, seed: int = 0, max_images: int = MAX_IMAGES
                ) -> tuple[np.ndarray, np.ndarray]:
    """(genuine scores, impostor scores) over every pair of (a sample of) the normalised ``vectors``."""
    vectors = np.asarray(vectors, dtype=np.float32)
    labels = np.asarray(labels)
    if len(vectors) > max_images:
        keep = np.sort(np.random.default_rng(seed).choice(len(vectors), size=max_images, replace=False))
        vectors, labels = vectors[keep], labels[keep]
    upper = np.triu_indices(len(vectors), k=1)
    scores = (vectors @ vectors.T)[upper]
    same = (labels[:, None] == labels[None, :])[upper]
    return scores[same], scores[~same]


def threshold_at(impostor: np.ndarray, rate: float) -> float:
    """The smallest score that at most ``rate`` of the ``impostor`` scores reach (>=)."""
    ranked = np.sort(np.asarray(impostor, dtype=np.float64))[::-1]
    allowed = int(np.floor(rate * len(ranked)))  # impostor pairs that may reach the threshold
    if allowed >= len(ranked):
        return float(ranked[-1])
    return float(np.nextafter(ranked[allowed], np.inf))  # just above the first impostor that may not


def choose(vectors: np.ndarray, labels, false_match_rate: float = DEFAULT_FALSE_MATCH_RATE, seed: int = 0,
           source: str = "validation split") -> dict:
    """The ``verification`` entry of an index: threshold, requested and measured rates, and the table."""
    rate = check_rate(false_match_rate)
    genuine, impostor = pair_scores(vectors, labels, seed)
    if len(genuine) == 0 or len(impostor) == 0:
        raise DcmlError(f"{source}: needs at least 2 classes with 2 or more images each to choose a match "
                        "threshold; use a larger validation split")
    minimum = int(np.ceil(1.0 / rate))
    if len(impostor) < minimum:
        raise DcmlError(f"{source}: {len(impostor)} impostor pairs cannot measure a false-match rate of {rate:g} "
                        f"(needs {minimum}); use more validation images or a larger rate")
    table = threshold_table(genuine, impostor, sorted(set(TABLE_RATES) | {rate}))
    row = next(r for r in table if r["false_match_rate"] == rate)
    return {"threshold": row["threshold"], "false_match_rate": rate,
            "measured_false_match_rate": row["measured_false_match_rate"],
            "true_match_rate": row["true_match_rate"], "genuine_pairs": int(len(genuine)),
            "impostor_pairs": int(len(impostor)), "source": source, "table": table}


def threshold_table(genuine: np.ndarray, impostor: np.ndarray, rates) -> list[dict]:
    """One row per requested false-match rate: threshold, measured false- and true-match rates."""
    rows = []
    for rate in rates:
        t = threshold_at(impostor, rate)
        rows.append({"false_match_rate": float(rate), "threshold": t,
                     "measured_false_match_rate": float(np.mean(impostor >= t)),
                     "true_match_rate": float(np.mean(genuine >= t))})
    return rows


def match_rates(vectors: np.ndarray, labels, threshold: float, seed: int = 0) -> dict:
    """Measured false- and true-match rates of ``threshold`` on the pairs of other labelled images."""
    genuine, impostor = pair_scores(vectors, labels, seed)
    return {"false_match_rate": float(np.mean(impostor >= threshold)),
            "true_match_rate": float(np.mean(genuine >= threshold)),
            "genuine_pairs": int(len(genuine)), "impostor_pairs": int(len(impostor))}
