"""Data-parallel training on this machine: 1 vs 2 processes, images/s, and that they agree.

For each case the training stage (``dcml train``, shared mode, K=2 slices,
re-clustering) runs on the same global batches as

* 1 process x 1 thread (the baseline),
* 1 process x 2 threads (the same two cores, used by one process),
* 2 processes x 1 thread (``--nproc 2``: torchrun, gloo, what gpus_per_task=2 runs),

each in its own fresh process. Reported: the training images/s of the epochs
after the first (the first one warms the kernels up; re-clustering and
validation are outside the epoch's time), the wall time of the whole command
(start-up, torchrun's rendezvous, re-clustering and validation included), the
speed-up of 2 processes over 1, and the largest weight difference between the
1- and 2-process models (the equivalence check of tests/test_distributed.py
at a realistic size).

Cases: Fashion-MNIST, small CNN at 28 px (BatchNorm frozen, no dropout: the
setting in which 2 processes compute what 1 does, up to float rounding), and
Cars196, EfficientNet-Lite0 (ImageNet weights) at 128 px like the cars196
preset (BatchNorm frozen; its drop-connect draws per process, so the models
are close but not equal).

    python -m bench.bench_scale                  # writes bench/results/scale.json
    python -m bench.bench_scale --quick          # smaller: scale_quick.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from bench.common import REPO, RESULTS, WORK, log, result_header, write_result
from bench.report import PY, Results, commands_line, num

CARS196 = REPO.parent / "shared" / "data" / "cars196"
CONFIGS = (  # (label, processes, threads per process)
    ("1 process x 1 thread", 1, 1),
    ("1 process x 2 threads", 1, 2),
    ("2 processes x 1 thread", 2, 1),
)
CASES = {
    "fashion-mnist": {
        "title": "Fashion-MNIST, small CNN 28 px",
        "classes": 5, "per_class": 120, "quick_per_class": 40,
        "args": {"backbone": "small_cnn", "weights": "none", "image-size": 28, "embedding-dim": 64,
                 "freeze-bn": "true", "dropout": 0.0, "miner": "none", "classes-per-batch": 8,
                 "images-per-class": 4, "lr-backbone": 1e-3, "lr-embedding": 1e-3},
        "exact": True,
    },
    "cars196": {
        "title": "Cars196, EfficientNet-Lite0 128 px",
        "classes": 16, "per_class": 24, "quick_per_class": 8,
        "args": {"backbone": "efficientnet_lite0", "weights": "imagenet", "image-size": 128, "embedding-dim": 128,
                 "freeze-bn": "true", "dropout": 0.0, "miner": "reference", "classes-per-batch": 8,
                 "images-per-class": 4, "lr-backbone": 1e-4, "lr-embedding": 1e-3, "batches-per-epoch": 6},
        "exact": False,
    },
}


def manifest_for(case: str, quick: bool) -> Path | None:
    """A small manifest of the case's data set (ingested once into runs/bench/scale)."""
    import pandas as pd

    from components.ingest.stage import run as ingest
    from dcml.contracts import manifest as manifest_lib

    spec = CASES[case]
    folder = WORK / "scale"
    full = folder / f"{case}-full.parquet"
    if not full.exists():
        if case == "cars196":
            if not CARS196.is_dir():
                return None
            ingest(dataset="cars196", out=str(full), root=str(CARS196), split_mode="official")
        else:
            ingest(dataset="fashion-mnist", out=str(full), split_mode="class-disjoint", max_per_class=200)
    per_class = spec["quick_per_class" if quick else "per_class"]
    dest = folder / f"{case}-{spec['classes']}x{per_class}.parquet"
    if not dest.exists():
        man = manifest_lib.read(full)
        df = man.df
        train = df[df["split"] == "train"]
        classes = sorted(train["label"].unique())[:spec["classes"]]
        train = train[train["label"].isin(classes)].groupby("label").head(per_class)
        val = df[df["split"] == "val"]
        val = val[val["label"].isin(sorted(val["label"].unique())[:4])].groupby("label").head(per_class)
        meta = {k: v for k, v in man.meta.items() if k != "schema_version"}
        manifest_lib.write(dest, pd.concat([train, val]), {**meta, "fingerprint": dest.stem})
    return dest


def train(manifest: Path, out: Path, case: str, processes: int, threads: int, epochs: int) -> dict:
    """One `dcml train` in a fresh process; its record and the wall time."""
    spec = CASES[case]
    cmd = [sys.executable, "-m", "dcml_app.cli", "train", "--manifest", str(manifest), "--out", str(out),
           "--num-slices", "2", "--recluster-every", "2", "--epochs", str(epochs), "--eval-every", "0",
           "--seed", "0", "--no-resume", "--threads", str(threads), "--nproc", str(processes)]
    for key, value in spec["args"].items():
        cmd += [f"--{key}", str(value)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(REPO)}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    import torch

    ckpt = torch.load(out, weights_only=True)
    return {"record": json.loads(ckpt["record"]), "model": ckpt["model"], "wall_s": wall}


def run_case(case: str, quick: bool, epochs: int) -> dict | None:
    manifest = manifest_for(case, quick)
    if manifest is None:
        log(f"{case}: data not found, skipped")
        return None
    spec = CASES[case]
    out = {"case": case, "title": spec["title"], "manifest": str(manifest.relative_to(REPO)), "epochs": epochs,
           "settings": spec["args"], "exact_setting": spec["exact"], "configs": []}
    models = {}
    for label, processes, threads in CONFIGS:
        log(f"{case}: {label}")
        result = train(manifest, WORK / "scale" / f"{case}-{processes}x{threads}.pt", case, processes, threads, epochs)
        history = [h for h in result["record"]["history"] if h.get("epoch", 0) > 0]
        steady = history[1:] or history
        images = sum(h["images"] for h in steady)
        seconds = sum(h["seconds"] for h in steady)
        row = {"config": label, "processes": processes, "threads": threads,
               "images_per_s": round(images / seconds, 2), "epoch_images": history[0]["images"],
               "batches_per_epoch": history[0]["batches"], "wall_s": round(result["wall_s"], 1),
               "train_s": round(sum(h["seconds"] for h in history), 1),
               "processes_recorded": result["record"]["extra"].get("processes")}
        log(f"  {row['images_per_s']:.1f} img/s, wall {row['wall_s']:.0f} s")
        out["configs"].append(row)
        models[(processes, threads)] = result["model"]
    base = out["configs"][0]["images_per_s"]
    for row in out["configs"]:
        row["speedup"] = round(row["images_per_s"] / base, 3)
    a, b = models[(1, 1)], models[(2, 1)]
    out["max_weight_diff_1_vs_2_processes"] = max(
        float((a[k] - b[k]).abs().max()) for k in a if a[k].is_floating_point())
    out["parameters"] = int(sum(v.numel() for k, v in a.items() if v.is_floating_point() and "running" not in k))
    out["gradient_bytes_per_step"] = 4 * out["parameters"]
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer images and epochs (a smoke run)")
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated subset of {','.join(CASES)}")
    parser.add_argument("--epochs", type=int, default=None, help="epochs per run [default: 3, quick 2]")
    a = parser.parse_args(argv)
    epochs = a.epochs or (2 if a.quick else 3)
    result = result_header("scale: data-parallel training, 1 vs 2 processes", "bench.bench_scale", argv)
    result.update(quick=a.quick, cases=[])
    name = "scale_quick" if a.quick else "scale"
    t0 = time.perf_counter()
    for case in [c.strip() for c in a.cases.split(",") if c.strip()]:
        outcome = run_case(case, a.quick, epochs)
        if outcome:
            result["cases"].append(outcome)
            write_result(name, result, complete=False)
    result["total_wall_s"] = round(time.perf_counter() - t0, 1)
    if result["cases"]:
        result["gpu_node"] = gpu_node(result["cases"])
    write_result(name, result)
    return result


# ---------------------------------------------------------------- report

def commands(quick: bool, threads: int) -> list[list[str]]:
    # The configurations set their own threads (1 and 2), whatever run_all's --threads.
    return [[PY, "-m", "bench.bench_scale", *(["--quick"] if quick else [])]]


# Bus bandwidth (GB/s) an all-reduce reaches over each link, rounded down from the links' rates:
# what NCCL's own all_reduce_perf typically reports, not measured here.
LINKS = (("NVLink (A100/H100 node)", 150.0), ("PCIe 4.0 x16", 20.0), ("100 Gb/s InfiniBand / RoCE between nodes", 11.0),
         ("25 Gb/s Ethernet between nodes", 2.8))


def allreduce_ms(nbytes: float, processes: int, gbytes_per_s: float) -> float:
    """A ring all-reduce's time: every process sends and receives 2 (N-1)/N of the buffer."""
    return 1e3 * 2 * (processes - 1) / processes * nbytes / (gbytes_per_s * 1e9)


def gpu_node(cases: list[dict]) -> dict:
    """What a GPU node needs for the largest measured model, from the measured sizes."""
    case = max(cases, key=lambda c: c["parameters"])
    nbytes = case["gradient_bytes_per_step"]
    return {
        "model": case["title"], "parameters": case["parameters"], "gradient_mib_per_step": round(nbytes / 2**20, 1),
        "allreduce_ms": {f"{name}, {n} processes": round(allreduce_ms(nbytes, n, bw), 2)
                         for name, bw in LINKS for n in ((4, 8) if "node)" in name or "PCIe" in name else (16,))},
        "per_gpu": {"processes": 1, "cpu_cores": 4, "num_workers": 4, "shm": "8Gi shared by the node's processes"},
    }


def gpu_lines(need: dict) -> list[str]:
    times = "; ".join(f"{link}: {ms:g} ms" for link, ms in need["allreduce_ms"].items())
    return [
        "What a GPU node needs for the same: `gpus_per_task = N` requests N GPUs for each training stage and runs N "
        "processes with NCCL, one GPU each; each process embeds 1/N of every batch, so raise `classes_per_batch` "
        "(or `images_per_class`) with N to keep a GPU busy. Per step the processes exchange the batch's "
        f"embeddings (all-gather, a few KB) and the gradients: one all-reduce of {need['gradient_mib_per_step']} MiB "
        f"for {need['model']} ({need['parameters']:,} parameters, measured above). Estimated ring all-reduce times "
        f"(2 (N-1)/N of the buffer over the link's bus bandwidth, not measured here): {times} -- small next to a "
        "step's compute on a GPU node, so the training loop's speed-up approaches N; between nodes on 25 Gb/s it "
        "starts to count. Each GPU needs as many CPU cores as decoding and augmenting its share of JPEGs takes "
        f"(`num_workers`, about {need['per_gpu']['num_workers']} per GPU for Cars196 at 128 px; `--gpu-cpu`), "
        "the memory for those workers and an in-memory /dev/shm (`--shm-size`). What does not speed up: "
        "re-clustering, validation and checkpoints run on rank 0 alone while the others wait; several nodes "
        "also need a ReadWriteMany volume for the KFP workspace and the data (docs/SCALE.md).",
    ]


def report(results: Results) -> list[str]:
    r = results.best("scale")
    lines = ["## Data-parallel training (1 vs 2 processes)", ""]
    if not r:
        return lines + [f"Not run yet: `{PY} -m bench.bench_scale`.", ""]
    if r.get("quick"):
        lines += ["**Quick (smoke) run: small inputs.**", ""]
    lines += [commands_line(r), "",
              "The training stage (`dcml train`, shared mode, K=2, re-clustering every 2 epochs) on the same "
              "global batches in one process and in two (`--nproc 2`: torchrun, gloo on this CPU machine). "
              "images/s: the training loop of the epochs after the first; wall: the whole command, start-up, "
              "rendezvous, re-clustering and validation included. Two processes on the 2 shared cores of this "
              "machine gain little or lose: the point here is that they compute the same model. The cores are "
              "often shared with other jobs, which hits one process with 2 OpenMP threads hardest (its threads "
              "wait for each other at every operation).", ""]
    for case in r.get("cases", []):
        lines += [f"### {case['title']}", "",
                  f"{case['configs'][0]['epoch_images']} images ({case['configs'][0]['batches_per_epoch']} batches) "
                  f"per epoch, {case['epochs']} epochs; {case['parameters']:,} trained parameters "
                  f"({case['gradient_bytes_per_step'] / 2**20:.1f} MiB of gradients all-reduced per step).", "",
                  "| configuration | images/s | speed-up | train (s) | wall (s) |", "|---|---:|---:|---:|---:|"]
        for row in case["configs"]:
            lines.append(f"| {row['config']} | {num(row['images_per_s'])} | {row['speedup']:.2f}x "
                         f"| {num(row['train_s'])} | {num(row['wall_s'])} |")
        diff = case["max_weight_diff_1_vs_2_processes"]
        lines += ["", f"Largest weight difference between the 1- and 2-process models: {diff:.1e}"
                  + (" (float rounding: the same computation summed in another order)." if case["exact_setting"]
                     else " (EfficientNet-Lite's drop-connect draws its masks per process, so the runs are "
                          "statistically, not numerically, the same)."), ""]
    if r.get("cases"):
        lines += gpu_lines(r.get("gpu_node") or gpu_node(r["cases"])) + [""]
    return lines


def elapsed(results: Results) -> list[str]:
    return results.wall_time("scale")


if __name__ == "__main__":
    main()
