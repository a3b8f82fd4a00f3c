"""Scoring of the small-data draws (bench.bench_small): every candidate, every choice rule, on validation and test.

Reads the draws' trained embeddings and the pretrained features; writes
bench/results/small_data/<arm>.json with one record per draw.
"""

from __future__ import annotations

import json

import numpy as np

from bench.bench_small import ARMS, HERE, OUT, RECIPE, arm_config, draw_classes, draw_manifest, features_file, run_dir
from bench.common import log, result_header, write_result
from dcml.algorithm import baseline, choice, whitening
from dcml.algorithm.metrics import evaluate_embeddings

METRIC = "recall@1"
FUSION_WEIGHTS = (0.25, 0.5, 0.75)  # the trained embedding's share of the squared norm (the product: 0.5)
DEFAULT_WHITENING = (512, 0.25)  # a fixed setting, against the one chosen on validation
# Choice rules measured (the delivered candidate of each): see rule_choice.
RULES = ("today", "argmax", "ladder-0.9", "trained-0.9", "cv-0.9", "fused-0.8", "fused-0.9", "fused-0.95",
         "fused-0.8-0.9", "fused-0.9-0.8", "fused-0.75")


def normalised(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def test_scores(vectors: np.ndarray, labels: np.ndarray) -> dict:
    m = evaluate_embeddings(vectors, labels, ks=(1,), include=("recall", "map@r"), gpu=False)
    return {"recall@1": float(m["recall@1"]), "map@r": float(m["map@r"])}


def _white_level(rule: str) -> float:
    return float(rule.split("-")[1]) if rule.startswith(("cv-", "fused-")) else choice.CONFIDENCE


def rule_choice(rule: str, pq: dict[str, choice.PerQuery]) -> str:
    """The candidate a rule delivers, from the candidates' per-query validation scores."""
    raw, white, trained = pq["raw"], pq["whitened_val"], pq["trained"]
    if rule == "today":  # the trained model unless the raw features score strictly higher
        return "raw" if raw.mean > trained.mean else "trained"
    if rule == "argmax":  # the highest validation mean of the three
        return choice.argmax([raw, white, trained])
    if rule.startswith("ladder-"):  # raw -> whitened -> trained, each step beyond the noise
        return choice.ladder([raw, white, trained], confidence=float(rule.split("-")[1]))[0]
    if rule.startswith(("cv-", "fused-")):  # raw -> whitened over all labelled classes, then training on validation
        # <kind>-<confidence of both steps>, or <kind>-<whitening step's>-<training step's>
        levels = [float(x) for x in rule.split("-")[1:]]
        white_at, train_at = (levels * 2)[:2]
        base = "whitened" if pq["_cv_step"].lead_share >= white_at else "raw"
        if rule.startswith("fused-"):  # the fused candidate is built beside what the product's step kept
            fused = pq["fused"] if base == pq["_kept"] else pq["_fused_" + base]
        name, _ = choice.ladder([pq[base], fused if rule.startswith("fused-") else trained], confidence=train_at)
        return {"_fused_raw": "fused", "_fused_whitened": "fused"}.get(name, name)
    if rule.startswith("trained-"):  # the better no-training candidate by mean, the trained one beyond the noise
        base = choice.argmax([raw, white])
        name, _ = choice.ladder([pq[base], trained], confidence=float(rule.split("-")[1]))
        return name
    raise ValueError(rule)


def score_draw(arm: str, size: int, draw: int, feats: dict) -> dict | None:
    from dcml.contracts import manifest as manifest_lib

    cfg = arm_config(arm)
    work = run_dir(arm, size, draw)
    if not (work / "embeddings.npz").is_file():
        return None
    record = json.loads((work / "record.json").read_text())
    man = manifest_lib.read(draw_manifest(size, draw, cfg["val_fraction"]))
    emb = np.load(work / "embeddings.npz", allow_pickle=False)
    rows = {s: man.split(s) for s in ("train", "val", "test")}
    f = {s: feats["x"][[feats["index"][i] for i in rows[s]["image_id"].astype(str)]] for s in rows}
    labels = {s: rows[s]["label"].to_numpy() for s in rows}
    for s in ("val", "test"):
        assert list(emb[f"{s}_image_id"]) == list(rows[s]["image_id"].astype(str)), "embedding rows out of order"

    def val_pq(name, vectors):
        return choice.per_query(name, vectors, labels["val"], METRIC)

    out = {"classes": size, "draw": draw, "arm": arm, "class_ids": [c + 1 for c in draw_classes(size, draw)],
           "train_classes": int(rows["train"]["label"].nunique()), "val_classes": int(rows["val"]["label"].nunique()),
           "val_images": int(len(rows["val"])), "best_epoch": record["best_epoch"], "train_s": record["train_s"]}
    # raw features
    raw_val, raw_test = normalised(f["val"]), normalised(f["test"])
    pq = {"raw": val_pq("raw", raw_val)}
    out["raw"] = {**test_scores(raw_test, labels["test"]), "val": pq["raw"].mean}
    # whitening fitted on the training images, the setting picked on validation alone (the alternative
    # to the product's cross-validated step): every setting's validation score, the picked one's test score
    spectrum = whitening.Spectrum(f["train"])
    grid = []
    for w in whitening.grid(spectrum):
        v = val_pq("whitened_val", w.apply(f["val"]))
        grid.append({"width": w.width, "shrinkage": w.shrinkage, "val": v.mean, "_w": w, "_pq": v})
    best = max(grid, key=lambda g: g["val"])  # first of the ties (max keeps the first)
    pq["whitened_val"] = best["_pq"]
    out["whitened_val"] = {"width": best["width"], "shrinkage": best["shrinkage"], "val": best["val"],
                           **test_scores(best["_w"].apply(f["test"]), labels["test"])}
    default = spectrum.whitening(*DEFAULT_WHITENING)
    out["whitened_fixed"] = {"width": default.width, "shrinkage": default.shrinkage,
                             **test_scores(default.apply(f["test"]), labels["test"]),
                             "val": val_pq("w", default.apply(f["val"])).mean}
    out["whitening_grid"] = [{k: v for k, v in g.items() if not k.startswith("_")} for g in grid]
    # the product's raw -> whitened step (dcml.algorithm.baseline.whitening_step): cross-validated over
    # every labelled class of the draw (train + val)
    cv_w, cv_step, cv_fields = baseline.whitening_step(f["train"], labels["train"], f["val"], labels["val"], METRIC,
                                                       choice.CONFIDENCE)
    pq["whitened"] = val_pq("whitened", cv_w.apply(f["val"]))
    out["whitened"] = {"width": cv_w.width, "shrinkage": cv_w.shrinkage, "val": pq["whitened"].mean,
                       **test_scores(cv_w.apply(f["test"]), labels["test"]),
                       **{k: v for k, v in cv_fields.items() if k.startswith("whitening_")}}
    pq["_cv_step"] = cv_step
    # trained
    tv, tt = emb["val_embedding"], emb["test_embedding"]
    pq["trained"] = val_pq("trained", tv)
    out["trained"] = {**test_scores(tt, labels["test"]), "val": pq["trained"].mean}
    # fusion (the product's FUSED candidate): the trained embedding beside the no-training candidate the
    # cross-validated step kept, equal weight; and, for the record, other weights beside the whitening
    beside = {"raw": (raw_val, raw_test), "whitened": (cv_w.apply(f["val"]), cv_w.apply(f["test"]))}
    kept = "whitened" if cv_step.lead_share >= choice.CONFIDENCE else "raw"
    pq["fused"] = val_pq("fused", baseline.fuse_vectors(tv, beside[kept][0]))
    pq["_kept"] = kept  # rules with another whitening bar fuse beside what they kept
    for name in beside:
        pq["_fused_" + name] = val_pq("fused", baseline.fuse_vectors(tv, beside[name][0]))
    out["fused_beside"] = {name: test_scores(baseline.fuse_vectors(tt, beside[name][1]), labels["test"])
                           for name in beside}
    out["fused"] = {"beside": kept, "weight": baseline.FUSION_WEIGHT, "val": pq["fused"].mean,
                    **test_scores(baseline.fuse_vectors(tt, beside[kept][1]), labels["test"])}
    out["fusion_grid"] = []
    for weight in FUSION_WEIGHTS:
        v = val_pq("fusion", baseline.fuse_vectors(tv, beside["whitened"][0], weight))
        out["fusion_grid"].append({"weight": weight, "val": v.mean, **test_scores(
            baseline.fuse_vectors(tt, beside["whitened"][1], weight), labels["test"])})
    # the comparisons the product's rule makes, and every rule's delivered candidate
    out["comparisons"] = [cv_step.as_dict(), choice.compare(pq[kept], pq["fused"]).as_dict()]
    # right (the hit rate): the delivered model is at least the better of the trained model and the
    # best no-training candidate on test (the fused model counts when it is)
    no_training = max(out["raw"]["recall@1"], out["whitened"]["recall@1"])  # the product's no-training candidates
    better = max(no_training, out["trained"]["recall@1"])
    out["rules"] = {}
    for rule in RULES:
        name = rule_choice(rule, pq)
        got = out[name]
        if name == "fused":  # beside the candidate this rule kept
            got = out["fused_beside"]["whitened" if pq["_cv_step"].lead_share >= _white_level(rule) else "raw"]
        out["rules"][rule] = {"delivered": name, "recall@1": got["recall@1"], "map@r": got["map@r"],
                              "right": bool(got["recall@1"] >= better - 1e-9)}
    out["delivered"] = delivered(out["rules"])
    return out


def delivered(rules: dict) -> dict:
    """The product rule's choice of a scored draw."""
    got = rules[PRODUCT_RULE]
    return {"candidate": got["delivered"], "rule": PRODUCT_RULE, "recall@1": got["recall@1"], "map@r": got["map@r"],
            "right": got["right"]}


def redeliver() -> None:
    """Re-derive every scored draw's delivered model after PRODUCT_RULE changed (no re-scoring)."""
    from bench import small_report

    for name, data in small_report.load_arms().items():
        for draw in data["draws"]:
            draw["delivered"] = delivered(draw["rules"])
        data["product_rule"] = PRODUCT_RULE
        write_result(OUT / f"{name}.json", data)
    _report_outputs()


PRODUCT_RULE = "fused-0.8"


def load_features() -> dict:
    data = np.load(features_file(RECIPE), allow_pickle=False)
    ids = data["image_id"]
    return {"x": data["features"], "index": {str(i): n for n, i in enumerate(ids)}}


def score_all(arms=None) -> list:
    feats = load_features()
    written = []
    for arm in arms or ARMS:
        base = HERE / "runs" / arm
        if not base.is_dir():
            continue
        draws = []
        for folder in sorted(base.glob("n*-d*")):
            size, draw = (int(x) for x in folder.name[1:].split("-d"))
            rec = score_draw(arm, size, draw, feats)
            if rec is not None:
                draws.append(rec)
                log(f"{arm} n{size} d{draw}: raw {rec['raw']['recall@1']:.3f} whitened {rec['whitened']['recall@1']:.3f}"
                    f" trained {rec['trained']['recall@1']:.3f} fused {rec['fused']['recall@1']:.3f} -> "
                    f"{rec['delivered']['candidate']} {rec['delivered']['recall@1']:.3f}")
        draws.sort(key=lambda r: (r["classes"], r["draw"]))
        payload = {**result_header("small_data", "bench.bench_small", ["score"]), "arm": arm,
                   "label": ARMS[arm]["label"], "config": arm_config(arm), "metric": METRIC,
                   "product_rule": PRODUCT_RULE, "draws": draws}
        written.append(write_result(OUT / f"{arm}.json", payload))
    if arms is None:  # a partial scoring (processes side by side) leaves the plot and MLflow to `--redeliver`
        _report_outputs()
    return written


def _report_outputs() -> None:
    """The plot and the MLflow runs of every scored arm."""
    from bench import small_report

    arms = small_report.load_arms()
    if arms:
        small_report.plot(arms)
        small_report.log_mlflow(arms)
        for name, data in arms.items():  # the MLflow run ids beside the results
            write_result(OUT / f"{name}.json", data)
