"""Benchmark of DFML training (factorised backbone + router) on one manifest.

Trains with ``components.dfml.stage.run`` (R@1 of the full and of the routed
model after every ``--eval-every`` epochs, routing of the training and the test
images logged), then evaluates the written checkpoint -- the plain model,
exactly what ``dcml evaluate`` sees -- with every retrieval metric. With
``--baseline`` the same backbone, loss, batches and learning rates are also
trained without factorisation (``components.train.stage.run``, K=1), so the
difference is DFML's alone.

    python -m bench.bench_dfml --manifest runs/cars/manifest.parquet --dataset cars196 --epochs 10
    python -m bench.bench_dfml --manifest M --dataset cars196 --epochs 10 --baseline

writes bench/results/dfml_<dataset>.json and dfml_<dataset>_routing.png: for
every block, the share of training samples (last epoch) and of test samples
sent to each sub-block, plus the mean normalised routing entropy per epoch
(1 = samples spread evenly, 0 = every block sends everything to one
sub-block).
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from dcml import manifest as manifest_lib
from dcml.checkpoint import load_model
from dcml.inference import compute_vectors, default_device
from dcml.io import atomic_path, write_json
from dcml.metrics import evaluate_embeddings
from dcml.records import git_commit

RESULTS = Path(__file__).resolve().parent / "results"


def evaluate_checkpoint(path, manifest_path, device) -> dict:
    """All retrieval metrics of a checkpoint on the manifest's test (or query/gallery) split."""
    man = manifest_lib.read(manifest_path)
    model, _ = load_model(path, device=device)
    splits = set(man.df["split"].unique())
    t0 = time.perf_counter()
    if {"query", "gallery"} <= splits:
        query, gallery = man.split("query"), man.split("gallery")
        q = compute_vectors(model, man, query, device=device, desc="query embeddings")
        g = compute_vectors(model, man, gallery, device=device, desc="gallery embeddings")
        metrics = evaluate_embeddings(q, query["label"].to_numpy(), g, gallery["label"].to_numpy())
    else:
        test = man.split("test")
        metrics = evaluate_embeddings(compute_vectors(model, man, test, device=device, desc="test embeddings"),
                                      test["label"].to_numpy())
    metrics = {k: float(v) for k, v in metrics.items()}
    metrics["eval_seconds"] = round(time.perf_counter() - t0, 3)
    return metrics


def _short(name: str) -> str:
    # "backbone.net._blocks.7" -> "7"
    return name.rsplit("_blocks.", 1)[-1] if "_blocks." in name else name


def plot(result: dict, dest: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    history = result["dfml"]["history"]
    panels = [("training images, last epoch", history[-1]["routing"])]
    evaluated = [h for h in history if "eval_routing" in h]
    if evaluated:
        panels.append(("test images, final model", evaluated[-1]["eval_routing"]))
    fig, axes = plt.subplots(1, len(panels) + 1, figsize=(5 * (len(panels) + 1), 4.5))
    for ax, (title, counts) in zip(axes, panels):
        names = list(counts)
        table = np.array([counts[n] for n in names], dtype=float)
        shares = table / np.maximum(table.sum(axis=1, keepdims=True), 1)
        left = np.zeros(len(names))
        for g in range(shares.shape[1]):
            ax.barh(range(len(names)), shares[:, g], left=left, label=f"sub-block {g}")
            left += shares[:, g]
        ax.set_yticks(range(len(names)), [_short(n) for n in names])
        ax.invert_yaxis()
        ax.set_xlim(0, 1)
        ax.set_xlabel("share of samples")
        ax.set_ylabel("block")
        ax.set_title(title)
    axes[0].legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=shares.shape[1], fontsize=8)
    ax = axes[-1]
    epochs = [h["epoch"] for h in history]
    ax.plot(epochs, [h["routing_entropy"] for h in history], marker="o", label="routing entropy (train)")
    if evaluated:
        ax.plot([h["epoch"] for h in evaluated], [h["recall@1"] for h in evaluated], marker="s", label="R@1 full")
        ax.plot([h["epoch"] for h in evaluated], [h["routed_recall@1"] for h in evaluated], marker="^", label="R@1 routed")
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("epoch")
    ax.set_title("spread and retrieval per epoch")
    ax.legend(fontsize=8)
    params = result["dfml"]["params"]
    fig.suptitle(f"DFML on {result['dataset']}: G={params['groups']}, balance_weight={params['balance_weight']}")
    fig.tight_layout()
    with atomic_path(dest) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--manifest", required=True)
    parser.add_argument("--dataset", required=True, help="name used in the output file names")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--eval-every", type=int, default=1)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--embedding-dim", type=int, default=128)
    parser.add_argument("--groups", type=int, default=3)
    parser.add_argument("--loss", default="proxy_anchor")
    parser.add_argument("--classes-per-batch", type=int, default=20)
    parser.add_argument("--images-per-class", type=int, default=4)
    parser.add_argument("--lr-backbone", type=float, default=1e-4)
    parser.add_argument("--lr-embedding", type=float, default=1e-4)
    parser.add_argument("--lr-proxies", type=float, default=None)
    parser.add_argument("--lr-router", type=float, default=1e-4)
    parser.add_argument("--routed-scale", type=float, default=None)
    parser.add_argument("--balance-weight", type=float, default=0.0,
                        help="weight of the routers' load-balancing term (0 = DFML as published)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (1 is much faster on a box shared with other jobs)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-workers", type=int, default=0)
    parser.add_argument("--baseline", action="store_true", help="also train the same model without DFML (K=1)")
    parser.add_argument("--out-dir", default=str(RESULTS))
    parser.add_argument("--keep-models", help="directory to keep the trained checkpoints in")
    args = parser.parse_args(argv)

    from components.dfml.stage import run as run_dfml

    if args.threads:
        torch.set_num_threads(args.threads)
    out_dir = Path(args.out_dir)
    json_path = out_dir / f"dfml_{args.dataset}.json"
    png_path = out_dir / f"dfml_{args.dataset}_routing.png"
    device = default_device()
    common = dict(image_size=args.image_size, embedding_dim=args.embedding_dim, loss=args.loss,
                  classes_per_batch=args.classes_per_batch, images_per_class=args.images_per_class,
                  lr_backbone=args.lr_backbone, lr_embedding=args.lr_embedding, lr_proxies=args.lr_proxies,
                  epochs=args.epochs, eval_every=args.eval_every, seed=args.seed, num_workers=args.num_workers)
    result = {
        "dataset": args.dataset,
        "manifest": str(Path(args.manifest).resolve()),
        "complete": False,
        "git_commit": git_commit(),
        "machine": {"host": platform.node(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "device": str(device), "torch": torch.__version__},
    }
    keep = Path(args.keep_models) if args.keep_models else None
    with tempfile.TemporaryDirectory() as tmp_dir:
        models = keep or Path(tmp_dir)
        dfml_path = models / f"dfml_{args.dataset}.pt"
        t0 = time.perf_counter()
        record = run_dfml(manifest=args.manifest, out=dfml_path, groups=args.groups, lr_router=args.lr_router,
                          routed_scale=args.routed_scale, balance_weight=args.balance_weight,
                          eval_routed=True, resume=False, **common)
        cpu_note = time.process_time()
        result["dfml"] = {
            "params": record["params"],
            "wall_seconds": round(time.perf_counter() - t0, 1),
            "train_seconds": record["metrics"].get("train_seconds"),
            "metrics": evaluate_checkpoint(dfml_path, args.manifest, device),
            "routed_recall@1": record["metrics"].get("routed_recall@1"),
            "routing_entropy": record["metrics"].get("routing_entropy"),
            "collapsed_units": record["metrics"].get("collapsed_units"),
            "history": record["history"],
        }
        write_json(json_path, result)
        plot(result, png_path)
        if args.baseline:
            from components.train.stage import run as run_train

            base_path = models / f"baseline_{args.dataset}.pt"
            t0 = time.perf_counter()
            base = run_train(manifest=args.manifest, out=base_path, backbone="efficientnet_lite0", weights="imagenet",
                             num_slices=1, miner="none" if args.loss == "proxy_anchor" else "reference",
                             recluster_every=0, resume=False, **common)
            result["baseline"] = {
                "params": base["params"],
                "wall_seconds": round(time.perf_counter() - t0, 1),
                "train_seconds": base["metrics"].get("train_seconds"),
                "metrics": evaluate_checkpoint(base_path, args.manifest, device),
                "history": base["history"],
            }
    result["process_cpu_seconds"] = round(cpu_note, 1)
    result["complete"] = True
    write_json(json_path, result)
    print(f"wrote {json_path} and {png_path}")
    for name in ("dfml", "baseline"):
        if name in result:
            m = result[name]["metrics"]
            print(f"{name}: R@1 {m['recall@1']:.4f}  MAP@R {m['map@r']:.4f}  train {result[name]['train_seconds']} s")
    return result


if __name__ == "__main__":
    main()
