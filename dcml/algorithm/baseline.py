"""The backbone's own features: every run's baseline, and the no-training candidates a run may deliver.

What a user has without dcml is the pretrained backbone's pooled features,
L2-normalised, at full width (1280-d for EfficientNet-Lite0). Every run
scores them (the extract stage: validation and test splits), and the last
training stage chooses what to deliver along a ladder of candidates: the raw
features (:func:`backbone_model`, a plain dcml model whose head is the
identity at the backbone's width), their PCA-whitening fitted on the
training and validation images (:func:`whitened_model`, the whitening as the
head; dcml.algorithm.whitening), and the trained model beside the kept
features (:func:`fused_model`; or the trained model alone). Each step up
must win beyond the noise (dcml.algorithm.choice): raw -> whitened by
cross-validation over every labelled class (whitening needs no labels),
then the trained candidate on the validation classes with the metric that
picked the epoch (``select_on``). Every candidate is a plain checkpoint that
evaluation, index, search, export and compression take as any model. A
backbone without pretrained weights (``weights="none"``) has no such
baseline.

The record keys are fixed here: ``pretrained_<split>_<metric>`` in the
extract stage's metrics, ``delivered`` / ``pretrained_val_<metric>`` /
``whitened_val_<metric>`` / ``trained_val_<metric>`` / ``choice_*`` in the
choosing stage's.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

TRAINED = "trained"
PRETRAINED = "pretrained features"
WHITENED = "whitened features"
FUSED = "trained + features"  # the trained model fused with the no-training candidate the ladder kept
FUSION_WEIGHT = 0.5  # equal weight: measured against weights chosen on validation (BENCHMARKS, small data)
UNDECIDED_WIDTH = 0.04  # an interval this wide (4 points) that holds 0: the split could not decide
SCORED = ("recall@1", "map@r")
# The choosing stage's record fields the run's summary, MLflow and `dcml compare` carry.
CHOICE_KEYS = ("trained_val_", "pretrained_val_", "whitened_val_", "fused_val_", "choice_", "val_classes",
               "val_images", "whitened_width", "whitened_shrinkage", "whitening_")


def available(config: dict) -> str | None:
    """None when the model config's backbone has pretrained weights, else why there is no baseline."""
    if str(config.get("weights")) == "none":
        return "weights=none: the backbone has no pretrained features to compare with"
    return None


def score_vectors(vectors: np.ndarray, rows: pd.DataFrame) -> dict:
    """R@1 and MAP@R of ``vectors`` (one per row): query vs gallery when the rows hold
    both, else each row against the rest -- the scoring of the trainer's validation."""
    from dcml.algorithm.metrics import evaluate_embeddings

    rows = rows.reset_index(drop=True)
    labels = rows["label"].to_numpy()
    split = rows["split"].to_numpy()
    if {"query", "gallery"} <= set(split):
        q, g = split == "query", split == "gallery"
        m = evaluate_embeddings(vectors[q], labels[q], vectors[g], labels[g], ks=(1,), include=("recall", "map@r"))
    else:
        m = evaluate_embeddings(vectors, labels, ks=(1,), include=("recall", "map@r"))
    return {k: float(m[k]) for k in SCORED}


def normalised(features: np.ndarray) -> np.ndarray:
    x = np.asarray(features, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def score_model(model, manifest, rows: pd.DataFrame, *, batch_size: int = 128, device=None,
                num_workers: int = 0, desc: str | None = None) -> dict:
    """R@1 and MAP@R of a model's embeddings of ``rows`` (eval transform, images)."""
    from dcml.algorithm.inference import compute_vectors

    rows = rows.reset_index(drop=True)
    x = compute_vectors(model, manifest, rows, kind="embedding", batch_size=batch_size, device=device,
                        num_workers=num_workers, desc=desc or f"scoring {len(rows)} images")
    return score_vectors(x, rows)


def backbone_model(config: dict):
    """A dcml model that embeds with the pretrained backbone's pooled features.

    One slice, the head the identity at the backbone's width (bias 0): the
    embedding is the L2-normalised pooled features. Everything else in
    ``config`` (backbone, weights, image size, frozen part, BatchNorm) is
    kept, so the checkpoint reads, embeds and trains like any other.
    """
    from dcml.algorithm.models import build_backbone, build_model, default_config

    keep = ("backbone", "weights", "image_size", "in_channels", "train_blocks", "freeze_bn", "dropout")
    base = default_config(**{k: config[k] for k in keep if k in config})
    pretrained = build_backbone(base)
    model = build_model({**base, "embedding_dim": int(pretrained.out_features), "num_slices": 1},
                        load_weights=False)
    model.backbone.load_state_dict(pretrained.state_dict())
    with torch.no_grad():
        model.head.weight.copy_(torch.eye(model.embedding_dim, dtype=model.head.weight.dtype))
        model.head.bias.zero_()
    return model.eval()


def whitened_model(config: dict, w, pretrained=None):
    """A dcml model that embeds with the whitening ``w`` (dcml.algorithm.whitening) of the pretrained
    backbone's pooled features: :func:`backbone_model` (``pretrained``, when already built) with the
    head ``w.weight``, ``w.bias``."""
    model = pretrained if pretrained is not None else backbone_model(config)
    from dcml.algorithm.models import build_model

    whitened = build_model({**model.config, "embedding_dim": int(w.width), "num_slices": 1}, load_weights=False)
    whitened.backbone.load_state_dict(model.backbone.state_dict())
    with torch.no_grad():
        whitened.head.weight.copy_(torch.as_tensor(w.weight, dtype=whitened.head.weight.dtype))
        whitened.head.bias.copy_(torch.as_tensor(w.bias, dtype=whitened.head.bias.dtype))
    return whitened.eval()


def fused_model(model, reference):
    """The trained ``model`` and a no-training ``reference`` (:func:`whitened_model` or
    :func:`backbone_model`) as one model: both unit embeddings side by side, equal weight
    (dcml.algorithm.models.EmbeddingModel's fusion)."""
    from dcml.algorithm.models import build_model

    fused = build_model({**model.config, "fusion": {"width": int(reference.embedding_dim), "weight": FUSION_WEIGHT}},
                        load_weights=False)
    state = dict(model.state_dict())
    state.update({f"reference.{k}": v for k, v in reference.backbone.state_dict().items()})
    state.update({f"reference_head.{k}": v for k, v in reference.head.state_dict().items()})
    fused.load_state_dict(state)
    return fused.eval()


def fuse_vectors(own: np.ndarray, reference: np.ndarray, weight: float = None) -> np.ndarray:
    """What a fused model outputs, from its two parts' unit embeddings (numpy)."""
    a = FUSION_WEIGHT if weight is None else float(weight)
    return np.hstack([np.sqrt(a) * normalised(own), np.sqrt(1 - a) * normalised(reference)]).astype(np.float32)


def choice_metrics(select_on: str, delivered: str, trained: float, pretrained: float, **more) -> dict:
    return {"delivered": delivered, "select_on": select_on,
            f"trained_val_{select_on}": float(trained), f"pretrained_val_{select_on}": float(pretrained), **more}


def _name(metric: str) -> str:
    return "R@1" if metric == "recall@1" else "MAP@R"


def choice_line(metrics: dict) -> str:
    """One plain line on which candidate was delivered, why, with the validation figures."""
    metric = metrics["select_on"]
    name = _name(metric)
    trained, pretrained = metrics[f"trained_val_{metric}"], metrics[f"pretrained_val_{metric}"]
    delivered = metrics["delivered"]
    if "choice_low" not in metrics:  # the plain comparison (records written before the noise-aware choice)
        if delivered == PRETRAINED:
            return (f"delivered the pretrained features: they beat the trained model on validation "
                    f"({name} {pretrained:.4f} vs {trained:.4f})")
        return f"delivered the trained model (validation {name} {trained:.4f} vs {pretrained:.4f} for the pretrained features)"
    score = {PRETRAINED: pretrained, WHITENED: metrics.get(f"whitened_val_{metric}"), TRAINED: trained,
             FUSED: metrics.get(f"fused_val_{metric}")}
    rival, challenger = metrics["choice_incumbent"], metrics.get("choice_challenger", TRAINED)
    gap = (f"{100 * metrics['choice_difference']:+.1f} points, {int(100 * metrics['choice_confidence'])} % interval "
           f"{100 * metrics['choice_low']:+.1f} to {100 * metrics['choice_high']:+.1f} over "
           f"{metrics['val_classes']} validation classes")
    what = _describe(challenger, rival)
    if delivered == challenger:
        return (f"delivered {what}: it beats the {rival} on validation ({name} {score[challenger]:.4f} vs "
                f"{score[rival]:.4f}; {gap})")
    if metrics["choice_difference"] > 0:
        return (f"delivered the {delivered} (validation {name} {score[delivered]:.4f}): {what} scored "
                f"{score[challenger]:.4f}, ahead by less than the noise ({gap})")
    return (f"delivered the {delivered}: they beat {what} on validation ({name} {score[delivered]:.4f} vs "
            f"{score[challenger]:.4f}; {gap})")


def _describe(candidate: str, beside: str) -> str:
    return f"the trained model beside the {beside}" if candidate == FUSED else "the trained model"


def noise_warning(metrics: dict) -> str | None:
    """One line when the validation split was too small to tell the trained model from the
    candidate it was compared with, and what to do; None when it could."""
    if "choice_low" not in metrics or metrics.get("choice_decided") or \
            metrics["choice_high"] - metrics["choice_low"] < UNDECIDED_WIDTH:
        return None
    return (f"warning: {metrics['val_classes']} validation classes ({metrics['val_images']} images) cannot tell the "
            f"trained model from the {metrics['choice_incumbent']} ({_name(metrics['select_on'])} "
            f"{100 * metrics['choice_low']:+.1f} to {100 * metrics['choice_high']:+.1f} points); to decide, bring more "
            "classes or hold out more of them (--set val_fraction=0.3)")


# -- reading a run's lineage (console, MLflow, `dcml compare`) ------------------------

def from_lineage(lineage: list[dict], final_metrics: dict) -> dict:
    """The run's headline: the pretrained features' test R@1 / MAP@R against the final
    model's, which candidate was delivered and on what validation figures, or why the
    baseline was skipped. The pretrained features are scored by the extract stage, or, in a
    pipeline without one (DFML), by the training stage. {} when nothing scored them."""
    scored = [r["metrics"] for r in lineage if "pretrained_test_recall@1" in r.get("metrics", {})]
    reasons = [r.get("extra", {}).get("baseline_skipped") or r.get("metrics", {}).get("baseline_skipped")
               for r in lineage]
    reasons = [reason for reason in reasons if reason]
    out: dict = {}
    if scored:
        m = scored[0]
        out.update({f"pretrained_{k}": m[f"pretrained_test_{k}"] for k in SCORED if f"pretrained_test_{k}" in m})
        out.update({f"pretrained_val_{k}": m[f"pretrained_val_{k}"] for k in SCORED if f"pretrained_val_{k}" in m})
        out.update({f"trained_{k}": final_metrics[k] for k in SCORED if k in final_metrics})
    elif reasons:
        out["skipped"] = reasons[0]
    chooser = [r for r in lineage if "delivered" in r.get("metrics", {})]
    if chooser:
        out["choice"] = {k: v for k, v in chooser[0]["metrics"].items()
                         if k in ("delivered", "select_on") or k.startswith(CHOICE_KEYS)}
    kept = [r["metrics"] for r in lineage if "kept_test_recall@1" in r.get("metrics", {})]
    if kept:  # the last training stage's kept epoch, scored on test by its curve
        out.update({"kept_test_recall@1": kept[0]["kept_test_recall@1"], "kept_epoch": kept[0].get("best_epoch")})
    return out


def headline(effect: dict) -> str | None:
    """``pretrained features -> trained: R@1 a -> b (+x points)`` (test; ``-> <candidate>`` when a
    no-training or fused candidate was delivered, with the trained model's own test R@1 beside it),
    or the reason there is none."""
    if "skipped" in effect:
        return f"pretrained features: none ({effect['skipped']})"
    if "pretrained_recall@1" not in effect or "trained_recall@1" not in effect:
        return None
    before, after = effect["pretrained_recall@1"], effect["trained_recall@1"]
    delivered = effect.get("choice", {}).get("delivered", TRAINED)
    target = "trained" if delivered == TRAINED else f"delivered ({delivered})"
    text = f"pretrained features -> {target}: R@1 {before:.4f} -> {after:.4f} ({100 * (after - before):+.1f} points)"
    if "pretrained_map@r" in effect and "trained_map@r" in effect:
        text += f", MAP@R {effect['pretrained_map@r']:.4f} -> {effect['trained_map@r']:.4f}"
    if delivered != TRAINED and "kept_test_recall@1" in effect:
        text += (f"; the trained model alone: R@1 {effect['kept_test_recall@1']:.4f} "
                 f"(epoch {effect.get('kept_epoch')}, training curve)")
    return text


# -- the choice (called by the last training stage) -------------------------------------

def select(model, manifest, val_rows: pd.DataFrame, select_on: str, *, train_rows: pd.DataFrame | None = None,
           activations=None, test_rows: pd.DataFrame | None = None, device=None, batch_size: int = 128,
           num_workers: int = 0, confidence: float | None = None, fusion: bool = True):
    """(model to deliver, record metrics): the trained ``model``, :func:`whitened_model` or
    :func:`backbone_model`, chosen on the validation rows with ``select_on`` by the noise-aware
    ladder of dcml.algorithm.choice (raw features -> whitened -> trained, each step only when it
    wins beyond the noise of the validation classes).

    ``train_rows``: the training images the whitening is fitted on (without them there is no
    whitened candidate). ``activations``: the fast mode's cache, used for every candidate's vectors
    (as the trainer validates). Without validation rows or pretrained weights nothing is chosen:
    ``model`` and the reason. ``test_rows``: also score the pretrained features there
    (``pretrained_test_<metric>``), for a pipeline with no extract stage to do it (DFML).
    """
    from dcml.algorithm import choice, whitening
    from dcml.algorithm.training.scoring import Scorer

    skipped = available(model.config)
    if skipped:
        return model, {"baseline_skipped": skipped}
    options = {"batch_size": batch_size, "device": device, "num_workers": num_workers}
    tested = {}
    if test_rows is not None and not test_rows.empty:
        scores = score_model(backbone_model(model.config), manifest, test_rows,
                             desc=f"test of the pretrained features ({len(test_rows)} images)", **options)
        tested = {f"pretrained_test_{k}": v for k, v in scores.items()}
    if val_rows is None or val_rows.empty:
        return model, {"baseline_skipped": "no validation split to choose on (val_fraction=0)", **tested}
    val_rows = val_rows.reset_index(drop=True)
    labels = val_rows["label"].to_numpy()
    scorer = Scorer(manifest, torch.device(device or "cpu"), batch_size, num_workers, activations)
    pretrained = backbone_model(model.config)
    features = scorer.vectors(pretrained, val_rows, "features", f"validation of the pretrained features "
                              f"({len(val_rows)} images)")
    confidence = confidence or choice.CONFIDENCE
    incumbent = choice.per_query(PRETRAINED, normalised(features), labels, select_on)
    raw_score, white, more = incumbent.mean, None, {}
    if train_rows is not None and len(train_rows) >= 3:
        fitted = scorer.vectors(pretrained, train_rows, "features", f"whitening: features of {len(train_rows)} "
                                "training images")
        white, step, more = whitening_step(fitted, train_rows["label"].to_numpy(), features, labels, select_on,
                                            confidence)
        white_val = choice.per_query(WHITENED, white.apply(features), labels, select_on)
        more[f"whitened_val_{select_on}"] = white_val.mean
        if step.challenger_wins:
            incumbent = white_val
    own = scorer.vectors(model, val_rows, "embedding", f"validation of the trained model ({len(val_rows)} images)")
    trained = challenger = choice.per_query(TRAINED, own, labels, select_on)
    if fusion and model.num_slices == 1 and getattr(model, "fusion", None) is None:
        beside = white.apply(features) if incumbent.name == WHITENED else normalised(features)
        challenger = choice.per_query(FUSED, fuse_vectors(own, beside), labels, select_on)
        more[f"fused_val_{select_on}"] = challenger.mean
    last = choice.compare(incumbent, challenger, confidence=confidence)  # training against the no-training choice
    delivered = challenger.name if last.challenger_wins else incumbent.name
    more.update({"val_classes": last.classes, "val_images": int(len(val_rows)), "choice_incumbent": last.incumbent,
                 "choice_challenger": last.challenger,
                 "choice_difference": last.difference, "choice_low": last.low, "choice_high": last.high,
                 "choice_lead": last.lead_share, "choice_confidence": last.confidence,
                 "choice_decided": bool(last.decisive)})
    reference = (whitened_model(model.config, white, pretrained) if WHITENED in (delivered, incumbent.name)
                 else pretrained)
    chosen = {TRAINED: model, PRETRAINED: pretrained, WHITENED: reference}.get(delivered) or fused_model(model, reference)
    return chosen, {**choice_metrics(select_on, delivered, trained.mean, raw_score, **more), **tested}


def whitening_step(train_features, train_labels, val_features, val_labels, select_on: str, confidence: float):
    """(the whitening, raw -> whitened comparison, record fields). With 4 or more labelled classes
    (training and validation together) the setting is chosen and the step decided by
    cross-validation over all of them (dcml.algorithm.whitening.cross_validate); with fewer, on
    the validation classes alone (the whitening fitted on the training images)."""
    from dcml.algorithm import choice, whitening

    x = np.concatenate([train_features, val_features])
    y = np.concatenate([np.asarray(train_labels), np.asarray(val_labels)])
    if len(np.unique(y)) >= 4:
        raw, white, scored, _ = whitening.cross_validate(x, y, select_on, folds=whitening.CV_FOLDS)
        step = choice.compare(raw, scored, confidence=confidence)
        how = "cross-validated"
    else:
        white, _, _ = whitening.choose(train_features, val_features, lambda v: choice.per_query(
            WHITENED, v, val_labels, select_on).mean)
        step = choice.compare(choice.per_query(PRETRAINED, normalised(val_features), val_labels, select_on),
                              choice.per_query(WHITENED, white.apply(val_features), val_labels, select_on),
                              confidence=confidence)
        how = "validation"
    return white, step, {"whitened_width": white.width, "whitened_shrinkage": white.shrinkage,
                         "whitening_scored_on": how, "whitening_classes": step.classes,
                         "whitening_difference": step.difference, "whitening_lead": step.lead_share,
                         "whitening_adopted": bool(step.challenger_wins)}
