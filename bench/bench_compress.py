"""Benchmark of weight-sharing compression: bits vs size vs retrieval quality.

For a trained checkpoint and its manifest: the float model's R@1 / MAP@R, then
for every method (uniform, kmeans, loss-aware) and bits (2, 3, 4, 6, 8), with
and without centroid fine-tuning, the compressed file's true size on disk and
the R@1 / MAP@R of the model loaded back from that file (the path `dcml
evaluate --model` takes). As in `dcml compress`: channel equalisation before
clustering and BatchNorm bias correction after it (each can be switched off),
fine-tuning by distillation from the float model. The Fisher importance is
measured once and shared by every loss-aware run; fine-tuning starts from the
same codebooks as the run without it.

    python -m bench.bench_compress --model runs/x/model.pt --manifest runs/x/manifest.parquet --dataset cars196

writes bench/results/compress_<dataset>.json (rewritten after every run, with
"complete": false until the last one) and compress_<dataset>.png (bits vs R@1
and MAP@R per method; dashed = with centroid fine-tuning).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

from components.compress.stage import calibration_images, equalize_checked, importance_loss, training_batches
from dcml.contracts import manifest as manifest_lib
from dcml.contracts.errors import DcmlError
from dcml.contracts.io import write_json
from dcml.contracts.records import git_commit

from bench import bench_quality, compress_sensitivity
from bench.common import command_line, log, log_to_mlflow, save_png
from bench.report import PY, Results, commands_line, dataset_heading, pct

RESULTS = Path(__file__).resolve().parent / "results"


def eval_sets(man):
    """(query rows, reference rows or None): query/gallery when the manifest has
    them (In-Shop), else the test split retrieved against itself."""
    splits = set(man.df["split"].unique())
    if {"query", "gallery"} <= splits:
        return man.split("query"), man.split("gallery")
    if "test" in splits:
        return man.split("test"), None
    raise DcmlError(f"{man.path}: no test or query/gallery split to evaluate on; ingest the dataset with its evaluation split")


class Evaluator:
    def __init__(self, man, batch_size: int, device):
        self.man, self.batch_size, self.device = man, batch_size, device
        self.query, self.reference = eval_sets(man)

    def __call__(self, model) -> dict:
        from dcml.algorithm.inference import compute_vectors
        from dcml.algorithm.metrics import evaluate_embeddings

        kw = {"batch_size": self.batch_size, "device": self.device}
        q = compute_vectors(model, self.man, self.query, **kw)
        if self.reference is None:
            m = evaluate_embeddings(q, self.query["label"].to_numpy(), ks=(1,), include=("recall", "map@r"))
        else:
            r = compute_vectors(model, self.man, self.reference, **kw)
            m = evaluate_embeddings(q, self.query["label"].to_numpy(), r, self.reference["label"].to_numpy(),
                                    ks=(1,), include=("recall", "map@r"))
        return {"recall@1": float(m["recall@1"]), "map@r": float(m["map@r"])}


def plot(results: dict, dest: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    colours = {"uniform": "tab:gray", "kmeans": "tab:blue", "loss-aware": "tab:red"}
    for ax, key, label in ((axes[0], "recall@1", "R@1"), (axes[1], "map@r", "MAP@R")):
        ax.axhline(100 * results["float"][key], color="black", lw=1, label="float32")
        for method in results["methods"]:
            for tuned, style in ((False, "-o"), (True, "--s")):
                runs = sorted((r for r in results["runs"] if r["method"] == method and (r["finetune_steps"] > 0) == tuned),
                              key=lambda r: r["bits"])
                if runs:
                    ax.plot([r["bits"] for r in runs], [100 * r[key] for r in runs], style, color=colours.get(method),
                            label=f"{method}{' + centroid fine-tuning' if tuned else ''}", ms=4)
        ax.set_xlabel("bits per weight")
        ax.set_ylabel(f"{label} (%)")
        ax.set_xticks(results["bits"])
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, loc="lower right")
    fig.suptitle(f"weight sharing on {results['dataset']} ({results['model_config'].get('backbone')}): "
                 f"float {results['float']['size_bytes'] / 2**20:.1f} MiB")
    save_png(fig, dest, dpi=120)


def log_result(results: dict, json_path: Path, png_path: Path) -> str:
    """Log a finished result (JSON + plot, one nested run per method/bits row) to MLflow."""
    results["mlflow_run_id"] = log_to_mlflow(
        "bench-compress", f"compress {results['dataset']}",
        params={"dataset": results["dataset"], "model": results["model"], "manifest": results["manifest"],
                **results["settings"]},
        metrics={f"float.{k}": v for k, v in results["float"].items()},
        artifacts=[json_path, png_path],
        children=[(f"{r['method']} {r['bits']}b" + (" + centroid fine-tuning" if r["finetune_steps"] else ""),
                   {"method": r["method"], "bits": r["bits"], "finetune_steps": r["finetune_steps"]}, r)
                  for r in results["runs"]])
    write_json(json_path, results)
    return results["mlflow_run_id"]


def main(argv=None) -> dict:
    import torch

    from dcml.algorithm.inference import default_device
    from dcml.model_files import load_model
    from dcml.methods import quantize as Q

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="trained dcml checkpoint")
    ap.add_argument("--manifest", help="its manifest (train split for importance, test split for R@1)")
    ap.add_argument("--dataset", required=True, help="name used in the output file names")
    ap.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4, 6, 8])
    ap.add_argument("--methods", nargs="+", default=list(Q.METHODS), choices=list(Q.METHODS))
    ap.add_argument("--finetune-steps", type=int, default=100, help="centroid fine-tuning steps (0 = skip those runs)")
    ap.add_argument("--finetune-bits", type=int, nargs="+", default=None, help="fine-tune only at these bits (default: all)")
    ap.add_argument("--finetune-lr", type=float, default=1e-3)
    ap.add_argument("--finetune-loss", default="distill", choices=["distill", "metric"])
    ap.add_argument("--centroids-only", action="store_true", help="fine-tune the centroids only, not biases / BatchNorm")
    ap.add_argument("--no-equalize", action="store_true", help="skip channel equalisation")
    ap.add_argument("--no-bias-correction", action="store_true", help="skip BatchNorm bias correction")
    ap.add_argument("--calibration-images", type=int, default=256)
    ap.add_argument("--importance-batches", type=int, default=20)
    ap.add_argument("--damping", type=float, default=0.0, help="loss-aware importance damping (x mean importance)")
    ap.add_argument("--loss", default="margin", choices=["margin", "triplet", "contrastive"])
    ap.add_argument("--miner", default="reference", choices=["reference", "distance_weighted", "none"])
    ap.add_argument("--classes-per-batch", type=int, default=20)
    ap.add_argument("--images-per-class", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=128, help="evaluation batch size")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default=None)
    ap.add_argument("--out-dir", default=str(RESULTS))
    ap.add_argument("--no-mlflow", action="store_true", help="do not log the result to MLflow")
    ap.add_argument("--mlflow-only", action="store_true", help="log the existing compress_<dataset>.json to MLflow, run nothing")
    args = ap.parse_args(argv)

    device = torch.device(args.device) if args.device else default_device()
    for bits in args.bits:
        Q.check_bits(bits)
    out_dir = Path(args.out_dir)
    json_path, png_path = out_dir / f"compress_{args.dataset}.json", out_dir / f"compress_{args.dataset}.png"
    if args.mlflow_only:
        results = json.loads(json_path.read_text())
        print(f"logged {json_path} as MLflow run {log_result(results, json_path, png_path)}")
        return results
    if not (args.model and args.manifest):
        ap.error("--model and --manifest are required (unless --mlflow-only)")

    model, _ = load_model(args.model, device=device)
    man = manifest_lib.read(args.manifest)
    evaluate = Evaluator(man, args.batch_size, device)
    train_rows = man.split("train")
    calibration = calibration_images(man, train_rows, model.config, args.calibration_images, args.seed)
    equalized = [] if args.no_equalize else equalize_checked(model, calibration)
    float_model = copy.deepcopy(model)  # after equalisation (same function): reference and teacher
    original = {k: v.detach().clone() for k, v in model.state_dict().items()}
    weights = {name: p.detach().cpu().clone() for name, p in Q.quantizable_weights(model).items()}

    t0 = time.perf_counter()
    float_metrics = evaluate(model)
    results = {
        "dataset": args.dataset, "command": command_line("bench.bench_compress", argv),
        "model": str(args.model), "manifest": str(args.manifest),
        "model_config": dict(model.config), "bits": args.bits, "methods": args.methods,
        "settings": {k: v for k, v in vars(args).items() if k not in ("model", "manifest", "dataset", "out_dir")},
        "equalized_layers": len(equalized),
        "eval": {"queries": len(evaluate.query), "references": len(evaluate.reference) if evaluate.reference is not None else None},
        "machine": {"host": platform.node(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "device": str(device), "git_commit": git_commit()},
        "float": {**float_metrics, "size_bytes": Q.float_size_bytes(model), "eval_s": round(time.perf_counter() - t0, 1),
                  "quantizable_weights": sum(w.numel() for w in weights.values()),
                  "params": sum(v.numel() for v in original.values())},
        "runs": [], "complete": False,
    }
    print(f"float: R@1 {100 * float_metrics['recall@1']:.2f}  MAP@R {100 * float_metrics['map@r']:.2f}  "
          f"{results['float']['size_bytes'] / 2**20:.2f} MiB", flush=True)

    loss_fn = importance_loss(model, args.loss, args.miner, None)
    batch_opts = {"classes_per_batch": args.classes_per_batch, "images_per_class": args.images_per_class,
                  "num_workers": 0}
    importance = None
    if "loss-aware" in args.methods:
        t = time.perf_counter()
        torch.manual_seed(args.seed)
        stats = {}
        importance = Q.compute_importance(
            model, training_batches(man, train_rows, model.config, train=False, seed=args.seed, **batch_opts),
            loss_fn, num_batches=args.importance_batches, stats=stats)
        results["importance"] = {**stats, "seconds": round(time.perf_counter() - t, 1)}

    def measure(quantized, tmp_dir, tag) -> dict:
        path = Path(tmp_dir) / f"{tag}.pt"
        size = Q.save_compressed(path, model, quantized)
        t = time.perf_counter()
        loaded, _ = load_model(path, device=device)
        metrics = evaluate(loaded)
        path.unlink()
        errors = Q.error_summary(Q.reconstruction_errors(weights, quantized, importance))
        return {**metrics, "size_bytes": size["compressed_size_bytes"], "budget_bytes": size["budget_bytes"],
                "compression_ratio": results["float"]["size_bytes"] / size["compressed_size_bytes"],
                "recon_rel_mse_mean": errors["rel_mse_mean"], "recon_mse": errors["mse"],
                "recon_weighted_sq_error": errors.get("weighted_sq_error"), "eval_s": round(time.perf_counter() - t, 1)}

    with tempfile.TemporaryDirectory(prefix="bench_compress_") as tmp_dir:
        for method in args.methods:
            for bits in args.bits:
                model.load_state_dict(original)
                t = time.perf_counter()
                quantized = Q.quantize_model(model, bits, method, importance, damping=args.damping)
                Q.apply_quantized(model, quantized)
                if not args.no_bias_correction:
                    Q.correct_bias(model, float_model, calibration)
                quantise_s = time.perf_counter() - t
                row = {"method": method, "bits": bits, "finetune_steps": 0, "quantize_s": round(quantise_s, 1),
                       **measure(quantized, tmp_dir, f"{method}_{bits}")}
                results["runs"].append(row)
                print(f"{method:>10} {bits}b      : R@1 {100 * row['recall@1']:.2f}  MAP@R {100 * row['map@r']:.2f}  "
                      f"{row['size_bytes'] / 2**20:.2f} MiB (x{row['compression_ratio']:.1f})", flush=True)
                if args.finetune_steps > 0 and (args.finetune_bits is None or bits in args.finetune_bits):
                    torch.manual_seed(args.seed)
                    t = time.perf_counter()
                    batches = training_batches(man, train_rows, model.config, train=True, seed=args.seed + 1, **batch_opts)
                    tuned, losses = Q.finetune_centroids(
                        model, quantized, batches, loss_fn, args.finetune_steps, args.finetune_lr,
                        teacher=float_model if args.finetune_loss == "distill" else None,
                        train_float=not args.centroids_only)
                    row = {"method": method, "bits": bits, "finetune_steps": args.finetune_steps,
                           "finetune_s": round(time.perf_counter() - t, 1),
                           "finetune_loss_first": losses[0], "finetune_loss_last": float(np.mean(losses[-5:])),
                           **measure(tuned, tmp_dir, f"{method}_{bits}_ft")}
                    results["runs"].append(row)
                    print(f"{method:>10} {bits}b + ft : R@1 {100 * row['recall@1']:.2f}  MAP@R {100 * row['map@r']:.2f}",
                          flush=True)
                write_json(json_path, results)
    results["complete"] = True
    results["total_s"] = round(time.perf_counter() - t0, 1)
    write_json(json_path, results)
    plot(results, png_path)
    if not args.no_mlflow:
        log_result(results, json_path, png_path)
    print(f"wrote {json_path} and {png_path}")
    return results


# ----------------------------------------------------------------- running and report

def commands(quick: bool, threads: int) -> list[list[str]]:
    """One run per data set, on the quality benchmark's trained K=1 model."""
    sweeps = {"fashion-mnist": [], "cars196": ["--bits", "2", "3", "4", "8", "--finetune-bits", "2", "3", "4"]}
    if quick:
        sweeps = {d: ["--bits", "4", "8", "--finetune-steps", "0"] for d in sweeps}
    out = []
    for dataset, sweep in sweeps.items():
        run = bench_quality.trained_run(dataset, "k1", quick)
        if run is None:
            log(f"compress {dataset}: no trained K=1 model of quality_{dataset} on disk; run --only quality first")
            continue
        out.append([PY, "-m", "bench.bench_compress", "--model", run["model"], "--manifest", run["manifest"],
                    "--dataset", dataset + ("_quick" if quick else ""), *sweep])
    return out


def elapsed(results: Results) -> list[str]:
    return results.wall_time("compress_fashion-mnist") + results.wall_time("compress_cars196")


def report(results: Results) -> list[str]:
    lines = ["## Compression (bench_compress)", "",
             "One section per `bench_compress` run; its Settings line says which corrections around the "
             "clustering were on and what fine-tuning did.", ""]
    # Each data set's main run first, then its variants (cars196, cars196-ft300, cars196-plain, ...).
    found = sorted(results.per_dataset("compress_*.json", skip="compress_sensitivity"),
                   key=lambda item: (item[0].partition("-")[0], len(item[0]), item[0]))
    if not found:
        return lines + ["Not run yet (needs a trained model of the quality benchmark): "
                        f"`{PY} -m bench.run_all --only compress`.", ""]
    for dataset, r in found:
        f = r.get("float", {})
        lines += dataset_heading(dataset, r)
        lines += [f"Model: {r.get('model_config', {}).get('backbone')} (the quality benchmark's K=1 model, seed 0); "
                  f"float32 {f.get('size_bytes', 0) / 2**20:.2f} MiB, R@1 {pct(f.get('recall@1'))}, MAP@R {pct(f.get('map@r'))}.", "",
                  settings(r), "",
                  "| method | bits | centroid fine-tuning steps | size (MiB) | compression | R@1 | MAP@R |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for row in r.get("runs", []):
            lines.append(f"| {row['method']} | {row['bits']} | {row.get('finetune_steps', 0)} | {row['size_bytes'] / 2**20:.2f} "
                         f"| {row['compression_ratio']:.1f}x | {pct(row['recall@1'])} | {pct(row['map@r'])} |")
        lines += [""] + verdict(r)
        lines += compress_sensitivity.section(results, dataset)
        lines += results.image(f"compress_{dataset}.png", f"compression {dataset}")
        fallback = (results.step_command("compress", "--dataset " + dataset)
                    or f"python -m bench.bench_compress --model ... --dataset {dataset}")
        lines += ["", commands_line(r, fallback, "bench-compress"), ""]
    return lines


def settings(r: dict) -> str:
    """One line: which of the preprocessing / fine-tuning options this run used."""
    st = r.get("settings", {})
    if "no_equalize" not in st:  # results from before these options existed
        return ("Settings: no channel equalisation, no bias correction; fine-tuning of the centroids only on the "
                f"metric loss ({st.get('loss')}), Adam lr {st.get('finetune_lr')}.")
    eq = "off" if st["no_equalize"] else f"on ({r.get('equalized_layers')} convs)"
    bc = "off" if st["no_bias_correction"] else f"on ({st.get('calibration_images')} train images)"
    what = "centroids only" if st.get("centroids_only") else "centroids + biases and BatchNorm gamma/beta"
    loss = "distillation to the float model's embeddings" if st.get("finetune_loss") == "distill" \
        else f"the metric loss ({st.get('loss')})"
    bits = st.get("finetune_bits") or r.get("bits")
    return (f"Settings: channel equalisation {eq}; BatchNorm bias correction {bc}; fine-tuning ({', '.join(map(str, bits))} "
            f"bits) trains the {what} on {loss}, {st.get('classes_per_batch')}×{st.get('images_per_class')}-image "
            f"batches, Adam lr {st.get('finetune_lr')}.")


def verdict(r: dict) -> list[str]:
    """The issue's two goals, read off the rows: 4-bit loss-aware within 1 R@1 point
    of float; at 2-3 bits loss-aware above plain k-means."""
    rows = {(x["method"], x["bits"], x.get("finetune_steps", 0)): x for x in r.get("runs", [])}
    base = r.get("float", {}).get("recall@1")
    out = []
    queries = r.get("eval", {}).get("queries")
    se = None
    if queries and base is not None:
        se = 100 * (base * (1 - base) / queries) ** 0.5
        out.append(f"- Noise floor: R@1 is a mean over {queries:,} test queries, so its standard error is "
                   f"≈ {se:.1f} points (binomial); differences under ~{2 * se:.1f} points are not evidence.")
    for ft in sorted({k[2] for k in rows if k[:2] == ("loss-aware", 4)}):
        four = rows[("loss-aware", 4, ft)]
        if base is not None:
            gap = 100 * (base - four["recall@1"])
            label = "4 bits, loss-aware" + (f" + {ft} fine-tuning steps" if ft else "")
            out.append(f"- {label}: R@1 {pct(four['recall@1'])} vs float {pct(base)} "
                       f"({gap:.1f} points lost; goal ≤ 1): **{'met' if gap <= 1 else 'missed'}**.")
    for bits in (2, 3):
        for ft in sorted({k[2] for k in rows if k[1] == bits}):
            ours, theirs = rows.get(("loss-aware", bits, ft)), rows.get(("kmeans", bits, ft))
            if not (ours and theirs):
                continue
            d_r1 = round(100 * (ours["recall@1"] - theirs["recall@1"]), 1) + 0.0  # no "-0.0"
            d_map = round(100 * (ours["map@r"] - theirs["map@r"]), 1) + 0.0
            label = f"{bits} bits{' + centroid fine-tuning' if ft else ''}"
            if se is not None and abs(d_r1) < 2 * se:
                outcome = "no difference beyond noise"
            else:
                outcome = "better" if d_r1 > 0 and d_map > 0 else "worse" if d_r1 < 0 and d_map < 0 else "mixed"
            out.append(f"- {label}: loss-aware vs plain k-means R@1 {d_r1:+.1f}, MAP@R {d_map:+.1f} points: "
                       f"**{outcome}**.")
    return out


if __name__ == "__main__":
    main()
