"""Divide and conquer against one learner, at equal images trained, seed by seed.

For one data set, every configuration trains the same budget: ``epochs`` epochs
of the same number of batches (the K=1 epoch, ``batches_per_epoch``), re-
clustering every ``recluster_every`` epochs, then ``finetune_epochs`` epochs
of K=1 fine-tuning on all data, through the stages' public ``run`` functions:

* ``k1``: one learner, the whole embedding (plain metric learning);
* ``k2-ref`` / ``k4-ref``: the shared mode as the reference code trains it: K
  learners on K clusters, each loss on its own slice for the first 8/19 of the
  epochs, then on the whole embedding, batches still from one cluster each;
* ``k2`` / ``k4`` / ``k8``: slices alone until fine-tuning (dcml before the
  reference schedule: ``whole_embedding_after=1``);
* ``k4-ctrl-a``: control (a), one embedding (no slices) trained on batches from
  K=4 clusters: the hard negatives alone;
* ``k4-ctrl-b``: control (b), the reference schedule on K=4 random groups of
  whole classes: slices without cluster structure;
* ``k4-masks``: try (c), the journal version's learned masks (one embedding,
  learner k weights it with its own ReLU mask, an orthogonality penalty) on
  the reference schedule;
* ``k4-ref-pca-shared``: try (d), the reference schedule with every slice's head
  dealt from one PCA of all training features (K=1's head), not its cluster's;
* ``k4-parallel``: one worker per cluster (own backbone copy), merge, fine-tune.

Each stage keeps the epoch with the best validation MAP@R (a class-disjoint
split of the training classes); the test classes only feed the final
evaluation and the curves. Results: bench/results/dc/<dataset>-<config>-s<seed>.json.

    python -m bench.bench_dc --dataset omniglot --configs k1,k4 --seeds 0,1,2
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from bench.common import RESULTS, WORK, log, log_to_mlflow, result_header, save_png, set_threads, write_result
from bench.report import PY, Results, pct

OUT = RESULTS / "dc"
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"

DATASETS = {
    # Omniglot background set: 964 characters x 20 drawings; a small CNN from scratch.
    "omniglot": {
        "ingest": {"dataset": "folder", "data_root": str(SHARED / "omniglot"), "split_mode": "class-disjoint",
                   "val_fraction": 0.15},
        "model": {"backbone": "small_cnn", "weights": "none", "image_size": 28, "embedding_dim": 128,
                  "train_blocks": -1, "freeze_bn": "false"},
        "training": {"loss": "margin", "classes_per_batch": 32, "images_per_class": 4, "lr_backbone": 1e-3,
                     "lr_embedding": 1e-3, "schedule": "cosine", "select_on": "map@r", "eval_every": 2},
        "epochs": 40, "finetune_epochs": 4, "recluster_every": 2, "fast_views": 0, "batch_size": 256,
    },
    # Stanford Cars (training half): EfficientNet-Lite0 with the recipe of bench_recipe (fast mode).
    "cars196": {
        "ingest": {"dataset": "cars196", "data_root": str(SHARED / "cars196"), "split_mode": "official",
                   "val_fraction": 0.15},
        "model": {"backbone": "efficientnet_lite0", "weights": "imagenet", "image_size": 160, "embedding_dim": 128,
                  "train_blocks": 5, "freeze_bn": "true"},
        "training": {"loss": "margin", "classes_per_batch": 8, "images_per_class": 4, "lr_backbone": 1e-4,
                     "lr_embedding": 1e-4, "schedule": "constant", "head_init": "pca", "select_on": "map@r",
                     "eval_every": 2},
        "epochs": 10, "finetune_epochs": 2, "recluster_every": 2, "fast_views": 4, "batch_size": 64,
    },
}
REFERENCE = {"whole_embedding_after": 8 / 19}
SLICES_ALONE = {"whole_embedding_after": 1.0}
CONFIGS = {
    "k1": {"k": 1, "mode": "shared", "label": "K=1 (one learner)"},
    "k2-ref": {"k": 2, "mode": "shared", "label": "K=2 reference schedule", "train": REFERENCE},
    "k4-ref": {"k": 4, "mode": "shared", "label": "K=4 reference schedule", "train": REFERENCE},
    "k2": {"k": 2, "mode": "shared", "label": "K=2 slices alone", "train": SLICES_ALONE},
    "k4": {"k": 4, "mode": "shared", "label": "K=4 slices alone", "train": SLICES_ALONE},
    "k8": {"k": 8, "mode": "shared", "label": "K=8 slices alone", "train": SLICES_ALONE},
    "k4-ctrl-a": {"k": 4, "mode": "shared", "label": "control (a): K=4 cluster batches, no slices",
                  "train": {"embedding_slices": False}},
    "k4-ctrl-b": {"k": 4, "mode": "shared", "label": "control (b): K=4 random class groups, reference schedule",
                  "train": {**REFERENCE, "cluster_grouping": "random"}, "cluster": {"cluster_grouping": "random"}},
    "k4-masks": {"k": 4, "mode": "shared", "label": "(c) K=4 learned masks, reference schedule",
                 "train": {**REFERENCE, "embedding_masks": True}},
    "k4-ref-pca-shared": {"k": 4, "mode": "shared", "label": "(d) K=4 reference schedule, slices from one shared PCA",
                          "train": {**REFERENCE, "head_init": "pca-shared"}},
    "k4-parallel": {"k": 4, "mode": "parallel", "label": "K=4 parallel (workers, merge)"},
}
CURVE_KEYS = ("epoch", "phase", "loss", "val_recall@1", "val_map@r", "recall@1", "map@r", "images", "seconds",
              "num_slices", "cluster_sizes")


def prepared(dataset: str, spec: dict, seed: int) -> dict:
    """Manifest, features (of the untrained or pretrained backbone) and fast-mode cache, built once."""
    from components.extract.stage import run as extract
    from components.ingest.stage import run as ingest
    from dcml.contracts.params import STAGE_NAMES

    folder = WORK / "dc" / dataset
    manifest = folder / "manifest.parquet"
    if not manifest.is_file():
        rename = STAGE_NAMES["ingest"]
        ingest(out=manifest, **{rename.get(k, k): v for k, v in spec["ingest"].items()})
    features = folder / f"features-s{seed}.parquet"
    cache = folder / f"cache-s{seed}" if spec["fast_views"] else None
    if not features.is_file():
        model = spec["model"]
        extract(manifest=manifest, out=features, backbone=model["backbone"], weights=model["weights"],
                image_size=model["image_size"], train_blocks=model["train_blocks"], views=spec["fast_views"],
                batch_size=spec["batch_size"], seed=seed, activations_out=cache)
    return {"manifest": manifest, "features": features, "activations": cache}


def natural_batches(manifest: Path, spec: dict) -> int:
    """Batches of one K=1 epoch: the budget every configuration gets per epoch."""
    from dcml.algorithm.samplers import ClusterBatchSampler
    from dcml.algorithm.training import dense_labels
    from dcml.contracts import manifest as manifest_lib

    labels = dense_labels(manifest_lib.read(manifest).split("train")["label"].to_numpy())
    t = spec["training"]
    return len(ClusterBatchSampler(labels, None, t["classes_per_batch"], t["images_per_class"]))


def curves(record: dict, phase: str) -> list[dict]:
    return [{**{k: h.get(k) for k in CURVE_KEYS if k in h}, "stage": phase} for h in record["history"]]


def run_config(dataset: str, config: str, seed: int, spec: dict, work: Path) -> dict:
    from components.cluster.stage import run as cluster
    from components.evaluate.stage import run as evaluate
    from components.finetune import stage as finetune_stage
    from components.train.stage import run as train

    c = CONFIGS[config]
    inputs = prepared(dataset, spec, seed)
    batches = natural_batches(inputs["manifest"], spec)
    hyper = {**spec["model"], **spec["training"], "seed": seed}
    finetune_hyper = {k: v for k, v in hyper.items() if k in finetune_stage.PARAMS}
    common = {"manifest": str(inputs["manifest"]), "activations": inputs["activations"]}
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    records, history = [], []
    clusters = None
    if c["k"] > 1:
        clusters = work / "clusters.parquet"
        cluster(features=inputs["features"], out=clusters, k=c["k"], seed=seed, **c.get("cluster", {}))
    if c["mode"] == "shared":
        rec = train(out=str(work / "train.pt"), clusters=clusters, num_slices=c["k"], mode="shared",
                    epochs=spec["epochs"], recluster_every=spec["recluster_every"], batches_per_epoch=batches,
                    **common, **{**hyper, **c.get("train", {})})
        records.append(rec)
        history += curves(rec, "train")
        checkpoints = [str(work / "train.pt")]
    else:
        checkpoints = []
        # Each worker gets 1/K of the K=1 epoch (equal images overall); its test
        # curve would score a model with K-1 untrained slices, so it is not drawn.
        for k in range(c["k"]):
            path = work / f"worker{k}.pt"
            rec = train(out=str(path), clusters=clusters, mode="worker", cluster_id=k, epochs=spec["epochs"],
                        batches_per_epoch=-(-batches // c["k"]), **common, **{**hyper, "eval_every": 0})
            records.append(rec)
            history += curves(rec, f"worker{k}")
            checkpoints.append(str(path))
    # baseline_candidate off: the configurations' training is compared, never the pretrained features.
    ft = finetune_stage.run(out=str(work / "model.pt"), checkpoints=checkpoints, epochs=spec["finetune_epochs"],
                            baseline_candidate=False,
                            batches_per_epoch=batches, **common, **finetune_hyper)
    records.append(ft)
    history += curves(ft, "finetune")
    train_s = sum(r["duration_s"] for r in records)
    evaluated = evaluate(out=str(work / "metrics.json"), model=str(work / "model.pt"),
                         manifest=str(inputs["manifest"]), ks=(1, 2, 4, 8))
    images = sum(h.get("images") or 0 for h in history)
    return {"config": config, "label": c["label"], "k": c["k"], "mode": c["mode"], "seed": seed,
            "metrics": evaluated["metrics"], "history": history, "images_trained": images,
            "batches_per_epoch": batches, "train_stage_s": round(train_s, 1),
            "wall_s": round(time.perf_counter() - t0, 1),
            "kept": [{"stage": r["stage"], "name": r.get("name"), "best_epoch": r["metrics"].get("best_epoch")}
                     for r in records]}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="omniglot", choices=sorted(DATASETS))
    parser.add_argument("--configs", default="k1,k4", help=f"comma-separated: {', '.join(CONFIGS)}")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--epochs", type=int, default=None, help="override the data set's epochs")
    parser.add_argument("--tag", default="", help="suffix of the result names (a budget variant)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--force", action="store_true")
    parser.add_argument("--log-mlflow", action="store_true", help="log every stored result of --dataset/--tag to "
                        "MLflow (experiment bench-dc) after the runs")
    args = parser.parse_args(argv)
    set_threads(args.threads)
    spec = dict(DATASETS[args.dataset])
    if args.epochs:
        spec["epochs"] = args.epochs
    for seed in [int(s) for s in args.seeds.split(",")]:
        for config in [c.strip() for c in args.configs.split(",") if c.strip()]:
            name = f"{args.dataset}-{config}{('-' + args.tag) if args.tag else ''}-s{seed}"
            dest = OUT / f"{name}.json"
            if dest.is_file() and not args.force:
                log(f"{dest.name} exists; skipped")
                continue
            header = result_header("dc", "bench.bench_dc", argv)
            log(f"{name}: {CONFIGS[config]['label']}, {spec['epochs']} + {spec['finetune_epochs']} epochs")
            result = run_config(args.dataset, config, seed, spec, WORK / "dc" / args.dataset / name)
            write_result(dest, {**header, "dataset": args.dataset, "tag": args.tag, "spec": spec, **result})
            m = result["metrics"]
            log(f"{name}: R@1 {m['recall@1']:.4f} MAP@R {m['map@r']:.4f} ({result['images_trained']} images trained)")
            plot(args.dataset, args.tag)
            plot_paired(args.dataset, args.tag)
    if args.log_mlflow:
        log_results(args.dataset, args.tag)


def log_results(dataset: str, tag: str) -> None:
    """Every stored result of (dataset, tag) as an MLflow run of the experiment bench-dc (one nested run
    per seed), with the curves and the paired-difference plot."""
    rows = collect(dataset, tag)
    plots = [p for p in (plot(dataset, tag), plot_paired(dataset, tag)) if p is not None]
    for config, by_seed in rows.items():
        d, se, seeds = paired(rows, config)
        metrics = {"recall@1": sum(r["metrics"]["recall@1"] for r in by_seed.values()) / len(by_seed),
                   "map@r": sum(r["metrics"]["map@r"] for r in by_seed.values()) / len(by_seed)}
        if d is not None and config != "k1":
            metrics["recall@1_minus_k1"] = d
        children = [(f"seed {s}", {"seed": s}, r["metrics"]) for s, r in sorted(by_seed.items())]
        log_to_mlflow("bench-dc", f"{dataset} {tag} {config}", {"config": config, "label": CONFIGS[config]["label"],
                      "dataset": dataset, "tag": tag, "seeds": sorted(by_seed)}, metrics, plots, children=children)


# ----------------------------------------------------------------- report

def collect(dataset: str, tag: str) -> dict[str, dict[int, dict]]:
    """{config: {seed: result}} of one data set and budget tag."""
    import json

    out: dict[str, dict[int, dict]] = {}
    for path in sorted(OUT.glob(f"{dataset}-*-s*.json")):
        result = json.loads(path.read_text())
        if result.get("tag", "") == tag and result.get("dataset") == dataset:
            out.setdefault(result["config"], {})[result["seed"]] = result
    return out


def tags(dataset: str) -> list[str]:
    import json

    return sorted({json.loads(p.read_text()).get("tag", "") for p in OUT.glob(f"{dataset}-*-s*.json")})


def paired(rows: dict[str, dict[int, dict]], config: str, metric: str = "recall@1"):
    """Mean and standard error of (config - k1) over the seeds both have, and those seeds."""
    import statistics

    seeds = sorted(set(rows.get(config, {})) & set(rows.get("k1", {})))
    diffs = [rows[config][s]["metrics"][metric] - rows["k1"][s]["metrics"][metric] for s in seeds]
    if not diffs:
        return None, None, seeds
    se = statistics.stdev(diffs) / len(diffs) ** 0.5 if len(diffs) > 1 else None
    return statistics.fmean(diffs), se, seeds


def interval(mean: float, se: float | None, n: int) -> tuple[float, float] | None:
    """The 95 % interval of a paired mean difference (Student's t with n-1 degrees of freedom)."""
    if se is None or n < 2:
        return None
    from scipy.stats import t

    half = float(t.ppf(0.975, n - 1)) * se
    return mean - half, mean + half


def beats_k1(mean: float | None, se: float | None, n: int) -> bool:
    """The goal stated before measuring: >= +1.5 R@1 points with the 95 % interval excluding 0."""
    ci = interval(mean, se, n) if mean is not None else None
    return ci is not None and mean >= 0.015 and ci[0] > 0


def plot_paired(dataset: str, tag: str) -> Path | None:
    """Paired R@1 difference to K=1 per configuration, with its 95 % interval and every seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = collect(dataset, tag)
    configs = [c for c in CONFIGS if c in rows and c != "k1" and paired(rows, c)[0] is not None]
    if not configs or "k1" not in rows:
        return None
    fig, ax = plt.subplots(figsize=(8, 0.6 * len(configs) + 1.5))
    for i, config in enumerate(configs):
        d, se, seeds = paired(rows, config)
        ci = interval(d, se, len(seeds))
        each = [100 * (rows[config][s]["metrics"]["recall@1"] - rows["k1"][s]["metrics"]["recall@1"]) for s in seeds]
        ax.scatter(each, [i] * len(each), color="grey", s=12, zorder=2)
        if ci is not None:
            ax.plot([100 * ci[0], 100 * ci[1]], [i, i], color="C0", lw=3, zorder=1)
        ax.scatter([100 * d], [i], color="C3", s=40, zorder=3)
        ax.text(100 * d, i - 0.22, f"{100 * d:+.1f} ({len(seeds)} seed{'s' if len(seeds) > 1 else ''})",
                ha="center", fontsize=8)
    ax.axvline(0, color="black", lw=0.8)
    ax.axvline(1.5, color="green", lw=0.8, ls="--", label="goal +1.5")
    ax.set_ylim(len(configs) - 0.4, -0.6)  # the table's order, top down, with room for the labels
    ax.set_yticks(range(len(configs)), [CONFIGS[c]["label"] for c in configs], fontsize=8)
    ax.set(xlabel="test R@1 minus K=1's, same seed (points); bar: 95 % interval",
           title=f"{dataset}: paired difference to one learner{' (' + tag + ')' if tag else ''}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_png(fig, RESULTS / f"dc_{dataset}{'_' + tag if tag else ''}_paired.png", dpi=100)


def plot(dataset: str, tag: str) -> Path | None:
    """Test Recall@1 per epoch: K=1 and the shared-mode configurations (seed 0), fine-tuning appended."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = collect(dataset, tag)
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(8, 5))
    for config, by_seed in rows.items():
        result = by_seed[min(by_seed)]
        points, offset = [], 0
        for stage in ("train", "finetune"):
            curve = [(h["epoch"], h["recall@1"]) for h in result["history"]
                     if h.get("stage") == stage and h.get("recall@1") is not None]
            points += [(offset + e, r) for e, r in curve if not (stage == "finetune" and e == 0)]
            offset = max([e for e, _ in points], default=0) if stage == "train" else offset
        if points:
            ax.plot(*zip(*points), label=f"{config} (seed {min(by_seed)})", marker=".")
    ax.set(xlabel="epoch (training, then fine-tuning)", ylabel="test Recall@1",
           title=f"{dataset}: divide and conquer vs one learner{' (' + tag + ')' if tag else ''}")
    ax.legend(fontsize=8)
    return save_png(fig, RESULTS / f"dc_{dataset}{'_' + tag if tag else ''}.png", dpi=100)


OMNIGLOT_CONFIGS = "k1,k2-ref,k4-ref,k2,k4,k4-ctrl-a,k4-ctrl-b"
CARS_CONFIGS = "k1,k4-ref,k4-ctrl-a"


def commands(quick: bool, threads: int) -> list[list[str]]:
    if not (SHARED / "omniglot").is_dir():
        return []
    if quick:
        return [[PY, "-m", "bench.bench_dc", "--configs", "k1,k4", "--epochs", "2", "--tag", "quick",
                 "--threads", str(threads)]]
    return [[PY, "-m", "bench.bench_dc", "--configs", OMNIGLOT_CONFIGS, "--seeds", "0,1,2", "--epochs", "16",
             "--tag", "e16", "--threads", str(threads)],
            [PY, "-m", "bench.bench_dc", "--dataset", "cars196", "--configs", CARS_CONFIGS, "--seeds", "0,1,2",
             "--tag", "r10", "--threads", str(threads), "--log-mlflow"]]


def report(results: Results) -> list[str]:
    import statistics

    lines = ["## Divide and conquer vs one learner at equal images (bench_dc)", ""]
    found = [(d, t) for d in DATASETS for t in tags(d) if t != "quick" or results.quick]
    if not found:
        return lines + [f"Not run yet: `{PY} -m bench.bench_dc --dataset omniglot --configs "
                        f"{','.join(CONFIGS)} --seeds 0,1,2`.", ""]
    lines += ["Every configuration trains the same number of batches per epoch (those of one K=1 epoch; parallel "
              "workers split them), re-clusters every 2 epochs, then fine-tunes K=1 on all data; each stage keeps "
              "the epoch with the best validation MAP@R (class-disjoint validation classes), and the kept model "
              "is evaluated on the test classes. Differences are paired by seed (same split, same initial "
              "model): mean ± standard error, and the 95 % interval (Student's t). The goal, stated before "
              "measuring: a configuration beats K=1 when it is at least +1.5 R@1 points with the interval "
              "excluding 0. 'Reference schedule': each learner's loss on its own slice for the first 8/19 of the "
              "epochs, then on the whole embedding, batches still from one cluster each (the reference code); "
              "'slices alone': the slice until fine-tuning (dcml's schedule before). One thread per run.", ""]
    for dataset, tag in found:
        rows = collect(dataset, tag)
        spec = next(iter(next(iter(rows.values())).values()))["spec"]
        model = spec["model"]
        lines += [f"### {dataset}, {spec['epochs']} + {spec['finetune_epochs']} epochs ({tag or 'default budget'})", "",
                  f"{model['backbone']} ({model['weights']} weights), {model['image_size']} px, "
                  f"{model['embedding_dim']}-d, {spec['training']['loss']} loss, P={spec['training']['classes_per_batch']}"
                  f" x M={spec['training']['images_per_class']}, lr {spec['training']['lr_backbone']:g}, "
                  f"{spec['training']['schedule']} schedule.", "",
                  "| configuration | seeds | R@1 | MAP@R | R@1 - K=1 (paired) | 95 % interval | MAP@R - K=1 (paired) "
                  "| images trained |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|"]
        best = None
        for config in [c for c in CONFIGS if c in rows]:
            by_seed = rows[config]
            r1 = [r["metrics"]["recall@1"] for r in by_seed.values()]
            mapr = [r["metrics"]["map@r"] for r in by_seed.values()]
            sd = (lambda v: statistics.stdev(v) if len(v) > 1 else None)
            d1, se1, seeds = paired(rows, config)
            d2, se2, _ = paired(rows, config, "map@r")
            diff = "—" if config == "k1" or d1 is None else (
                f"{100 * d1:+.1f}" + (f" ± {100 * se1:.1f}" if se1 is not None else "") + f" (seeds {seeds})")
            diff2 = "—" if config == "k1" or d2 is None else (
                f"{100 * d2:+.2f}" + (f" ± {100 * se2:.2f}" if se2 is not None else ""))
            ci = interval(d1, se1, len(seeds)) if config != "k1" and d1 is not None else None
            ci_text = f"[{100 * ci[0]:+.1f}, {100 * ci[1]:+.1f}]" if ci else "—"
            images = statistics.fmean(r["images_trained"] for r in by_seed.values())
            lines.append(f"| {CONFIGS[config]['label']} | {len(by_seed)} | {pct(statistics.fmean(r1), sd(r1))} | "
                         f"{pct(statistics.fmean(mapr), sd(mapr), 2)} | {diff} | {ci_text} | {diff2} | {images:,.0f} |")
            if config != "k1" and d1 is not None and (best is None or d1 > best[1]):
                best = (config, d1, se1, len(seeds))
        if best and len(rows.get("k1", {})) > 1:
            config, d, se, n = best
            spread = f" ± {100 * se:.1f}" if se is not None else ""
            lines += ["", f"Best K>1: {CONFIGS[config]['label']}, {100 * d:+.1f}{spread} R@1 points over K=1 "
                          f"({n} paired seed{'s' if n > 1 else ''}). Goal (>= +1.5, 95 % interval above 0): "
                          + ("**met**." if beats_k1(d, se, n) else "**not met**.")]
        lines += results.image(f"dc_{dataset}{'_' + tag if tag else ''}.png", f"{dataset} test Recall@1 per epoch")
        lines += results.image(f"dc_{dataset}{'_' + tag if tag else ''}_paired.png",
                               f"{dataset} paired difference to K=1")
        lines += [""]
    missing = [d for d in DATASETS if not any(d == f for f, _ in found)]
    for dataset in missing:
        spec = DATASETS[dataset]
        lines += [f"### {dataset}", "", f"Not run yet ({spec['epochs']} + {spec['finetune_epochs']} epochs per "
                  "configuration): "
                  f"`{PY} -m bench.bench_dc --dataset {dataset} --configs {CARS_CONFIGS} --seeds 0,1,2 --tag r10`.", ""]
    commands = sorted({r.get("command") for d, t in found for by in collect(d, t).values() for r in by.values()
                       if r.get("command")})
    lines += ["Commands: " + "; ".join(f"`{c}`" for c in commands), ""]
    return lines


if __name__ == "__main__":
    main()
