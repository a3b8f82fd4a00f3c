"""Small data: a user's folder of tens of classes. Does training pay, and does the run deliver the better model?

cars196 subsets of 10, 15, 25 and 50 training classes (5 class draws each,
fixed seeds, drawn from classes 1-98), always tested on the official test
classes 99-196. Each draw is a folder a user could bring: its classes are
split as ``dcml run`` splits them (``val_fraction`` of them held out for
validation), a model is trained with the preset's recipe (an *arm*), and
every candidate the run can deliver is scored on the validation classes
(what the run sees) and on the test classes (what the user gets):

- ``raw``: the pretrained backbone's pooled features, L2-normalised;
- ``whitened``: PCA-whitening of those features fitted on the draw's
  training images, width and shrinkage chosen on validation
  (dcml.algorithm.whitening);
- ``trained``: the trained model at the epoch validation kept;
- ``delivered``: what the choice rule picks among them (dcml.algorithm.choice).

Three steps, each resumable; ``train`` writes one folder per (arm, size,
draw), so two processes can run draws side by side (one thread each):

    python -m bench.bench_small prepare                 # manifest, fast-mode cache, pretrained features (once)
    python -m bench.bench_small train --arm base --sizes 10,15,25,50 --draws 0,1,2,3,4
    python -m bench.bench_small score                   # candidates, choices -> bench/results/small_data/*.json

The trained model's validation and test embeddings come from the fast mode's
cache (the eval view of the frozen lower part, float16, through the trained
top blocks and head: the trainer's own validation path); the pretrained
features come from the whole network on images.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from bench.common import RESULTS, WORK, log, result_header, set_threads, write_result

ROOT = Path(__file__).resolve().parents[2] / "shared" / "data" / "cars196"
OUT = RESULTS / "small_data"
HERE = WORK / "small_data"
SIZES = (10, 15, 25, 50)
DRAWS = (0, 1, 2, 3, 4)
TRAIN_POOL = 98  # classes 1-98; 99-196 are the test classes

# The cars196 preset's recipe (dcml_app/presets.py), K=1, as a run of the
# pipeline trains it (train stage, then the finetune stage's 2 epochs are
# left out: K=1's fine-tuning is the same training continued).
RECIPE = {
    "backbone": "efficientnet_lite0", "weights": "imagenet", "image_size": 160, "embedding_dim": 128,
    "train_blocks": 5, "views": 4, "loss": "margin", "miner": "auto", "classes_per_batch": 8,
    "images_per_class": 4, "lr_backbone": 1e-4, "lr_embedding": 1e-4, "weight_decay": 1e-4,
    "head_init": "pca", "freeze_bn": True, "epochs": 10, "select_on": "recall@1", "patience": 0,
    "val_fraction": 0.15,
}
WHITEN = {"head_init": "whiten", "embedding_dim": 512}
ARMS: dict[str, dict] = {
    "base": {"label": "the cars196 recipe (PCA head 128-d, top 5 blocks, lr 1e-4, 10 epochs)"},
    "whiten": {"label": "head_init=whiten, 512-d (whitened head): the folder preset", **WHITEN},
    "lowlr": {"label": "whiten + backbone lr 3e-5", **WHITEN, "lr_backbone": 3e-5},
    "distill": {"label": "whiten + similarity distillation to the pretrained features (weight 1)", **WHITEN,
                "distill": 1.0},
    "val30": {"label": "whiten + val_fraction 0.3 (more validation classes, fewer training ones)", **WHITEN,
              "val_fraction": 0.3},
}


def arm_config(arm: str) -> dict:
    if arm not in ARMS:
        raise SystemExit(f"unknown arm {arm!r}; known: {', '.join(ARMS)}")
    return {**RECIPE, **{k: v for k, v in ARMS[arm].items() if k != "label"}}


# ----------------------------------------------------------------- prepare

def full_manifest() -> Path:
    """cars196 with classes 1-98 all 'train' and 99-196 'test' (no validation carved)."""
    from components.ingest.stage import run as ingest

    dest = HERE / "cars196-all.parquet"
    if not dest.is_file():
        ingest(dataset="cars196", out=dest, root=str(ROOT), split_mode="official", val_fraction=0.0)
    return dest


def cache_dir(cfg: dict) -> Path:
    return HERE / "caches" / f"cars196-{cfg['image_size']}px-top{cfg['train_blocks']}-v{cfg['views']}"


def features_file(cfg: dict) -> Path:
    return HERE / f"features-{cfg['image_size']}px.npz"


def prepare(what: str, cfg: dict) -> None:
    """The shared inputs of every draw: the fast-mode cache and the pretrained features (whole network)."""
    from components.extract.stage import run as extract

    manifest = full_manifest()
    if what in ("cache", "all") and not (cache_dir(cfg) / "rows.parquet").is_file():
        dest = cache_dir(cfg)
        log(f"building the fast-mode cache {dest.name}")
        extract(manifest=manifest, out=dest.with_suffix(".features.parquet"), backbone=cfg["backbone"],
                weights=cfg["weights"], image_size=cfg["image_size"], batch_size=64, views=cfg["views"],
                train_blocks=cfg["train_blocks"], activations_out=dest)
    if what in ("features", "all") and not features_file(cfg).is_file():
        from dcml.algorithm.inference import compute_vectors
        from dcml.algorithm.models import build_model
        from dcml.contracts import manifest as manifest_lib

        man = manifest_lib.read(manifest)
        rows = man.df.reset_index(drop=True)
        model = build_model({"backbone": cfg["backbone"], "weights": cfg["weights"],
                             "image_size": cfg["image_size"]}).eval()
        x = compute_vectors(model, man, rows, kind="features", batch_size=64,
                            desc=f"pretrained features of {len(rows)} images")
        features_file(cfg).parent.mkdir(parents=True, exist_ok=True)
        np.savez(features_file(cfg), features=x, image_id=rows["image_id"].astype(str).to_numpy(dtype=str))


# ----------------------------------------------------------------- draws

def draw_classes(size: int, draw: int) -> list[int]:
    """The draw's training classes (labels among 0..97 = official classes 1-98): fixed by (size, draw)."""
    rng = np.random.default_rng([int(size), int(draw), 28])
    return sorted(int(c) for c in rng.choice(TRAIN_POOL, size=int(size), replace=False))


def draw_manifest(size: int, draw: int, val_fraction: float) -> Path:
    """The draw as a manifest: its classes split into train / val as ingest splits a folder, the test classes kept."""
    from dcml.contracts import manifest as manifest_lib

    dest = HERE / "manifests" / f"n{size}-d{draw}-val{val_fraction:g}.parquet"
    if dest.is_file():
        return dest
    man = manifest_lib.read(full_manifest())
    df = man.df
    train_labels = sorted(df.loc[df["split"] == "train", "label"].unique())
    chosen = {train_labels[i] for i in draw_classes(size, draw)}
    keep = (df["split"] == "test") | df["label"].isin(chosen)
    df, _ = manifest_lib.carve_validation(df[keep].reset_index(drop=True), val_fraction, f"draw n{size}-d{draw}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    manifest_lib.write(dest, df, {k: v for k, v in man.meta.items() if k not in ("schema_version", "record")})
    return dest


def run_dir(arm: str, size: int, draw: int) -> Path:
    return HERE / "runs" / arm / f"n{size}-d{draw}"


def train_draw(arm: str, size: int, draw: int) -> dict:
    """Train the arm on the draw; write the record and the kept model's val / test embeddings."""
    from components.train.stage import run as train
    from dcml.algorithm.training.scoring import Scorer
    from dcml.contracts import manifest as manifest_lib
    from dcml.model_files import load_model
    from dcml.stagekit import open_activations

    cfg = arm_config(arm)
    work = run_dir(arm, size, draw)
    done = work / "embeddings.npz"
    if done.is_file():
        return json.loads((work / "record.json").read_text())
    work.mkdir(parents=True, exist_ok=True)
    manifest = draw_manifest(size, draw, cfg["val_fraction"])
    cache = cache_dir(cfg)
    extra = {k: cfg[k] for k in ("distill",) if k in cfg}
    t0 = time.perf_counter()
    record = train(manifest=str(manifest), out=str(work / "model.pt"), mode="shared", activations=str(cache),
                   backbone=cfg["backbone"], weights=cfg["weights"], image_size=cfg["image_size"],
                   embedding_dim=cfg["embedding_dim"], num_slices=1, train_blocks=cfg["train_blocks"],
                   loss=cfg["loss"], miner=cfg["miner"], classes_per_batch=cfg["classes_per_batch"],
                   images_per_class=cfg["images_per_class"], lr_backbone=cfg["lr_backbone"],
                   lr_embedding=cfg["lr_embedding"], weight_decay=cfg["weight_decay"], epochs=cfg["epochs"],
                   recluster_every=0, eval_every=0, freeze_bn=cfg["freeze_bn"], head_init=cfg["head_init"],
                   select_on=cfg["select_on"], patience=cfg["patience"], seed=draw, resume=True,
                   work_dir=str(work), **extra)
    wall = time.perf_counter() - t0
    man = manifest_lib.read(manifest)
    model, _ = load_model(work / "model.pt")
    scorer = Scorer(man, "cpu", 256, 0, open_activations(str(cache)))
    out = {}
    for split in ("val", "test"):
        rows = man.split(split)
        out[f"{split}_embedding"] = scorer.vectors(model, rows, "embedding", f"{split} embeddings")
        out[f"{split}_image_id"] = rows["image_id"].astype(str).to_numpy(dtype=str)
    # The curve of validation scores (epoch 0 = the initial model), for the record.
    keep = {"arm": arm, "size": size, "draw": draw, "config": cfg, "wall_s": round(wall, 1),
            "best_epoch": record["metrics"].get("best_epoch"),
            "train_s": round(sum(h.get("seconds", 0) for h in record["history"]), 1),
            "curves": [{k: h.get(k) for k in ("epoch", "loss", "val_recall@1", "val_map@r")} for h in record["history"]]}
    (work / "record.json").write_text(json.dumps(keep, indent=1))
    np.savez(work / "embeddings.tmp.npz", **out)
    (work / "embeddings.tmp.npz").rename(done)
    (work / "model.pt").unlink(missing_ok=True)  # the embeddings are what the scoring needs
    return keep


def commands(quick: bool, threads: int) -> list[list[str]]:
    """`make bench`: the shared inputs, the adopted arm's draws, the scoring (not in --quick: hours)."""
    from bench.report import PY

    if quick or not ROOT.is_dir():
        return []
    t = ["--threads", str(threads)]
    return [[PY, "-m", "bench.bench_small", "prepare", *t],
            [PY, "-m", "bench.bench_small", "train", "--arm", "whiten", *t],
            [PY, "-m", "bench.bench_small", "score", *t]]


def report(results) -> list[str]:
    from bench.small_report import report as small_report

    return small_report(results)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="step", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("--what", choices=("cache", "features", "all"), default="all")
    p.add_argument("--threads", type=int, default=1)
    t = sub.add_parser("train")
    t.add_argument("--arm", default="base")
    t.add_argument("--sizes", default=",".join(map(str, SIZES)))
    t.add_argument("--draws", default=",".join(map(str, DRAWS)))
    t.add_argument("--threads", type=int, default=1)
    s = sub.add_parser("score")
    s.add_argument("--arms", default=None, help="comma-separated arms to score (default: every arm with draws)")
    s.add_argument("--redeliver", action="store_true",
                   help="only re-derive the delivered model of scored draws (after the product rule changed)")
    s.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    set_threads(args.threads)
    if args.step == "prepare":
        prepare(args.what, RECIPE)
    elif args.step == "train":
        # Draw by draw, every size in each: stopped early, the results still cover every size.
        for draw in [int(x) for x in args.draws.split(",")]:
            for size in [int(x) for x in args.sizes.split(",")]:
                log(f"small data: arm {args.arm}, {size} classes, draw {draw}")
                rec = train_draw(args.arm, size, draw)
                log(f"  kept epoch {rec['best_epoch']}, {rec['train_s']:.0f} s training")
    else:
        from bench.small_score import redeliver, score_all

        redeliver() if args.redeliver else score_all(args.arms.split(",") if args.arms else None)


if __name__ == "__main__":
    main()
