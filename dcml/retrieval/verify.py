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
(all pairs of the sample); the index folder keeps that sample's embeddings
(``index_lib.VALIDATION_FILE``), so the threshold can be chosen again at
another rate without embedding anything.

What a threshold means travels with every decision (:func:`decision`: the
threshold and the false- and true-match rates measured when it was chosen),
and :func:`advice` says in one line when the choice is poor: fewer than
:data:`LOW_TRUE_MATCH_RATE` of the true pairs accepted, or fewer than
:data:`PAIRS_PER_FALSE_MATCH` / rate impostor pairs to measure the rate on.
"""

from __future__ import annotations

import numpy as np

from dcml.contracts.errors import DcmlError

DEFAULT_FALSE_MATCH_RATE = 0.01
TABLE_RATES = (0.0001, 0.001, 0.01, 0.05, 0.1)
MAX_IMAGES = 4000
LOW_TRUE_MATCH_RATE = 0.10  # below it, `dcml index` warns that most true pairs are rejected
PAIRS_PER_FALSE_MATCH = 10  # a rate f is measured on at least this many / f impostor pairs (10 false matches)


def check_rate(rate: float, name: str = "--false-match-rate") -> float:
    rate = float(rate)
    if not 0.0 < rate < 1.0:
        raise DcmlError(f"{name} {rate:g}: must be in (0, 1), e.g. 0.01 for 1 %")
    return rate


def pair_scores(vectors: np.ndarray, labels, seed: int = 0, max_images: int = MAX_IMAGES
                ) -> tuple[np.ndarray, np.ndarray]:
    """(genuine scores, impostor scores) over every pair of (a sample of) the normalised ``vectors``."""
    vectors, labels = sample(vectors, labels, seed, max_images)
    upper = np.triu_indices(len(vectors), k=1)
    scores = (vectors @ vectors.T)[upper]
    same = (labels[:, None] == labels[None, :])[upper]
    return scores[same], scores[~same]


def sample(vectors: np.ndarray, labels, seed: int = 0, max_images: int = MAX_IMAGES
           ) -> tuple[np.ndarray, np.ndarray]:
    """(vectors, labels) of the images whose pairs are scored: all of them, or a seeded sample of ``max_images``."""
    vectors = np.asarray(vectors, dtype=np.float32)
    labels = np.asarray(labels)
    if len(vectors) > max_images:
        keep = np.sort(np.random.default_rng(seed).choice(len(vectors), size=max_images, replace=False))
        vectors, labels = vectors[keep], labels[keep]
    return vectors, labels


def threshold_at(impostor: np.ndarray, rate: float) -> float:
    """The smallest score that at most ``rate`` of the ``impostor`` scores reach (>=).

    "Just above" is taken in the scores' own precision: search scores are float32, and a float64 step above
    a float32 score rounds back onto it when compared, letting that impostor through."""
    ranked = np.sort(np.asarray(impostor))[::-1]
    if not np.issubdtype(ranked.dtype, np.floating):
        ranked = ranked.astype(np.float64)
    allowed = int(np.floor(rate * len(ranked)))  # impostor pairs that may reach the threshold
    if allowed >= len(ranked):
        return float(ranked[-1])
    return float(np.nextafter(ranked[allowed], ranked.dtype.type(np.inf)))  # above the first impostor that may not


def choose(vectors: np.ndarray, labels, false_match_rate: float = DEFAULT_FALSE_MATCH_RATE, seed: int = 0,
           source: str = "validation split") -> dict:
    """The ``verification`` entry of an index: threshold, requested and measured rates, and the table."""
    rate = check_rate(false_match_rate)
    genuine, impostor = pair_scores(vectors, labels, seed)
    if len(genuine) == 0 or len(impostor) == 0:
        raise DcmlError(f"{source}: needs at least 2 classes with 2 or more images each to choose a match "
                        "threshold; use a larger validation split")
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


def decision(entry: dict | None) -> dict | None:
    """What a hit's ``match`` means, for every search answer: the threshold, the false- and true-match rates
    measured on the pairs it was chosen on, the rate asked for, the pair counts and where they came from
    (None when the index has no threshold)."""
    if not entry:
        return None
    return {"threshold": entry["threshold"], "false_match_rate": entry["measured_false_match_rate"],
            "true_match_rate": entry["true_match_rate"], "asked_false_match_rate": entry["false_match_rate"],
            "genuine_pairs": entry["genuine_pairs"], "impostor_pairs": entry["impostor_pairs"],
            "source": entry["source"]}


def describe(rule: dict) -> str:
    """A :func:`decision` in words: ``match = score >= 0.8052 (false-match rate 0.0100, ...)``."""
    return (f"match = score >= {rule['threshold']:.4f} (false-match rate {rule['false_match_rate']:.4f}, "
            f"true-match rate {rule['true_match_rate']:.3f}, measured on {rule['impostor_pairs']:,} impostor and "
            f"{rule['genuine_pairs']:,} genuine pairs of {rule['source']})")


def advice(entry: dict | None, index_dir=None) -> str | None:
    """One line when a chosen threshold is a poor one, saying what to do; None when it is fine.

    Poor: fewer impostor pairs than :data:`PAIRS_PER_FALSE_MATCH` / rate (the rate asked for cannot be
    measured: the threshold sits on the few highest impostor scores), or a true-match rate under
    :data:`LOW_TRUE_MATCH_RATE` (most pairs of one item are rejected).
    """
    if not entry:
        return None
    rate, pairs = entry["false_match_rate"], entry["impostor_pairs"]
    command = f"dcml threshold --index {index_dir or 'INDEX'} --false-match-rate"
    problems = []
    needed = int(np.ceil(PAIRS_PER_FALSE_MATCH / rate))
    if pairs < needed:
        floor = PAIRS_PER_FALSE_MATCH / pairs
        problems.append(f"only {pairs:,} impostor pairs on {entry['source']}: a false-match rate of {rate:g} needs "
                        f"{needed:,} to be measured; add validation classes or ask for {_round_up(floor):g} or more "
                        f"(`{command} {_round_up(floor):g}`)")
    if entry["true_match_rate"] < LOW_TRUE_MATCH_RATE:
        better = [r for r in entry.get("table", []) if r["false_match_rate"] > rate
                  and r["true_match_rate"] >= LOW_TRUE_MATCH_RATE]
        fix = (f"a false-match rate of {better[0]['false_match_rate']:g} accepts "
               f"{100 * better[0]['true_match_rate']:.0f} % (`{command} {better[0]['false_match_rate']:g}`)"
               if better else f"no rate up to {max(TABLE_RATES):g} accepts 10 %: train the model longer or on "
               "more data")
        problems.append(f"the threshold {entry['threshold']:.4f} accepts only {100 * entry['true_match_rate']:.1f} % "
                        f"of true pairs at a false-match rate of {rate:g}; {fix}")
    return "; and ".join(problems) or None


def _round_up(rate: float) -> float:
    """``rate`` rounded up to one significant digit (0.0163 -> 0.02), at most 0.5."""
    exponent = np.floor(np.log10(rate) + 1e-9)
    return min(0.5, float(f"{np.ceil(rate / 10 ** exponent - 1e-9) * 10 ** exponent:.1g}"))
