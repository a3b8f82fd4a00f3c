"""The backbone's own features: every run's baseline and one more candidate model.

What a user has without dcml is the pretrained backbone's pooled features,
L2-normalised, at full width (1280-d for EfficientNet-Lite0). Every run
scores them (the extract stage: validation and test splits), and the last
training stage treats them as a candidate next to the trained model, chosen
on the validation classes with the metric that picked the epoch
(``select_on``): when they score higher there, the stage delivers
:func:`backbone_model`, a plain dcml model whose head is the identity at the
backbone's width, so its embedding *is* the normalised features and every
later stage (evaluation, index, search, export, compression) takes it as it
takes any model. A backbone without pretrained weights (``weights="none"``)
has no such baseline.

The record keys are fixed here: ``pretrained_<split>_<metric>`` in the
extract stage's metrics, ``delivered`` / ``pretrained_val_<metric>`` /
``trained_val_<metric>`` in the choosing stage's.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

TRAINED = "trained"
PRETRAINED = "pretrained features"
SCORED = ("recall@1", "map@r")


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


def choose(trained: float, pretrained: float | None) -> str:
    """The candidate delivered: the pretrained features only when they score strictly higher."""
    return PRETRAINED if pretrained is not None and pretrained > trained else TRAINED


def choice_metrics(select_on: str, delivered: str, trained: float, pretrained: float) -> dict:
    return {"delivered": delivered, "select_on": select_on,
            f"trained_val_{select_on}": float(trained), f"pretrained_val_{select_on}": float(pretrained)}


def choice_line(metrics: dict) -> str:
    """One plain line on which candidate was delivered, with both validation figures."""
    metric = metrics["select_on"]
    name = "R@1" if metric == "recall@1" else "MAP@R"
    trained, pretrained = metrics[f"trained_val_{metric}"], metrics[f"pretrained_val_{metric}"]
    if metrics["delivered"] == PRETRAINED:
        return (f"delivered the pretrained features: they beat the trained model on validation "
                f"({name} {pretrained:.4f} vs {trained:.4f})")
    return f"delivered the trained model (validation {name} {trained:.4f} vs {pretrained:.4f} for the pretrained features)"


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
                         if k in ("delivered", "select_on") or k.startswith(("trained_val_", "pretrained_val_"))}
    return out


def headline(effect: dict) -> str | None:
    """``pretrained features -> trained: R@1 a -> b (+x points)``, or the reason there is none."""
    if "skipped" in effect:
        return f"pretrained features: none ({effect['skipped']})"
    if "pretrained_recall@1" not in effect or "trained_recall@1" not in effect:
        return None
    before, after = effect["pretrained_recall@1"], effect["trained_recall@1"]
    text = f"pretrained features -> trained: R@1 {before:.4f} -> {after:.4f} ({100 * (after - before):+.1f} points)"
    if "pretrained_map@r" in effect and "trained_map@r" in effect:
        text += f", MAP@R {effect['pretrained_map@r']:.4f} -> {effect['trained_map@r']:.4f}"
    return text


# -- the choice (called by the last training stage) -------------------------------------

def select(model, manifest, val_rows: pd.DataFrame, select_on: str, trained_score: float | None = None, *,
           test_rows: pd.DataFrame | None = None, device=None, batch_size: int = 128, num_workers: int = 0):
    """(model to deliver, record metrics): the trained ``model`` or :func:`backbone_model`,
    whichever scores higher on the validation rows with ``select_on``.

    ``trained_score``: the trained model's validation score when the trainer already
    measured it (the epoch it kept), else it is measured here the same way. Without
    validation rows or pretrained weights nothing is chosen: ``model`` and the reason.
    ``test_rows``: also score the pretrained features there (``pretrained_test_<metric>``),
    for a pipeline with no extract stage to do it (DFML).
    """
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
    if trained_score is None:
        trained_score = score_model(model, manifest, val_rows, desc=f"validation of the trained model "
                                    f"({len(val_rows)} images)", **options)[select_on]
    pretrained = backbone_model(model.config)
    pretrained_score = score_model(pretrained, manifest, val_rows, desc=f"validation of the pretrained features "
                                   f"({len(val_rows)} images)", **options)[select_on]
    delivered = choose(trained_score, pretrained_score)
    return (pretrained if delivered == PRETRAINED else model), {
        **choice_metrics(select_on, delivered, trained_score, pretrained_score), **tested}
