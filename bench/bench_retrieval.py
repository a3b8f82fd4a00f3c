"""Benchmark of retrieval: gallery index build and search, exact vs approximate, and the HTTP server.

Index cases (each in a fresh process, so its peak RSS is its own; 1 thread):

* cars196: the test images of Stanford Cars' training half (official split) embedded by
  EfficientNet-Lite0 (offline ImageNet weights, 128 px, a seeded random
  128-d head: search speed does not depend on how well the head is trained),
  through the index stage (``components.index.stage.run``);
* synthetic: 100k and 1M unit 128-d vectors in classes of 5-10
  (``bench.common.class_embeddings``).

For each case and index type (flat = exact inner product, ivf, hnsw;
``dcml.retrieval.index.build``): build seconds (training + adding), the
calibration that raises nprobe / efSearch until recall@10 vs exact reaches
0.95 on 1,000 gallery vectors as queries (own row excluded), the recall
reached, queries/s one query at a time (bounded: at most 1,000 queries and
20 s) and in one batch of 1,000, the trade-off (recall and batch queries/s at
every setting the calibration tried), the index's size and the peak RSS of the
process (the vectors are generated once and loaded from disk).

Server: ``dcml serve`` on the cars196 index (its own process, 1 thread),
with micro-batching (its defaults) and without (``--batch-max 1``);
1, 8 and 32 concurrent clients on loopback POST a cars196 JPEG to /search
(k=10), each setting bounded to 400 requests and 60 s; requests/s, p50 / p99
latency and the mean batch the server embedded (from /healthz).

    python -m bench.bench_retrieval                 # writes bench/results/retrieval.json
    python -m bench.bench_retrieval --quick         # 4k cars + 100k only, shorter server runs
    python -m bench.bench_retrieval --server-only   # only the server rows, into the existing result file
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from bench.common import REPO, RESULTS, WORK, log, result_header, set_threads, write_result
from bench.report import PY, Results, commands_line, num

DIM = 128
SYNTHETIC = (100_000, 1_000_000)
QUICK_SYNTHETIC = (100_000,)
TYPES = ("flat", "ivf", "hnsw")
QUERIES = 1000
SEARCH_SECONDS = 20.0
CLIENTS = (1, 8, 32)
# `dcml serve` settings compared: (name, its options).
SERVER_SETTINGS = (("batched", []), ("unbatched", ["--batch-max", "1"]))
SERVER_REQUESTS = 400
SERVER_WARMUP = 10  # requests sent to a fresh server before the measured ones
SERVER_SECONDS = 60.0
K = 10


def _rss_mib(key: str = "VmHWM") -> float:
    """This process's peak (VmHWM) or current (VmRSS) resident memory."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def synthetic_file(n: int, seed: int) -> Path:
    """n synthetic vectors saved once (runs/bench/retrieval), so each case's process only loads them."""
    from bench.common import class_embeddings

    path = WORK / "retrieval" / f"synthetic-{n}-seed{seed}.npy"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, class_embeddings(n, DIM, seed)[0])
    return path


def child_index(source: str, kind: str, seed: int) -> None:
    """Build and time one index in this (fresh) process; print a JSON line."""
    import faiss

    from dcml.retrieval import index as index_lib

    vectors = index_lib.normalized(np.load(source))
    rss_data = _rss_mib("VmRSS")
    index, info = index_lib.build(vectors, kind, seed)
    rng = np.random.default_rng(seed + 1)
    queries = vectors[rng.choice(len(vectors), size=min(QUERIES, len(vectors)), replace=False)]
    done, t0 = 0, time.perf_counter()
    while done < len(queries) and time.perf_counter() - t0 < SEARCH_SECONDS:
        index.search(queries[done:done + 1], K)
        done += 1
    one_at_a_time = done / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    index.search(queries, K)
    batched = len(queries) / (time.perf_counter() - t0)
    # The speed at every setting the calibration tried (its recall is in the curve): the trade-off.
    tradeoff = []
    for value, recall in info.get("calibration") or []:
        index_lib.set_knob(index, value)
        t0 = time.perf_counter()
        index.search(queries, K)
        tradeoff.append([value, recall, round(len(queries) / (time.perf_counter() - t0), 1)])
    print(json.dumps({"n": len(vectors), "type": kind, "build_s": info["build_seconds"],
                      "calibration_s": info.get("calibration_seconds"), "recall@10": info["recall@10"],
                      "knob": {name: info[name] for name in ("nprobe", "efSearch") if name in info},
                      "params": info["params"], "calibration": info.get("calibration"),
                      "qps_single": round(one_at_a_time, 1), "single_queries": done, "qps_batch": round(batched, 1),
                      "tradeoff": tradeoff,
                      "peak_rss_mib": round(_rss_mib(), 1), "rss_after_data_mib": round(rss_data, 1),
                      # The index file's size: its vectors, lists or graph links, as held in memory.
                      "index_mib": round(faiss.serialize_index(index).nbytes / 2**20, 1)}))


def index_in_child(source: str, kind: str, seed: int, threads: int | None) -> dict:
    cmd = [sys.executable, "-m", "bench.bench_retrieval", "--child-index", source, kind, "--seed", str(seed)]
    if threads:
        cmd += ["--threads", str(threads)]
    proc = subprocess.run(cmd, cwd=REPO, stdout=subprocess.PIPE, text=True, env=dict(os.environ))
    if proc.returncode != 0:
        raise RuntimeError(f"index {kind} of {source} failed with exit status {proc.returncode}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def cars196_index(seed: int) -> tuple[Path, Path, dict] | None:
    """(index folder, one query JPEG, index stage record) of the cars196 test split, built once."""
    from bench.bench_speed import CARS196

    if not CARS196.is_dir():
        return None
    import torch

    from components.index.stage import run as index_stage
    from components.ingest.stage import run as ingest
    from dcml.algorithm.models import build_model, default_config
    from dcml.contracts import checkpoint
    from dcml.contracts import manifest as manifest_lib

    work = WORK / "retrieval"
    manifest = work / "cars196-manifest.parquet"
    if not manifest.exists():
        ingest(dataset="cars196", out=str(manifest), root=str(CARS196), split_mode="official")
    model = work / "cars196-model.pt"
    torch.manual_seed(seed)
    net = build_model(default_config(backbone="efficientnet_lite0", weights="imagenet", image_size=128,
                                     embedding_dim=DIM))
    checkpoint.save(model, {"model_config": net.config, "model": net.state_dict(), "record": "{}"})
    folder = work / "cars196-index"
    record = index_stage(out=folder, manifest=manifest, model=model, index_type="flat", batch_size=64, seed=seed)
    man = manifest_lib.read(manifest)
    query = man.root / man.split("train")["path"].iloc[0]
    return folder, query, record


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_load(folder: Path, query: Path, clients: tuple[int, ...], requests_per_setting: int,
                seconds: float) -> list[dict]:
    """Requests/s and latency percentiles of `dcml serve`, for each server setting and number of clients."""
    rows = []
    for name, options in SERVER_SETTINGS:
        with served(folder, options) as url:
            _load(url, query.read_bytes(), query.name, 1, SERVER_WARMUP, seconds)  # first requests: not counted
            for n in clients:
                before = _batching(url)
                row = {"server": name, "options": " ".join(options) or "defaults",
                       **_load(url, query.read_bytes(), query.name, n, requests_per_setting, seconds)}
                after = _batching(url)
                batches = after["batches"] - before["batches"]
                row.update(batch_window_ms=after["window_ms"], batch_max=after["max_batch"],
                           mean_batch=round((after["queries"] - before["queries"]) / batches, 2) if batches else None)
                rows.append(row)
                log(f"  server {name}, {n} client(s): {row}")
    return rows


@contextmanager
def served(folder: Path, options: list[str]):
    """The URL of `dcml serve` on ``folder`` (its own process, the benchmark's thread settings)."""
    import requests

    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "dcml_app.cli", "serve", "--index", str(folder),
                               "--port", str(port), "--no-access-log", *options], cwd=REPO, env=dict(os.environ),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if requests.get(f"{url}/healthz", timeout=2).ok:
                    break
            except requests.ConnectionError:
                pass
            if time.monotonic() > deadline or server.poll() is not None:
                raise RuntimeError("dcml serve did not come up")
            time.sleep(0.5)
        yield url
    finally:
        server.terminate()
        server.wait(timeout=30)


def _batching(url: str) -> dict:
    import requests

    return requests.get(f"{url}/healthz", timeout=10).json()["batching"]


def _load(url: str, body: bytes, name: str, n: int, requests_total: int, seconds: float) -> dict:
    """``n`` client threads, each with its connection, POST ``body`` until ``requests_total`` or ``seconds``."""
    import requests

    latencies: list[float] = []
    errors = []
    lock = threading.Lock()
    stop_at = time.monotonic() + seconds
    remaining = [requests_total]

    def client():
        with requests.Session() as session:
            while time.monotonic() < stop_at:
                with lock:
                    if remaining[0] <= 0:
                        return
                    remaining[0] -= 1
                t0 = time.perf_counter()
                r = session.post(f"{url}/search", params={"k": K}, timeout=60,
                                 files={"image": (name, body, "image/jpeg")})
                with lock:
                    (latencies if r.ok else errors).append(time.perf_counter() - t0)

    threads = [threading.Thread(target=client) for _ in range(n)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    ms = sorted(1000 * v for v in latencies)
    return {"clients": n, "requests": len(ms), "errors": len(errors), "wall_s": round(wall, 2),
            "requests_per_s": round(len(ms) / wall, 2), "p50_ms": round(statistics.median(ms), 1),
            "p99_ms": round(ms[min(len(ms) - 1, int(0.99 * len(ms)))], 1)}


def served_cars196(seed: int) -> tuple[Path, Path]:
    """(index folder, query JPEG) of the cars196 server rows: the index built earlier, else built now."""
    from dcml.contracts import manifest as manifest_lib

    work = WORK / "retrieval"
    folder, manifest = work / "cars196-index", work / "cars196-manifest.parquet"
    if not (folder / "index.json").exists() or not manifest.exists():
        built = cars196_index(seed)
        if not built:
            raise SystemExit("the server rows need the cars196 images (bench.bench_speed.CARS196); install them")
        return built[0], built[1]
    man = manifest_lib.read(manifest)
    return folder, man.root / man.split("train")["path"].iloc[0]


def server_only(a, out_path: Path) -> dict:
    """The server rows alone, written into the existing result file (its index cases kept)."""
    folder, query = served_cars196(a.seed)
    report = json.loads(out_path.read_text()) if out_path.exists() else \
        {**result_header("retrieval: index build, search, server", "bench.bench_retrieval", []), "cases": []}
    run = result_header("retrieval: server rows", "bench.bench_retrieval", None)
    t0 = time.perf_counter()
    requests_per_setting = 100 if a.quick else SERVER_REQUESTS
    report["server"] = server_load(folder, query, CLIENTS, requests_per_setting, SERVER_SECONDS)
    report["server_bounds"] = {"requests": requests_per_setting, "seconds": SERVER_SECONDS, "k": K,
                               "query": query.name}
    report["server_run"] = {"command": run["command"], "started": run["started"], "machine": run["machine"],
                            "wall_s": round(time.perf_counter() - t0, 1),
                            "load_average_end": [round(v, 2) for v in os.getloadavg()],
                            "dcml_git_commit": run["versions"]["dcml_git_commit"], "note": a.note}
    from dcml.contracts.io import write_json

    write_json(out_path, report)
    log(f"wrote the server rows into {out_path}")
    return report


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="100k synthetic only, shorter server runs")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--server-only", action="store_true",
                        help="only the server rows, written into the existing result file (its index cases kept)")
    parser.add_argument("--note", default="", help="with --server-only: a note kept with the server rows (e.g. what "
                                                   "else ran on the machine)")
    parser.add_argument("--child-index", nargs=2, metavar=("SOURCE", "TYPE"), help=argparse.SUPPRESS)
    a = parser.parse_args(argv)
    threads = set_threads(a.threads or None)
    if a.child_index:
        child_index(a.child_index[0], a.child_index[1], a.seed)
        return {}

    out_path = a.out or RESULTS / f"retrieval{'_quick' if a.quick else ''}.json"
    if a.server_only:
        return server_only(a, out_path)
    report = result_header("retrieval: index build, search, server", "bench.bench_retrieval", argv)
    report.update(dim=DIM, threads=threads or "default", queries=QUERIES, k=K, search_seconds_bound=SEARCH_SECONDS,
                  quick=a.quick, cases=[], server=[])
    t_start = time.perf_counter()
    built = cars196_index(a.seed)
    sources = []
    if built:
        folder, query, record = built
        from dcml.retrieval.index import GalleryIndex, stored_vectors

        vectors_file = folder.parent / "cars196-vectors.npy"
        np.save(vectors_file, stored_vectors(GalleryIndex.open(folder).index))
        report["cars196"] = {"images": record["metrics"]["images"], "embed_and_index_s": record["duration_s"],
                             "model": "efficientnet_lite0 imagenet, 128 px, random 128-d head"}
        sources.append(("cars196", str(vectors_file)))
    sources += [(f"synthetic {n:,}", str(synthetic_file(n, a.seed))) for n in (QUICK_SYNTHETIC if a.quick else SYNTHETIC)]
    for name, source in sources:
        for kind in TYPES:
            log(f"retrieval: {name} {kind} ...")
            row = {"gallery": name, **index_in_child(source, kind, a.seed, threads)}
            log(f"  {row}")
            report["cases"].append(row)
            report["total_wall_s"] = round(time.perf_counter() - t_start, 1)
            write_result(out_path, report, complete=False)
    if built:
        requests_per_setting = 100 if a.quick else SERVER_REQUESTS
        report["server"] = server_load(built[0], built[1], CLIENTS, requests_per_setting, SERVER_SECONDS)
        report["server_bounds"] = {"requests": requests_per_setting, "seconds": SERVER_SECONDS, "k": K,
                                   "query": built[1].name}
    report["total_wall_s"] = round(time.perf_counter() - t_start, 1)
    write_result(out_path, report, complete=True)
    log(f"wrote {out_path} in {report['total_wall_s']:.0f} s")
    return report


# ----------------------------------------------------------------- running and report

def commands(quick: bool, threads: int) -> list[list[str]]:
    return [[PY, "-m", "bench.bench_retrieval", "--threads", str(threads), *(["--quick"] if quick else [])]]


def elapsed(results: Results) -> list[str]:
    return results.wall_time("retrieval")


def report(results: Results) -> list[str]:
    result = results.best("retrieval")
    lines = ["## Retrieval: gallery index, search and server (bench_retrieval)", ""]
    if not result:
        return lines + [f"Not run yet: `{PY} -m bench.bench_retrieval`.", ""]
    if result.get("quick"):
        lines += ["**Quick run: 100k synthetic only.**", ""]
    cars = result.get("cars196")
    lines += [f"One thread; {result.get('dim')}-d L2-normalised vectors, inner-product search, k={result.get('k')}. "
              "Approximate indexes are calibrated when built: nprobe (IVF) / efSearch (HNSW) doubles until "
              f"recall@10 against exact search reaches 0.95 on {result.get('queries'):,} gallery vectors as queries "
              "(own row excluded); the recall column is the one reached and stored in the index. Single = one query "
              f"per call (at most {result.get('queries'):,} queries or {result.get('search_seconds_bound'):.0f} s), "
              "batch = the 1,000 queries in one call. Index size is that of the saved faiss index (its vectors, "
              "lists or graph links, as held in memory); peak RSS is the whole process (the vectors, their "
              "normalised copy, the index, ~0.3 GB of imports)."
              + (f" cars196: {cars['images']:,} test images, {cars['model']}; embedding them and building the "
                 f"exact index took {cars['embed_and_index_s']:.0f} s." if cars else ""), "",
              "| gallery | index | build (s) | search setting | recall@10 vs exact | queries/s single | "
              "queries/s batch | speed-up single vs exact | index size (MiB) | peak RSS (MiB) |",
              "|---|---|---:|---|---:|---:|---:|---:|---:|---:|"]
    exact = {r["gallery"]: r["qps_single"] for r in result.get("cases", []) if r["type"] == "flat"}
    for r in result.get("cases", []):
        knob = ", ".join(f"{k}={v}" for k, v in {**r.get("params", {}), **r.get("knob", {})}.items()
                         if k in ("nlist", "nprobe", "M", "efSearch")) or "exact"
        speedup = r["qps_single"] / exact[r["gallery"]] if exact.get(r["gallery"]) else None
        lines.append(f"| {r['gallery']} | {r['type']} | {num(r['build_s'], 2)} | {knob} | {r['recall@10']:.3f} "
                     f"| {num(r['qps_single'], 0)} | {num(r['qps_batch'], 0)} | {num(speedup, 1, 'x')} "
                     f"| {num(r.get('index_mib'), 0)} | {num(r['peak_rss_mib'], 0)} |")
    approximate = [r for r in result.get("cases", []) if r.get("tradeoff")]
    if approximate:
        lines += ["", "Recall@10 against exact search and batch queries/s at every setting the calibration tried "
                      "(setting: recall, q/s):", ""]
        for r in approximate:
            name = "nprobe" if r["type"] == "ivf" else "efSearch"
            size = f" of {r['params']['nlist']} lists" if r["type"] == "ivf" else ""
            lines.append(f"- {r['gallery']}, {r['type']} ({name}{size}): "
                         + "; ".join(f"{v}: {rec:.3f}, {num(q, 0)}" for v, rec, q in r["tradeoff"]))
        def setting(r):
            name = "nprobe" if r["type"] == "ivf" else "efSearch"
            size = f" of {r['params']['nlist']}" if r["type"] == "ivf" else ""
            return f"{r['type'].upper()} {name} {r['knob'][name]}{size}"

        short = [r for r in approximate if r["recall@10"] < 0.95]
        cars = [r for r in approximate if r["gallery"] == "cars196"]
        lines += ["", "The synthetic vectors are the benchmarks' model of test embeddings (classes of 5-10 around "
                      "random unit centres, Recall@1 about 0.8): beyond a query's few classmates, its 10 nearest "
                      "neighbours are near-ties among unrelated random vectors, the hardest case for IVF and HNSW, so "
                      "0.95 recall@10 takes settings close to an exhaustive scan there"
                  + ("; " + "; ".join(f"{r['gallery']} {setting(r)} is the largest tried and reaches "
                                      f"{r['recall@10']:.3f}" for r in short) if short else "")
                  + "." + (" The cars196 embeddings, with the structure of real data, reach it at "
                           + " and ".join(setting(r) for r in cars) + "." if cars else "")]
    server = result.get("server", [])
    if server:
        bounds = result.get("server_bounds", {})
        run = result.get("server_run") or {}
        lines += ["", f"Server (`dcml serve` on the cars196 index, its own process, 1 thread; clients on loopback "
                      f"POST one cars196 JPEG to /search, k={bounds.get('k')}; at most {bounds.get('requests')} "
                      f"requests or {bounds.get('seconds', 0):.0f} s per setting). Each request decodes, embeds "
                      "(EfficientNet-Lite0, 128 px) and searches; batched: concurrent queries embedded together "
                      "(`dcml serve` defaults), unbatched: `--batch-max 1`; mean batch: queries per forward pass:",
                  "", "| server | concurrent clients | requests | errors | requests/s | p50 latency (ms) "
                      "| p99 latency (ms) | mean batch |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for s in server:
            lines.append(f"| {s.get('server', 'unbatched')} | {s['clients']} | {s['requests']} | {s['errors']} "
                         f"| {s['requests_per_s']:.1f} | {s['p50_ms']:.0f} | {s['p99_ms']:.0f} "
                         f"| {num(s.get('mean_batch'), 1)} |")
        gains = []
        for kind in dict.fromkeys(s.get("server", "unbatched") for s in server):
            rate = {s["clients"]: s["requests_per_s"] for s in server if s.get("server", "unbatched") == kind}
            if rate.get(1):
                gains.append(f"{kind} " + ", ".join(f"{rate[n] / rate[1]:.2f}x at {n}" for n in sorted(rate) if n > 1))
        if gains:
            lines += ["", "Requests/s over those of one client: " + "; ".join(gains) + "."]
        if run:
            lines += ["", f"Server rows: `{run['command']}` ({run['started'][:16].replace('T', ' ')} UTC, load "
                          f"average {run['machine']['load_average'][0]:.1f} at the start on "
                          f"{run['machine']['cores']} cores{'; ' + run['note'] if run.get('note') else ''})."]
    lines += ["", commands_line(result, results.step_command("retrieval")), ""]
    return lines


if __name__ == "__main__":
    main()
