"""The small-data section of BENCHMARKS.md, its plot and its MLflow runs, from bench/results/small_data/*.json."""

from __future__ import annotations

import json
import statistics

from bench.common import RESULTS, save_png
from bench.report import PY

OUT = RESULTS / "small_data"
ADOPTED = "whiten"  # the arm the folder preset follows
CANDIDATES = ("raw", "whitened", "trained", "fused")
LABELS = {"raw": "raw features", "whitened": "whitened (cross-validated)", "trained": "trained (kept epoch)",
          "fused": "trained + features", "delivered": "delivered"}
SIZES = (10, 15, 25, 50)


def load_arms() -> dict[str, dict]:
    out = {}
    for path in sorted(OUT.glob("*.json")):
        data = json.loads(path.read_text())
        if data.get("draws"):
            out[data["arm"]] = data
    return out


def r1(draw: dict, name: str) -> float:
    return draw["delivered"]["recall@1"] if name == "delivered" else draw[name]["recall@1"]


def mean_se(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    se = statistics.stdev(values) / len(values) ** 0.5 if len(values) > 1 else None
    return statistics.fmean(values), se


def fmt(values: list[float], points: bool = False) -> str:
    m, se = mean_se(values)
    if m is None:
        return "—"
    sign = "+" if points and m >= 0 else ""
    return f"{sign}{100 * m:.1f}" + (f" ± {100 * se:.1f}" if se is not None else "")


def by_size(data: dict, size: int, full_only: bool = False) -> list[dict]:
    return [d for d in data["draws"] if d["classes"] == size]


def goals(data: dict) -> list[str]:
    """The issue's acceptance goals on the adopted arm, each met or by how much not."""
    out = []
    best_nt = lambda d: max(d["raw"]["recall@1"], d["whitened"]["recall@1"])  # noqa: E731
    d25 = by_size(data, 25)
    if d25:
        wins = sum(r1(d, "delivered") >= best_nt(d) - 1e-9 for d in d25)
        gain = statistics.fmean(r1(d, "delivered") - d["raw"]["recall@1"] for d in d25)
        out.append(f"25 classes: delivered >= the best no-training candidate in {wins} of {len(d25)} draws (goal: 4 "
                   f"of 5) -- {'met' if wins >= 0.8 * len(d25) else 'missed'}; mean delivered - raw features "
                   f"{100 * gain:+.1f} points (goal >= +4) -- {'met' if gain >= 0.04 else 'missed'}")
    for size in (10, 15):
        ds = by_size(data, size)
        if ds:
            worst = min(r1(d, "delivered") - d["raw"]["recall@1"] for d in ds)
            out.append(f"{size} classes: the worst draw's delivered - raw features {100 * worst:+.1f} points (goal "
                       f">= -0.5 in every draw) -- {'met' if worst >= -0.005 else 'missed'}")
    d50 = by_size(data, 50)
    if d50:
        gain = statistics.fmean(r1(d, "delivered") - best_nt(d) for d in d50)
        out.append(f"50 classes: mean delivered - best no-training candidate {100 * gain:+.1f} points (goal >= +3) -- "
                   f"{'met' if gain >= 0.03 else 'missed by ' + format(100 * (0.03 - gain), '.1f') + ' points'}")
    return out


def rule_table(data: dict) -> list[str]:
    rules = list(data["draws"][0]["rules"])
    lines = ["| rule | what it delivers | right on test (hit rate) | mean delivered test R@1 |", "|---|---|---:|---:|"]
    what = {"today": "trained unless the raw features score strictly higher on validation (before this work)",
            "argmax": "the highest validation R@1 of raw / whitened / trained",
            "ladder-0.9": "raw -> whitened (chosen and decided on validation) -> trained, each beyond the noise",
            "trained-0.9": "the better no-training candidate by mean, the trained model beyond the noise",
            "cv-0.9": "raw -> whitened decided by cross-validation over all labelled classes -> trained beyond the noise",
            "fused-0.75": "as the product, both steps at 75 % of class draws",
            "fused-0.8": "raw -> whitened (cross-validated) -> the trained model beside the kept features "
                         "(validation), each step when it leads in 80 % of class draws",
            "fused-0.9": "as the product, both steps at 90 %",
            "fused-0.95": "as the product, both steps at 95 %",
            "fused-0.8-0.9": "as the product, the whitening step at 80 %, the training step at 90 %",
            "fused-0.9-0.8": "as the product, the whitening step at 90 %, the training step at 80 %"}
    for rule in rules:
        hits = [d["rules"][rule]["right"] for d in data["draws"]]
        got = [d["rules"][rule]["recall@1"] for d in data["draws"]]
        name = f"**{rule}** (the product)" if rule == data["product_rule"] else rule
        lines.append(f"| {name} | {what.get(rule, rule)} | {sum(hits)}/{len(hits)} ({100 * sum(hits) / len(hits):.0f} %) "
                     f"| {fmt(got)} |")
    return lines


def draws_table(data: dict) -> list[str]:
    lines = ["| classes | draw | val classes | raw | whitened (width/shrinkage) | trained (kept epoch) | "
             "trained + features | delivered | right |", "|---:|---:|---:|---:|---:|---:|---:|---|---|"]
    for d in data["draws"]:
        w = d["whitened"]
        lines.append(f"| {d['classes']} | {d['draw']} | {d['val_classes']} | {100 * d['raw']['recall@1']:.1f} | "
                     f"{100 * w['recall@1']:.1f} ({w['width']}/{w['shrinkage']:g}) | "
                     f"{100 * d['trained']['recall@1']:.1f} ({d['best_epoch']}) | {100 * d['fused']['recall@1']:.1f} | "
                     f"{LABELS.get(d['delivered']['candidate'], d['delivered']['candidate'])} "
                     f"{100 * d['delivered']['recall@1']:.1f} | {'yes' if d['delivered']['right'] else 'no'} |")
    return lines


def arms_table(arms: dict[str, dict]) -> list[str]:
    lines = ["| arm | what changes | classes | draws | trained | trained + features | delivered | MAP@R delivered |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for name, data in arms.items():
        for size in (*SIZES, 98):
            ds = by_size(data, size)
            if not ds:
                continue
            lines.append(f"| {name} | {data['label']} | {size} | {len(ds)} | {fmt([r1(d, 'trained') for d in ds])} | "
                         f"{fmt([r1(d, 'fused') for d in ds])} | {fmt([r1(d, 'delivered') for d in ds])} | "
                         f"{fmt([d['delivered']['map@r'] for d in ds])} |")
    return lines


def paired(arms: dict[str, dict], arm: str, against: str = ADOPTED) -> str:
    """Per size, ``arm`` - ``against`` on the draws both ran (R@1 points of the trained+features and delivered)."""
    out = []
    for size in SIZES:
        mine = {d["draw"]: d for d in by_size(arms[arm], size)}
        base = {d["draw"]: d for d in by_size(arms[against], size)}
        common = sorted(set(mine) & set(base))
        if common:
            fused = statistics.fmean(r1(mine[k], "fused") - r1(base[k], "fused") for k in common)
            got = statistics.fmean(r1(mine[k], "delivered") - r1(base[k], "delivered") for k in common)
            out.append(f"{size}: {100 * fused:+.1f} / {100 * got:+.1f}")
    return "; ".join(out)


def plot(arms: dict[str, dict]):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = arms.get(ADOPTED) or next(iter(arms.values()))
    sizes = [s for s in SIZES if by_size(data, s)]
    fig, ax = plt.subplots(figsize=(8, 5))
    for name in (*CANDIDATES, "delivered"):
        means = [mean_se([r1(d, name) for d in by_size(data, s)]) for s in sizes]
        ax.errorbar(sizes, [100 * m for m, _ in means], yerr=[100 * (e or 0) for _, e in means], marker="o",
                    capsize=3, label=LABELS[name], linewidth=3 if name == "delivered" else 1.5)
    base = arms.get("base")
    if base:
        ax.plot(sizes, [100 * mean_se([r1(d, "trained") for d in by_size(base, s)])[0] for s in sizes], "--",
                color="grey", label="trained, the cars196 recipe's PCA 128-d head")
    ax.set(xlabel="training classes (the draw's, validation included)", ylabel="test R@1 (98 unseen classes)",
           title=f"cars196 subsets, arm {data['arm']}: mean over draws (± SE)", xticks=sizes)
    ax.legend(fontsize=8)
    return save_png(fig, RESULTS / "small_data.png", dpi=100)


def log_mlflow(arms: dict[str, dict]) -> None:
    from bench.common import log_to_mlflow

    for name, data in arms.items():
        metrics = {}
        for size in (*SIZES, 98):
            ds = by_size(data, size)
            for cand in (*CANDIDATES, "delivered"):
                if ds:
                    metrics[f"n{size}.{cand}_recall@1"] = mean_se([r1(d, cand) for d in ds])[0]
        hits = [d["delivered"]["right"] for d in data["draws"]]
        metrics["hit_rate"] = sum(hits) / len(hits)
        children = [(f"n{d['classes']} d{d['draw']}", {"classes": d["classes"], "draw": d["draw"]},
                     {f"{c}_recall@1": r1(d, c) for c in (*CANDIDATES, "delivered")}) for d in data["draws"]]
        data["mlflow_run_id"] = log_to_mlflow("bench-small-data", name, {"arm": name, "label": data["label"],
                                                                          "rule": data["product_rule"]},
                                              metrics, [OUT / f"{name}.json", RESULTS / "small_data.png"],
                                              children=children)


def report(results) -> list[str]:
    arms = load_arms()
    lines = ["## Small data: a folder of tens of classes (bench_small)", ""]
    if not arms:
        return lines + [f"Not run yet: `{PY} -m bench.bench_small prepare`, then `train` and `score`.", ""]
    data = arms.get(ADOPTED) or next(iter(arms.values()))
    lines += [
        "What a new user brings: a folder of 10-50 classes. cars196 subsets of 10, 15, 25 and 50 training classes "
        "(5 fixed class draws each from classes 1-98; 15 % of a draw's classes hold out for validation, as `dcml run` "
        "splits a folder), always tested on the 98 official test classes 99-196. The pretrained features come from "
        "the whole network on images (160 px); the trained model is the fast mode (top 5 blocks on 4 cached views, "
        "10 epochs, one thread) at the epoch validation kept, its embeddings from the cache's eval view (float16 "
        "activations of the frozen lower part). Candidates: the raw features; their PCA-whitening (width and "
        "shrinkage chosen, and the step from raw decided, by 3-fold cross-validation over every labelled class of the "
        "draw: whitening needs no labels); the trained model; the trained model beside the kept features (equal "
        "weight, one model). *Right* (the hit rate) = the delivered model is at least the better of the trained model "
        "and the best no-training candidate on test.", "",
        f"Arm **{data['arm']}** ({data['label']}), every draw (test R@1 %):", "", *draws_table(data), "",
        "Goals of the small-data issue on this arm:", "", *[f"- {g}" for g in goals(data)], "",
        "Choice rules on the same draws (the rule decides only which candidate is delivered):", "",
        *rule_table(data), "",
        "Every arm (mean ± SE over draws; 98 classes = the full cars196 training set, 3 seeds, the non-regression "
        "check of the cars196 recipe):", "", *arms_table(arms), "",
        f"Each arm against {ADOPTED} on the same draws (classes: trained + features / delivered, R@1 points): "
        + " — ".join(f"**{a}** {paired(arms, a)}" for a in arms if a != ADOPTED) + "."]
    lines += results.image("small_data.png", "test R@1 against the number of training classes")
    cmds = sorted({d.get("command") for d in arms.values() if d.get("command")})
    lines += ["", f"Commands: `{PY} -m bench.bench_small prepare`; `{PY} -m bench.bench_small train --arm ARM "
                  "--sizes 10,15,25,50 --draws 0,1,2,3,4`; " + "; ".join(f"`{c}`" for c in cmds), ""]
    return lines
