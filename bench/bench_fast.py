"""The fast mode's speed: training images/s from cached activations against the whole network, in one run.

Three ways to train the same model on the same cars196 batches, interleaved
round by round in one process (so load on the machine hits all alike), one
thread:

* ``whole``: every block trains, images through the whole network (the
  pipeline before the fast mode);
* ``top-images``: only the top ``train_blocks`` blocks train, images through
  the whole network (the frozen part runs without autograd);
* ``fast``: the same top blocks on the cached output of the frozen part
  (dcml.algorithm.activations), the pipeline's ``fast_views``.

Each round trains ``--batches`` batches of P x M images per mode; the result
is the median images/s over ``--rounds`` rounds, and the cost of building
the cache (per image and view) to say after how many epochs it has paid off.
The R@1 cost at equal epochs comes from bench_recipe's rows ``base`` (fast),
``images-top5`` and ``whole``.

    python -m bench.bench_fast --image-size 160 --rounds 3
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from bench.common import RESULTS, WORK, log, result_header, set_threads, write_result
from bench.report import PY, Results, commands_line, num

MODES = ("whole", "top-images", "fast")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image-size", type=int, default=160)
    parser.add_argument("--train-blocks", type=int, default=5)
    parser.add_argument("--classes", type=int, default=16, help="training classes used (cars196, official split)")
    parser.add_argument("--views", type=int, default=4)
    parser.add_argument("--batches", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(RESULTS / "fast.json"))
    args = parser.parse_args(argv)
    set_threads(args.threads)

    import torch

    from components.extract.stage import run as extract
    from components.ingest.stage import run as ingest
    from dcml.algorithm.activations import ActivationCache
    from dcml.algorithm.models import build_model
    from dcml.algorithm.training import Trainer, TrainSettings, seed_everything
    from dcml.contracts import manifest as manifest_lib

    work = WORK / "fast"
    work.mkdir(parents=True, exist_ok=True)
    root = Path(__file__).resolve().parents[2] / "shared" / "data" / "cars196"
    manifest = work / "cars196.parquet"
    if not manifest.is_file():
        ingest(out=manifest, dataset="cars196", root=str(root), val_fraction=0.0)
    man = manifest_lib.read(manifest)
    train = man.split("train")
    train = train[train["label"].isin(sorted(train["label"].unique())[: args.classes])].reset_index(drop=True)
    subset = work / f"subset-{args.classes}.parquet"
    manifest_lib.write(subset, man.df[man.df["image_id"].isin(train["image_id"])].reset_index(drop=True),
                       {k: v for k, v in man.meta.items() if k != "schema_version"})
    man = manifest_lib.read(subset)
    config = {"backbone": "efficientnet_lite0", "weights": "imagenet", "image_size": args.image_size,
              "embedding_dim": 128, "freeze_bn": True}

    cache_dir = work / f"cache-{args.image_size}-top{args.train_blocks}-v{args.views}"
    t0 = time.perf_counter()
    record = extract(manifest=subset, out=work / "features.parquet", backbone="efficientnet_lite0", weights="imagenet",
                     image_size=args.image_size, train_blocks=args.train_blocks, views=args.views, batch_size=64,
                     activations_out=cache_dir)
    cache_s = record["metrics"]["cache_seconds"]
    log(f"cache: {len(train)} training images x {1 + args.views} views in {cache_s:.1f} s "
        f"(extract stage {time.perf_counter() - t0:.1f} s)")
    cache = ActivationCache(cache_dir)

    def trainer(mode: str):
        seed_everything(0)
        blocks = -1 if mode == "whole" else args.train_blocks
        model = build_model({**config, "train_blocks": blocks})
        settings = TrainSettings(epochs=1, classes_per_batch=8, images_per_class=4, lr_backbone=1e-4,
                                 lr_embedding=1e-4, batches_per_epoch=args.batches, eval_every=0, head_init="random")
        return Trainer(model, man, train, settings, activations=cache if mode == "fast" else None, device="cpu")

    speeds: dict[str, list[float]] = {m: [] for m in MODES}
    for r in range(args.rounds):
        for mode in MODES:
            t = trainer(mode)
            entry = t.fit(resume=False)[-1]
            speeds[mode].append(entry["images"] / entry["seconds"])
            log(f"round {r + 1} {mode}: {speeds[mode][-1]:.1f} images/s")
            del t
            torch.set_num_threads(args.threads)
    median = {m: round(statistics.median(v), 2) for m, v in speeds.items()}
    cache_per_image_view = cache_s / (len(train) * (1 + args.views))
    result = {
        **result_header("fast", "bench.bench_fast", argv),
        "image_size": args.image_size, "train_blocks": args.train_blocks, "views": args.views,
        "classes": args.classes, "train_images": len(train), "batches_per_round": args.batches,
        "rounds": args.rounds, "images_per_s": speeds, "median_images_per_s": median,
        "fast_over_whole": round(median["fast"] / median["whole"], 2),
        "fast_over_top_images": round(median["fast"] / median["top-images"], 2),
        "top_images_over_whole": round(median["top-images"] / median["whole"], 2),
        "cache_seconds": round(cache_s, 1), "cache_s_per_image_view": round(cache_per_image_view, 4),
        # Epochs after which building the cache has paid off against whole-network training:
        # cache build ~ (1 + views) lower-part passes per image; each whole epoch costs 1 / whole img/s per image.
        "cache_paid_off_after_epochs": round((cache_s / len(train)) / (1 / median["whole"] - 1 / median["fast"]), 2),
    }
    write_result(Path(args.out), result)
    log(f"fast / whole = {result['fast_over_whole']}x, fast / top-images = {result['fast_over_top_images']}x")


# ----------------------------------------------------------------- report

CARS = Path(__file__).resolve().parents[2] / "shared" / "data" / "cars196"


def commands(quick: bool, threads: int) -> list[list[str]]:
    if not CARS.is_dir():
        return []
    extra = ["--rounds", "1", "--batches", "5", "--out", str(RESULTS / "fast_quick.json")] if quick else []
    return [[PY, "-m", "bench.bench_fast", "--threads", str(threads), *extra]]


def report(results: Results) -> list[str]:
    lines = ["## Fast mode: training images/s from cached activations (bench_fast)", ""]
    r = results.best("fast")
    if not r:
        return lines + [f"Not run yet: `{PY} -m bench.bench_fast`.", ""]
    m = r["median_images_per_s"]
    lines += [f"cars196, EfficientNet-Lite0 at {r['image_size']} px, P=8 x M=4, one thread; the three ways train the "
              f"same batches, interleaved round by round in one process ({r['rounds']} rounds of "
              f"{r['batches_per_round']} batches each, median). `whole`: every block trains on images; `top-images`: "
              f"the top {r['train_blocks']} blocks train, the frozen part runs on images without autograd; `fast`: "
              f"the same top blocks on the cached output of the frozen part ({r['views']} views per image).", "",
              "| mode | images/s (median) | vs whole |", "|---|---:|---:|"]
    for mode in MODES:
        lines.append(f"| {mode} | {num(m[mode], 1)} | {m[mode] / m['whole']:.2f}x |")
    lines += ["", f"The fast mode trains **{r['fast_over_whole']:.2f}x** as many images per second as the whole "
                  f"network (goal >= 3x: {'met' if r['fast_over_whole'] >= 3 else 'not met'}) and "
                  f"{r['fast_over_top_images']:.2f}x the same top blocks on images. Building the cache took "
                  f"{r['cache_seconds']:.0f} s for {r['train_images']:,} images x {1 + r['views']} passes "
                  f"({1000 * r['cache_s_per_image_view']:.1f} ms per image and view): it has paid for itself after "
                  f"{r['cache_paid_off_after_epochs']:.1f} epochs.", ""]
    fast, whole = results.load("recipe/cars196-size160-s0"), results.load("recipe/cars196-whole160-s0")
    if fast and whole:
        f, w = fast["metrics"], whole["metrics"]
        lines += [f"R@1 at equal epochs (bench_recipe, cars196, 160 px, {fast['config']['epochs']} epochs, seed 0, "
                  "each keeping its best validation epoch): fast mode (top 5 blocks on 4 cached views) "
                  f"R@1 {100 * f['recall@1']:.1f} / MAP@R {100 * f['map@r']:.2f}; whole network on images "
                  f"{100 * w['recall@1']:.1f} / {100 * w['map@r']:.2f} "
                  f"({100 * (f['recall@1'] - w['recall@1']):+.1f} R@1 points for the fast mode), at "
                  f"{fast['images_per_s']:.0f} vs {whole['images_per_s']:.0f} images/s in those runs.", ""]
    else:
        lines += ["The R@1 cost at equal epochs: recipe rows `size160` (fast) and `whole160` (not run yet).", ""]
    lines += [commands_line(r, results.step_command("fast")), ""]
    return lines


if __name__ == "__main__":
    main()
