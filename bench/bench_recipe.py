"""Which training recipe makes training beat the pretrained backbone: one factor at a time.

Every row is one K=1 training run through the stages' public ``run`` functions
(ingest with a class-disjoint validation split, extract with the fast mode's
cache, train, evaluate), changing one setting of the base recipe (or a named
combination). The training stage keeps the epoch with the best validation
R@1 (the initial model included); the test classes only ever feed the curves
and the final evaluation, which runs the whole network on images.

    python -m bench.bench_recipe --rows base,random-head,size160 --seeds 0
    python -m bench.bench_recipe --rows pretrained

writes bench/results/recipe/<dataset>-<row>-s<seed>.json per run (with the
per-epoch validation and test curves), so several processes can run rows side
by side; ``--cache-only`` builds the activation caches the rows need first.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from bench.common import RESULTS, WORK, log, result_header, save_png, set_threads, write_result
from bench.report import PY, Results, num, pct

OUT = RESULTS / "recipe"
DATASETS = {
    "cars196": {"root": Path(__file__).resolve().parents[2] / "shared" / "data" / "cars196", "split_mode": "official"},
}

# The base recipe: what the measurements pointed at (top 5 MBConv
# blocks + head trained from cached activations, head from principal components).
BASE = {
    "backbone": "efficientnet_lite0", "weights": "imagenet", "image_size": 128, "embedding_dim": 128,
    "train_blocks": 5, "views": 4, "fast": True, "loss": "margin", "miner": "auto", "margin": None,
    "classes_per_batch": 8, "images_per_class": 4, "lr_backbone": 1e-4, "lr_embedding": 1e-4, "lr_proxies": None,
    "weight_decay": 1e-4, "warmup_epochs": 0, "schedule": "constant", "head_init": "pca", "freeze_bn": True,
    "epochs": 10, "select_on": "recall@1", "patience": 0, "val_fraction": 0.15, "deliver": False, "fusion": True,
}
# The head the small-data benchmark adopted (whitened pretrained features, 512-d), 160 px, and the model a run
# delivers (``deliver``: the run's choice with the trained model fused beside the kept features).
WHITE = {"image_size": 160, "head_init": "whiten", "embedding_dim": 512, "deliver": True}

ROWS: dict[str, dict] = {
    "pretrained": {"label": "pretrained features, no training"},
    "base": {"label": "base: 128 px, top 5 blocks, margin, lr 1e-4/1e-4, PCA head, 8x4, 128-d"},
    "random-head": {"label": "head: random (Xavier) init", "head_init": "random"},
    "size160": {"label": "image size 160 (the files' short side)", "image_size": 160},
    "ms": {"label": "loss: multi-similarity (+ its miner)", "loss": "multi_similarity"},
    "proxy-anchor": {"label": "loss: ProxyAnchor (proxies lr 1e-2)", "loss": "proxy_anchor", "lr_proxies": 1e-2},
    "lr-bb3e-5": {"label": "backbone lr 3e-5", "lr_backbone": 3e-5},
    "lr-bb3e-4": {"label": "backbone lr 3e-4", "lr_backbone": 3e-4},
    "lr-emb1e-3": {"label": "head lr 1e-3", "lr_embedding": 1e-3},
    "lr-emb1e-5": {"label": "head lr 1e-5", "lr_embedding": 1e-5},
    "warmup1": {"label": "warm-up: 1 epoch head only", "warmup_epochs": 1},
    "cosine": {"label": "schedule: cosine decay", "schedule": "cosine"},
    "pm16x4": {"label": "batch: P=16 x M=4", "classes_per_batch": 16},
    "pm4x8": {"label": "batch: P=4 x M=8", "classes_per_batch": 4, "images_per_class": 8},
    "bn-trained": {"label": "BatchNorm trained (not frozen)", "freeze_bn": False},
    "emb512": {"label": "embedding 512-d", "embedding_dim": 512},
    "emb64": {"label": "embedding 64-d", "embedding_dim": 64},
    "blocks2": {"label": "train top 2 blocks", "train_blocks": 2},
    "blocks9": {"label": "train top 9 blocks", "train_blocks": 9},
    "blocks0": {"label": "train the head only (backbone frozen)", "train_blocks": 0},
    "views8": {"label": "8 cached views per image", "views": 8},
    "whole": {"label": "whole network on images, all blocks train", "fast": False, "train_blocks": -1},
    "images-top5": {"label": "top 5 blocks on images (no cache)", "fast": False},
    "w512": {"label": "160 px, whitened 512-d head, delivered with fusion", **WHITE},
    "w512-e20": {"label": "160 px, whitened 512-d head, 20 epochs, delivered with fusion", **WHITE, "epochs": 20},
    "w512-cos20": {"label": "160 px, whitened 512-d head, 20 epochs cosine, delivered with fusion", **WHITE,
                   "epochs": 20, "schedule": "cosine"},
    "w512-whole": {"label": "whole network on images, whitened 512-d head, 10 epochs cosine, delivered with fusion",
                   **WHITE, "fast": False, "train_blocks": -1, "schedule": "cosine"},
}


def row_config(name: str, extra: dict | None = None) -> dict:
    if name not in ROWS:
        raise SystemExit(f"unknown row {name!r}; known: {', '.join(ROWS)}")
    cfg = {**BASE, **{k: v for k, v in ROWS[name].items() if k != "label"}, **(extra or {})}
    cfg["label"] = ROWS[name]["label"]
    return cfg


def manifest_path(dataset: str, val_fraction: float) -> Path:
    from components.ingest.stage import run as ingest

    dest = WORK / "recipe" / f"{dataset}-val{val_fraction:g}.parquet"
    if not dest.is_file():
        spec = DATASETS[dataset]
        ingest(dataset=dataset, out=dest, root=str(spec["root"]), split_mode=spec["split_mode"],
               val_fraction=val_fraction)
    return dest


def cache_path(dataset: str, cfg: dict, manifest: Path) -> Path | None:
    """The fast mode's cache for this backbone / size / split point / views (built once)."""
    from components.extract.stage import run as extract

    if not cfg["fast"]:
        return None
    name = f"{dataset}-{cfg['backbone']}-{cfg['image_size']}px-top{cfg['train_blocks']}-v{cfg['views']}"
    dest = WORK / "recipe" / "caches" / name
    if not (dest / "rows.parquet").is_file():
        log(f"building cache {name}")
        extract(manifest=manifest, out=dest.with_suffix(".features.parquet"), backbone=cfg["backbone"],
                weights=cfg["weights"], image_size=cfg["image_size"], batch_size=64, views=cfg["views"],
                train_blocks=cfg["train_blocks"], activations_out=dest)
    return dest


def run_pretrained(dataset: str, cfg: dict, manifest: Path, size: int) -> dict:
    from dcml.contracts import manifest as manifest_lib
    from dcml.algorithm.clustering import l2_normalize
    from dcml.algorithm.inference import compute_vectors
    from dcml.algorithm.metrics import evaluate_embeddings
    from dcml.algorithm.models import build_model

    man = manifest_lib.read(manifest)
    test = man.split("test")
    model = build_model({"backbone": cfg["backbone"], "weights": cfg["weights"], "image_size": size}).eval()
    features = compute_vectors(model, man, test, kind="features", batch_size=64, desc=f"pretrained {size}px")
    metrics = evaluate_embeddings(l2_normalize(features), test["label"].to_numpy(), ks=(1, 2, 4, 8))
    return {"metrics": {k: float(v) for k, v in metrics.items()}, "image_size": size}


def run_row(dataset: str, name: str, seed: int, extra: dict, tag: str) -> dict:
    from components.evaluate.stage import run as evaluate
    from components.train.stage import run as train

    cfg = row_config(name, extra)
    manifest = manifest_path(dataset, cfg["val_fraction"])
    work = WORK / "recipe" / "runs" / f"{dataset}-{tag}-s{seed}"
    work.mkdir(parents=True, exist_ok=True)
    if name == "pretrained":
        return {"runs": [run_pretrained(dataset, cfg, manifest, size) for size in (128, 160)]}
    cache = cache_path(dataset, cfg, manifest)
    t0 = time.perf_counter()
    record = train(manifest=str(manifest), out=str(work / "model.pt"), mode="shared", activations=cache,
                   backbone=cfg["backbone"], weights=cfg["weights"], image_size=cfg["image_size"],
                   embedding_dim=cfg["embedding_dim"], num_slices=1, train_blocks=cfg["train_blocks"],
                   loss=cfg["loss"], margin=cfg["margin"], miner=cfg["miner"],
                   classes_per_batch=cfg["classes_per_batch"], images_per_class=cfg["images_per_class"],
                   lr_backbone=cfg["lr_backbone"], lr_embedding=cfg["lr_embedding"], lr_proxies=cfg["lr_proxies"],
                   weight_decay=cfg["weight_decay"], epochs=cfg["epochs"], recluster_every=0, eval_every=1,
                   freeze_bn=cfg["freeze_bn"], head_init=cfg["head_init"], warmup_epochs=cfg["warmup_epochs"],
                   schedule=cfg["schedule"], select_on=cfg["select_on"], patience=cfg["patience"], seed=seed,
                   resume=True, work_dir=str(work))
    wall = time.perf_counter() - t0
    evaluated = evaluate(out=str(work / "metrics.json"), model=str(work / "model.pt"), manifest=str(manifest),
                         ks=(1, 2, 4, 8), batch_size=64)
    history = record["history"]
    trained = [h for h in history if h["epoch"] > 0]
    delivered = deliver(cfg, manifest, work, cache, seed) if cfg.get("deliver") else {}
    return {
        **delivered,
        "cache_build_s": cache_build_s(cache),
        "config": cfg,
        "metrics": evaluated["metrics"],
        "best_epoch": record["metrics"].get("best_epoch"),
        "curves": [{k: h.get(k) for k in ("epoch", "loss", "val_recall@1", "val_map@r", "recall@1", "map@r",
                                            "seconds", "images_per_s")} for h in history],
        "train_s": round(sum(h["seconds"] for h in trained), 1),
        "train_wall_s": round(wall, 1),
        "images_per_s": round(sum(h["images"] for h in trained) / max(sum(h["seconds"] for h in trained), 1e-9), 1),
    }


def deliver(cfg: dict, manifest: Path, work: Path, cache: Path | None, seed: int) -> dict:
    """What a K=1 run of the pipeline hands over for the trained ``work/model.pt``: the finetune stage with no
    epochs, i.e. the run's noise-aware choice among the pretrained features, their whitening, the trained model
    and (``fusion``) the trained model beside the kept features (dcml.algorithm.baseline), evaluated like the
    trained model (whole network on the test images)."""
    from components.evaluate.stage import run as evaluate
    from components.finetune.stage import run as finetune

    t0 = time.perf_counter()
    record = finetune(manifest=str(manifest), checkpoints=[str(work / "model.pt")], out=str(work / "delivered.pt"),
                      activations=str(cache) if cache else None, epochs=0, baseline_candidate=True,
                      fusion=bool(cfg.get("fusion", True)), select_on=cfg["select_on"], seed=seed, resume=False)
    choose_s = time.perf_counter() - t0
    evaluated = evaluate(out=str(work / "delivered-metrics.json"), model=str(work / "delivered.pt"),
                         manifest=str(manifest), ks=(1, 2, 4, 8), batch_size=64)
    choice = {k: v for k, v in record["metrics"].items()
              if k.startswith(("choice_", "fused_val_", "trained_val_", "whitened_val_", "pretrained_val_"))
              or k in ("delivered", "val_classes")}
    return {"delivered": {"candidate": record["metrics"].get("delivered"), "metrics": evaluated["metrics"],
                          "choice": choice, "choose_s": round(choose_s, 1)}}


def cache_build_s(cache: Path | None) -> float | None:
    """Seconds the extract stage took to build the fast mode's cache (its record), reported beside training."""
    import json

    import pyarrow.parquet as pq

    source = cache and cache.with_suffix(".features.parquet")
    if not source or not source.is_file():
        return None
    meta = (pq.read_metadata(source).metadata or {}).get(b"dcml")
    return json.loads(meta)["record"].get("duration_s") if meta else None


def add_delivery(dataset: str, tag: str, seed: int, argv=None) -> None:
    """``--deliver``: the delivered model of a finished row whose trained model is still on disk (and the
    cache's build time where the result lacks it)."""
    import json

    dest = OUT / f"{dataset}-{tag}-s{seed}.json"
    result = json.loads(dest.read_text())
    work = WORK / "recipe" / "runs" / f"{dataset}-{tag}-s{seed}"
    cfg = {**result["config"], "deliver": True}
    manifest = manifest_path(dataset, cfg["val_fraction"])
    cache = cache_path(dataset, cfg, manifest)
    result.setdefault("cache_build_s", cache_build_s(cache))
    if "delivered" in result or not (work / "model.pt").is_file():
        log(f"{dest.name}: {'delivered already' if 'delivered' in result else 'no model.pt left'}")
        write_result(dest, result)
        return
    result.update(deliver(cfg, manifest, work, cache, seed))
    result["deliver_command"] = result_header("recipe", "bench.bench_recipe", argv)["command"]
    write_result(dest, result)
    m = result["delivered"]["metrics"]
    log(f"{tag} seed {seed}: delivered {result['delivered']['candidate']}: R@1 {m['recall@1']:.4f} "
        f"MAP@R {m['map@r']:.4f}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="cars196", choices=sorted(DATASETS))
    parser.add_argument("--rows", default="base", help=f"comma-separated rows: {', '.join(ROWS)}")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                        help="override a recipe setting for these rows (a combination row); needs --tag")
    parser.add_argument("--tag", default=None, help="name of the result (default: the row name)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cache-only", action="store_true", help="build the caches the rows need, then stop")
    parser.add_argument("--force", action="store_true", help="re-run rows whose result exists")
    parser.add_argument("--deliver", action="store_true",
                        help="add the delivered model (the run's choice, fusion) to finished rows; trains nothing")
    args = parser.parse_args(argv)
    set_threads(args.threads)
    extra = {}
    for item in args.sets:
        key, value = item.split("=", 1)
        kind = type(BASE.get(key)) if BASE.get(key) is not None else float
        extra[key] = (value.lower() in ("1", "true", "yes")) if kind is bool else kind(value)
    if extra and not args.tag:
        raise SystemExit("--set makes a new recipe: name it with --tag")
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    for name in rows:
        cfg = row_config(name, extra)
        if args.cache_only:
            if name != "pretrained":
                cache_path(args.dataset, cfg, manifest_path(args.dataset, cfg["val_fraction"]))
            continue
        for seed in [int(s) for s in args.seeds.split(",")]:
            tag = args.tag or name
            if args.deliver:
                add_delivery(args.dataset, tag, seed, argv)
                continue
            dest = OUT / f"{args.dataset}-{tag}-s{seed}.json"
            if dest.is_file() and not args.force:
                log(f"{dest.name} exists; skipped (--force re-runs it)")
                continue
            header = result_header("recipe", "bench.bench_recipe", argv)
            log(f"{args.dataset} {tag} seed {seed}: {cfg['label']}")
            result = run_row(args.dataset, name, seed, extra, tag)
            write_result(dest, {**header, "dataset": args.dataset, "row": name, "tag": tag, "seed": seed,
                                "label": cfg["label"], **result})
            m = result.get("metrics") or result["runs"][0]["metrics"]
            log(f"{tag} seed {seed}: R@1 {m['recall@1']:.4f} MAP@R {m['map@r']:.4f}")
            plot(args.dataset)
            plot_time(args.dataset)


# ----------------------------------------------------------------- report

WINNER = "w512-cos20"  # the recipe the cars196 preset takes (see the report)


def collect(dataset: str = "cars196") -> dict[str, list[dict]]:
    """Result files of ``dataset`` by tag, seeds in order."""
    import json

    out: dict[str, list[dict]] = {}
    for path in sorted(OUT.glob(f"{dataset}-*-s*.json")):
        result = json.loads(path.read_text())
        out.setdefault(result["tag"], []).append(result)
    return out


def _mean_std(values):
    import statistics

    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def plot(dataset: str = "cars196") -> Path | None:
    """Test Recall@1 per epoch of every row (seed 0), the pretrained features as lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = collect(dataset)
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(9, 5.5))
    for tag, results in rows.items():
        curve = [(c["epoch"], c["recall@1"]) for c in results[0].get("curves", []) if c.get("recall@1") is not None]
        if curve:
            width = 2.5 if tag in (WINNER, "base") else 1.0
            ax.plot(*zip(*curve), label=tag, linewidth=width)
    for run in (rows.get("pretrained") or [{}])[0].get("runs", []):
        ax.axhline(run["metrics"]["recall@1"], linestyle="--", color="grey", linewidth=1)
        ax.annotate(f"pretrained {run['image_size']} px", (0, run["metrics"]["recall@1"]), fontsize=8,
                    xytext=(2, 2), textcoords="offset points")
    ax.set(xlabel="epoch (0 = before training)", ylabel="test Recall@1", title=f"{dataset}: one factor at a time")
    ax.legend(fontsize=7, ncol=3)
    return save_png(fig, RESULTS / f"recipe_{dataset}.png", dpi=100)


def epoch_seconds(result: dict) -> float | None:
    """The run's median epoch time: its epochs cost the same work, so the median is what an epoch costs one
    thread when the machine's other core is not crowded (a busy spell lengthens a few epochs, not the median)."""
    import statistics

    times = [c["seconds"] for c in result.get("curves", []) if c["epoch"] > 0 and c.get("seconds")]
    return statistics.median(times) if times else None


def time_curve(result: dict) -> list[tuple[float, float]]:
    """(minutes of training at the median epoch time, test R@1) per evaluated epoch; epoch 0 at minute 0."""
    per_epoch = epoch_seconds(result) or 0.0
    return [(c["epoch"] * per_epoch / 60, c["recall@1"]) for c in result.get("curves", [])
            if c.get("recall@1") is not None]


def plot_time(dataset: str = "cars196") -> Path | None:
    """Time to quality: test R@1 against minutes of one-thread training, every row (seed 0); the delivered model
    of the rows that have one as a star at its kept epoch's minute."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = collect(dataset)
    fig, ax = plt.subplots(figsize=(9, 5.5))
    ax.set_prop_cycle(color=plt.cm.tab20.colors)
    for tag, results in rows.items():
        curve = time_curve(results[0])
        if len(curve) < 2:
            continue
        (line,) = ax.plot(*zip(*curve), label=tag, linewidth=2.5 if tag in (WINNER, "base") else 1.0)
        delivered = results[0].get("delivered")
        if delivered:
            kept = min(results[0].get("best_epoch") or 0, len(curve) - 1)
            ax.plot(curve[kept][0], delivered["metrics"]["recall@1"], marker="*", markersize=12,
                    color=line.get_color(), linestyle="none")
    for run in (rows.get("pretrained") or [{}])[0].get("runs", []):
        ax.axhline(run["metrics"]["recall@1"], linestyle="--", color="grey", linewidth=1)
    ax.axhline(0.60, linestyle=":", color="black", linewidth=1)
    ax.axvline(60, linestyle=":", color="black", linewidth=1)
    ax.set(xlabel="minutes of one-thread training (epochs x the run's median epoch time; evaluations not counted)",
           ylabel="test Recall@1",
           title=f"{dataset}: time to quality (line: trained model per epoch; star: the delivered model)")
    ax.legend(fontsize=7, ncol=3)
    return save_png(fig, RESULTS / f"recipe_{dataset}_time.png", dpi=100)


def winner_lines(rows: dict, pretrained: dict) -> list[str]:
    """The paragraph on the recipe the cars196 preset takes: what a run delivers, what it costs, the goal."""
    win = rows.get(WINNER)
    if not win or not pretrained:
        return []
    size = win[0]["config"]["image_size"]
    ref = pretrained.get(size) or pretrained[min(pretrained)]
    r1, mapr = _mean_std([r["metrics"]["recall@1"] for r in win]), _mean_std([r["metrics"]["map@r"] for r in win])
    shipped = [r["delivered"] for r in win if r.get("delivered")]
    d1 = _mean_std([d["metrics"]["recall@1"] for d in shipped])
    dmap = _mean_std([d["metrics"]["map@r"] for d in shipped])
    steady = max((epoch_seconds(r) or 0) * r["config"]["epochs"] for r in win) / 60
    measured = max(r.get("train_s", 0) for r in win) / 60
    cache = next((r["cache_build_s"] for r in win if r.get("cache_build_s")), None)
    label = ROWS[WINNER]["label"] if WINNER in ROWS else win[0]["label"]
    out = ["", f"**The recipe** (row {WINNER}, the cars196 preset): {label}. The trained model alone: R@1 "
               f"{pct(*r1)}, MAP@R {pct(*mapr, digits=2)} over {len(win)} seeds; the pretrained features at {size} px: "
               f"{pct(ref['recall@1'])} / {pct(ref['map@r'], digits=2)}."]
    if shipped:
        kinds = sorted({d["candidate"] for d in shipped})
        met = len(shipped) >= 3 and d1[0] >= 0.60 and steady <= 60
        out[-1] += (f" **What a run delivers** (the run's choice on its validation classes: {', '.join(kinds)}): R@1 "
                    f"{pct(*d1)}, MAP@R {pct(*dmap, digits=2)} over {len(shipped)} seeds "
                    f"(+{100 * (d1[0] - ref['recall@1']):.1f} R@1 points over the pretrained features). Training: "
                    f"{steady:.0f} min of one thread per run at the median epoch time (measured {measured:.0f} min "
                    "with the machine shared by other jobs)" + (f", plus the extract stage's cache of the frozen "
                    f"lower part, built once per dataset: {cache / 60:.0f} min" if cache else "") +
                    f". Goal: >= 60.0 R@1 mean over 3 seeds with <= 60 min of one-thread training: "
                    f"{'met' if met else 'not met'}.")
    return out


def commands(quick: bool, threads: int) -> list[list[str]]:
    if not DATASETS["cars196"]["root"].is_dir():
        return []
    rows = "pretrained,base" if quick else ",".join(ROWS)
    return [[PY, "-m", "bench.bench_recipe", "--rows", rows, "--threads", str(threads)],
            *([] if quick else [[PY, "-m", "bench.bench_recipe", "--rows", WINNER, "--seeds", "1,2",
                                 "--threads", str(threads)]])]


def report(results: Results) -> list[str]:
    lines = ["## Training recipe: cars196, one factor at a time (bench_recipe)", ""]
    rows = collect("cars196")
    if not rows:
        return lines + [f"Not run yet: `{PY} -m bench.bench_recipe --rows {','.join(ROWS)}`.", ""]
    base = row_config("base")
    pretrained = {r["image_size"]: r["metrics"] for r in (rows.get("pretrained") or [{}])[0].get("runs", [])}
    lines += [
        "K=1 training runs, one thread each, two side by side on the 2-core machine (images/s and minutes "
        "vary with that load). Base recipe: EfficientNet-Lite0 (ImageNet), "
        f"{base['image_size']} px, the fast mode (the top {base['train_blocks']} MBConv blocks and the head train "
        f"on cached block activations of {base['views']} augmented views per image), {base['loss']} loss, "
        f"lr {base['lr_backbone']:g} (blocks) / {base['lr_embedding']:g} (head), constant, P={base['classes_per_batch']}"
        f" x M={base['images_per_class']}, {base['embedding_dim']}-d head initialised from the top principal "
        f"components of the pretrained features, BatchNorm frozen, {base['epochs']} epochs. "
        f"{int(base['val_fraction'] * 100)}% of the 98 training classes are held out for validation; the run keeps "
        "the epoch with the best validation R@1 (epoch 0, the untrained model, included), and that model is "
        "evaluated on the 98 test classes with the whole network on images. Each row changes one thing.", "",
        "| row | what changes | seeds | R@1 | MAP@R | delivered R@1 | delivered MAP@R | kept epoch | "
        "test R@1 at the last epoch | images/s | training (min): measured / epochs x median epoch |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for size, m in sorted(pretrained.items()):
        lines.append(f"| pretrained | the backbone's pooled features, no training, {size} px | 1 | "
                     f"{pct(m['recall@1'])} | {pct(m['map@r'], digits=2)} | — | — | — | — | — | — |")
    order = [t for t in ROWS if t in rows and t != "pretrained"] + sorted(t for t in rows if t not in ROWS)
    for tag in order:
        runs = rows[tag]
        r1 = _mean_std([r["metrics"]["recall@1"] for r in runs])
        mapr = _mean_std([r["metrics"]["map@r"] for r in runs])
        last = _mean_std([next((c["recall@1"] for c in reversed(r.get("curves", [])) if c.get("recall@1") is not None),
                                None) for r in runs])
        kept = ", ".join(str(r.get("best_epoch")) for r in runs)
        speed = _mean_std([r.get("images_per_s") for r in runs])[0]
        minutes = _mean_std([r.get("train_s") for r in runs])[0]
        steady = _mean_std([(epoch_seconds(r) or 0) * r["config"]["epochs"] for r in runs])[0]
        name = f"**{tag}**" if tag == WINNER else tag
        label = ROWS[tag]["label"] if tag in ROWS else f"{runs[0]['label']}, {runs[0]['config']['image_size']} px"
        shipped = [r["delivered"]["metrics"] for r in runs if r.get("delivered")]
        d1 = _mean_std([m["recall@1"] for m in shipped]) if len(shipped) == len(runs) else (None, None)
        dmap = _mean_std([m["map@r"] for m in shipped]) if len(shipped) == len(runs) else (None, None)
        lines.append(f"| {name} | {label} | {len(runs)} | {pct(*r1)} | {pct(*mapr, digits=2)} | "
                     f"{pct(*d1) if d1[0] is not None else '—'} | "
                     f"{pct(*dmap, digits=2) if dmap[0] is not None else '—'} | "
                     f"{kept} | {pct(last[0])} | {num(speed, 0)} | {num(minutes and minutes / 60, 0)} / "
                     f"{num(steady and steady / 60, 0)} |")
    lines += winner_lines(rows, pretrained)
    lines += results.image("recipe_cars196.png", "test Recall@1 per epoch, every row")
    lines += ["", "**Time to quality** (every row, seed 0): test R@1 of the trained model after each epoch against "
                  "the minutes of one-thread training it took (epochs x the run's median epoch time, so a spell of "
                  "the other core being busy does not bend the line); a star is the delivered model of the rows "
                  "that have one. The dotted lines are the goal: 60 R@1 within 60 minutes."]
    lines += results.image("recipe_cars196_time.png", "test Recall@1 against minutes of training, every row")
    def gap(a, b):
        """R@1 points of row a over row b (seed-0 runs), or None."""
        if a in rows and b in rows:
            return 100 * (rows[a][0]["metrics"]["recall@1"] - rows[b][0]["metrics"]["recall@1"])
        return None

    findings = []
    if gap("base", "random-head") is not None:
        findings.append(f"the head initialised from the principal components of the pretrained features is worth "
                        f"{gap('base', 'random-head'):+.1f} R@1 points over a random head (a random projection "
                        "throws away what the backbone knows)")
    if gap("size160", "base") is not None:
        findings.append(f"the files' own 160 px give {gap('size160', 'base'):+.1f} points over 128 px")
    for other in ("ms", "proxy-anchor", "lr-bb3e-5", "lr-bb3e-4", "lr-emb1e-3", "cosine", "warmup1", "pm4x8",
                  "pm16x4", "bn-trained", "emb512"):
        if gap(other, "base") is not None:
            findings.append(f"{other} {gap(other, 'base'):+.1f}")
    if findings:
        lines += ["", "Against the base row (seed 0, R@1 points): " + "; ".join(findings) + "."]
    later = [f"{other} {gap(other, 'size160'):+.1f}" for other in ("w512-e20", WINNER, "w512-whole")
             if gap(other, "size160") is not None]
    if later:
        lines += ["", "The trained model against the size160 row (seed 0, R@1 points): " + "; ".join(later) +
                  ". At a constant rate the whitened 512-d head's test R@1 peaks near epoch 10 and drifts down while "
                  "validation keeps rising; cosine decay holds the peak, and the delivered model (the trained one "
                  "beside the whitened features) recovers most of the drift either way."]
    commands = sorted({c for runs in rows.values() for r in runs for c in (r.get("command"), r.get("deliver_command"))
                       if c})
    lines += ["", "Commands: " + "; ".join(f"`{c}`" for c in commands), ""]
    return lines


if __name__ == "__main__":
    main()
