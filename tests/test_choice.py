"""The noise-aware choice of the delivered model (dcml.algorithm.choice), on constructed validation splits."""

import numpy as np
import pytest

from dcml.algorithm import baseline, choice
from dcml.contracts.errors import DcmlError


def scores(name, per_class: dict[int, list[float]]) -> choice.PerQuery:
    classes = np.concatenate([[c] * len(v) for c, v in per_class.items()])
    return choice.PerQuery(name, np.concatenate([np.asarray(v, float) for v in per_class.values()]), classes)


def hits(rng, classes: int, per_class: int, rate: float) -> dict[int, list[float]]:
    return {c: list((rng.random(per_class) < rate).astype(float)) for c in range(classes)}


def test_two_validation_classes_cannot_decide_a_small_gain():
    """2 classes, the trained model ahead by 2 points: not beyond the noise, the candidate stays, with the warning."""
    rng = np.random.default_rng(0)
    candidate = scores(baseline.WHITENED, hits(rng, 2, 25, 0.45))
    trained_values = candidate.values.copy()
    trained_values[[0]] = 1.0 - trained_values[[0]]  # one query flips: +2 points
    trained = choice.PerQuery(baseline.TRAINED, trained_values, candidate.classes)
    step = choice.compare(candidate, trained)
    assert step.difference == pytest.approx(0.02 if candidate.values[0] == 0 else -0.02)
    assert not step.challenger_wins and not step.decisive and step.classes == 2 and step.queries == 50
    assert step.lead_share == pytest.approx(0.75, abs=0.04)  # 1 draw in 4 holds the other class alone: a tie
    name, steps = choice.ladder([scores(baseline.PRETRAINED, hits(rng, 2, 25, 0.44)), candidate, trained])
    assert name != baseline.TRAINED
    metrics = baseline.choice_metrics("recall@1", name, trained.mean, 0.44, **{"whitened_val_recall@1": candidate.mean},
                                      val_classes=2, val_images=50, choice_incumbent=steps[-1].incumbent,
                                      choice_difference=steps[-1].difference, choice_low=steps[-1].low,
                                      choice_high=steps[-1].high, choice_lead=steps[-1].lead_share,
                                      choice_confidence=steps[-1].confidence, choice_decided=steps[-1].decisive)
    warning = baseline.noise_warning(metrics)
    assert warning.startswith("warning: 2 validation classes (50 images) cannot tell the trained model from the ")
    assert "--set val_fraction=0.3" in warning


def test_many_validation_classes_decide_a_clear_gain():
    rng = np.random.default_rng(1)
    candidate = scores(baseline.PRETRAINED, hits(rng, 30, 20, 0.40))
    better = scores(baseline.TRAINED, {c: list(np.minimum(1.0, np.asarray(v) + (rng.random(20) < 0.25)))
                                       for c, v in zip(range(30), np.split(candidate.values, 30))})
    step = choice.compare(candidate, better)
    assert step.difference > 0.1 and step.low > 0 and step.decisive and step.challenger_wins
    assert step.lead_share == 1.0 and step.trail_share == 0
    assert choice.ladder([candidate, better])[0] == baseline.TRAINED
    assert choice.compare(better, candidate).decisive  # the other way round: decided for the incumbent


def test_identical_candidates_never_lead_and_the_safer_one_stays():
    rng = np.random.default_rng(2)
    a = scores("a", hits(rng, 5, 10, 0.5))
    b = choice.PerQuery("b", a.values.copy(), a.classes)
    step = choice.compare(a, b)
    assert step.lead_share == step.trail_share == 0 and step.difference == 0 and not step.challenger_wins
    assert not step.decisive
    assert choice.ladder([a, b])[0] == "a" and choice.argmax([a, b]) == "a"


def test_a_gain_from_one_class_of_two_is_noise():
    """+50 points on one class, -10 on the other: the mean is +20, but which class is held out decides it."""
    incumbent = scores("raw", {0: [0.0] * 10, 1: [1.0] * 10})
    challenger = scores("trained", {0: [1.0] * 5 + [0.0] * 5, 1: [1.0] * 9 + [0.0]})
    step = choice.compare(incumbent, challenger)
    assert step.difference == pytest.approx(0.2)
    assert step.low < 0 < step.high and not step.challenger_wins


def test_the_bootstrap_is_seeded_and_checks_its_input():
    rng = np.random.default_rng(3)
    a, b = scores("a", hits(rng, 6, 8, 0.5)), scores("b", hits(rng, 6, 8, 0.6))
    assert choice.compare(a, b) == choice.compare(a, b)
    other = scores("c", hits(rng, 5, 8, 0.5))
    with pytest.raises(DcmlError, match="different validation queries"):
        choice.compare(a, other)
    with pytest.raises(DcmlError, match="confidence"):
        choice.compare(a, b, confidence=1.0)


def test_per_query_scores_average_to_the_metrics():
    from dcml.algorithm.metrics import evaluate_embeddings

    rng = np.random.default_rng(4)
    labels = np.repeat(np.arange(6), 7)
    x = rng.standard_normal((42, 8)).astype(np.float32) + labels[:, None] * 0.3
    full = evaluate_embeddings(x, labels, ks=(1,), include=("recall", "map@r"), gpu=False)
    for metric in ("recall@1", "map@r"):
        pq = choice.per_query("x", x, labels, metric)
        assert pq.mean == pytest.approx(full[metric]) and len(pq.values) == 42
