"""Benchmark of retrieval: gallery index build and search, exact vs approximate, and the HTTP server.

Index cases (each in a fresh process, so its peak RSS is its own; 1 thread):

* cars196: the test images of Stanford Cars' training half (official split) embedded by
  EfficientNet-Lite0 (offline ImageNet weights, 128 px, a seeded random
  128-d head: search speed does not depend on how well the head is trained),
  through the index stage (``components.index.stage.run``);
* synthetic: 100k and 1M unit 128-d vectors in classes of 5-10
  (``bench.common.class_embeddings``): near-random beyond a query's few
  classmates, the worst case for approximate search;
* omniglot views: a structured 1M gallery of real embeddings, Omniglot's
  19,280 background images x 52 views (one as it is, 51 under random affine
  maps) through a small CNN trained 3 epochs (:func:`omniglot_views_file`).

For each case and index type (flat = exact inner product, ivf, hnsw, ivfpq =
compressed codes + exact re-ranking of a short list;
``dcml.retrieval.index.build``): build seconds (training + adding), the
calibration that raises nprobe / efSearch until recall@10 vs exact reaches
0.95 on 1,000 gallery vectors as queries (own row excluded), the recall
reached, queries/s one query at a time (bounded: at most 1,000 queries and
20 s) and in one batch of 1,000, the trade-off (recall, batch and single
queries/s at every setting the calibration tried), the bytes the index holds
in memory (``index_mib``; the compressed index maps its exact vectors from
its file instead: ``file_mib`` is the whole file), the peak RSS of the
building process (the vectors are generated once and loaded from disk) and of
a fresh process that opens the saved index as dcml does and answers the
single queries (``serve_rss_mib``).

Server: ``dcml serve`` on the cars196 index (its own process, 1 thread),
with micro-batching (its defaults) and without (``--batch-max 1``);
1, 8 and 32 concurrent clients on loopback POST a cars196 JPEG to /search
(k=10), each setting bounded to 400 requests and 60 s; requests/s, p50 / p99
latency and the mean batch the server embedded (from /healthz).

    python -m bench.bench_retrieval                 # writes bench/results/retrieval.json
    python -m bench.bench_retrieval --quick         # 4k cars + 100k only, shorter server runs
    python -m bench.bench_retrieval --server-only   # only the server rows, into the existing result file
    python -m bench.bench_retrieval --galleries omniglot-views --types ivf,ivfpq   # these rows, merged in
"""

from __future__ import annotations

import argparse
import json
import math
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
GALLERIES = ("cars196", "synthetic-100k", "synthetic-1m", "omniglot-views")
OMNIGLOT_VIEWS = 52  # x 19,280 images = 1,002,560 vectors
TYPES = ("flat", "ivf", "hnsw", "ivfpq")
TRADEOFF_SINGLE = (300, 5.0)  # single queries per trade-off setting: at most this many, or seconds
QUERIES = 1000
SEARCH_SECONDS = 20.0
CLIENTS = (1, 8, 32)
# `dcml serve` settings compared: (name, its options).
SERVER_SETTINGS = (("batched", []), ("unbatched", ["--batch-max", "1"]))
SERVER_REQUESTS = 1500  # per setting and number of clients, over SERVER_ROUNDS rounds
SERVER_ROUNDS = 3
SERVER_WARMUP = 10  # requests sent to a fresh server before the measured ones
SERVER_SECONDS = 90.0
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


OMNIGLOT_GALLERY = f"omniglot {OMNIGLOT_VIEWS} views"


def _gallery_key(name: str) -> str:
    """A case's gallery name as --galleries spells it."""
    if name.startswith("omniglot"):
        return "omniglot-views"
    if name.startswith("synthetic"):
        return "synthetic-1m" if name.endswith("1,000,000") else "synthetic-100k"
    return name


def omniglot_views_file(views: int, seed: int) -> Path | None:
    """A structured gallery of about 1M real embeddings: all 19,280 images of Omniglot's background set, each
    as ``views`` views (view 0 as it is, the others under a random affine map: rotation +-15 degrees, scale
    0.85-1.15, shear +-0.15, shift +-10 %), embedded by the small CNN bench_rerank trains (3 epochs, 128-d);
    saved once (runs/bench/retrieval), rows in image order then view order."""
    from bench.bench_rerank import omniglot_manifest, omniglot_model

    path = WORK / "retrieval" / f"omniglot-views{views}-seed{seed}.npy"
    if path.exists():
        return path
    model_path = omniglot_model(3, seed)
    if model_path is None:
        return None
    import torch
    import torch.nn.functional as F
    from torch.utils.data import DataLoader

    from dcml.algorithm.data import ManifestImageDataset, build_transform, normalization
    from dcml.contracts import manifest as manifest_lib
    from dcml.retrieval.api import load_model

    man = manifest_lib.read(omniglot_manifest())
    net = load_model(model_path, "cpu").embedder.net.eval()
    rows = man.df.reset_index(drop=True)
    data = ManifestImageDataset(man, rows, build_transform(net.config, train=False, normalize=False))
    pixels = torch.cat([images for images, _, _ in DataLoader(data, batch_size=1024)])  # [n, 1, 28, 28] in [0, 1]
    mean, std = (torch.tensor(v).view(1, -1, 1, 1) for v in normalization(net.config))
    n = len(pixels)
    out = np.lib.format.open_memmap(path.with_suffix(".partial.npy"), mode="w+", dtype=np.float32,
                                    shape=(n * views, net.embedding_dim))
    gen = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    with torch.inference_mode():
        for view in range(views):
            if view:
                angle = (torch.rand(n, generator=gen) * 2 - 1) * math.radians(15)
                scale = 0.85 + 0.3 * torch.rand(n, generator=gen)
                shear = (torch.rand(n, generator=gen) * 2 - 1) * 0.15
                shift = (torch.rand(n, 2, generator=gen) * 2 - 1) * 0.2  # grid units: 2 = the image's width
                cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
                theta = torch.stack([torch.stack([cos, -sin + shear, shift[:, 0]], 1),
                                     torch.stack([sin, cos, shift[:, 1]], 1)], 1)
                grid = F.affine_grid(theta, list(pixels.shape), align_corners=False)
                images = F.grid_sample(pixels, grid, padding_mode="border", align_corners=False)
            else:
                images = pixels
            for start in range(0, n, 2048):
                batch = (images[start:start + 2048] - mean) / std
                out[view * n + start: view * n + start + len(batch)] = net(batch).numpy()
            log(f"  omniglot views: {view + 1}/{views} ({time.perf_counter() - t0:.0f} s)")
    out.flush()
    del out
    # image-major order: the views of one image side by side
    x = np.load(path.with_suffix(".partial.npy"), mmap_mode="r").reshape(views, n, -1).transpose(1, 0, 2)
    np.save(path, np.ascontiguousarray(x).reshape(n * views, -1))
    path.with_suffix(".partial.npy").unlink()
    return path


def _single_qps(index, queries: np.ndarray, limit: int, seconds: float) -> tuple[float, int]:
    """(queries/s, queries run) one query per call, at most ``limit`` queries or ``seconds``."""
    done, t0 = 0, time.perf_counter()
    while done < min(limit, len(queries)) and time.perf_counter() - t0 < seconds:
        index.search(queries[done:done + 1], K)
        done += 1
    return done / (time.perf_counter() - t0), done


def child_index(source: str, kind: str, seed: int) -> None:
    """Build and time one index in this (fresh) process; print a JSON line."""
    import tempfile

    import faiss

    from dcml.retrieval import index as index_lib

    vectors = index_lib.normalized(np.load(source))
    n = len(vectors)
    rss_data = _rss_mib("VmRSS")
    index, info = index_lib.build(vectors, kind, seed)
    rng = np.random.default_rng(seed + 1)
    queries = vectors[rng.choice(len(vectors), size=min(QUERIES, len(vectors)), replace=False)]
    one_at_a_time, done = _single_qps(index, queries, QUERIES, SEARCH_SECONDS)
    t0 = time.perf_counter()
    index.search(queries, K)
    batched = len(queries) / (time.perf_counter() - t0)
    # The speed at every setting the calibration tried (its recall is in the curve): the trade-off.
    tradeoff = []
    for value, recall in info.get("calibration") or []:
        index_lib.set_knob(index, value)
        t0 = time.perf_counter()
        index.search(queries, K)
        batch_rate = len(queries) / (time.perf_counter() - t0)
        single_rate, _ = _single_qps(index, queries, *TRADEOFF_SINGLE)
        tradeoff.append([value, recall, round(batch_rate, 1), round(single_rate, 1)])
    for name in ("nprobe", "efSearch"):
        if name in info:
            index_lib.set_knob(index, info[name])
    # What stays on disk: the compressed index's exact vectors (mapped when opened, only short lists read).
    mapped = index.ntotal * index.d * 4 if kind in index_lib.MAPPED_TYPES else 0
    peak = _rss_mib()
    with tempfile.TemporaryDirectory(dir=WORK / "retrieval") as tmp:
        faiss.write_index(index, f"{tmp}/index.faiss")
        file_bytes = os.path.getsize(f"{tmp}/index.faiss")
        np.save(f"{tmp}/queries.npy", queries)
        knob = {name: info[name] for name in ("nprobe", "efSearch") if name in info}
        del index, vectors
        serving = _serve_in_child(f"{tmp}/index.faiss", f"{tmp}/queries.npy", kind, knob)
    print(json.dumps({"n": n, "type": kind,
                      "build_s": info["build_seconds"],
                      "calibration_s": info.get("calibration_seconds"), "recall@10": info["recall@10"],
                      "knob": knob, "params": info["params"], "calibration": info.get("calibration"),
                      "qps_single": round(one_at_a_time, 1), "single_queries": done, "qps_batch": round(batched, 1),
                      "tradeoff": tradeoff,
                      "peak_rss_mib": round(peak, 1), "rss_after_data_mib": round(rss_data, 1),
                      # What the index holds in memory: its vectors or codes, lists, ids or graph links.
                      "index_mib": round((file_bytes - mapped) / 2**20, 1), "file_mib": round(file_bytes / 2**20, 1),
                      **serving}))


def child_serve(index_file: str, queries_file: str, kind: str, knob: str) -> None:
    """Open a saved index as dcml does (the compressed one with its vectors mapped) in this fresh process,
    answer the single queries; print its memory and speed as a JSON line."""
    import faiss

    from dcml.retrieval import index as index_lib

    queries = np.load(queries_file)
    before, anon_imports = _rss_mib("VmRSS"), _rss_mib("RssAnon")
    index = faiss.read_index(index_file, faiss.IO_FLAG_MMAP_IFC if kind in index_lib.MAPPED_TYPES else 0)
    for value in json.loads(knob).values():
        index_lib.set_knob(index, value)
    opened = _rss_mib("VmRSS")
    anon_before = _rss_mib("RssAnon")
    rate, _ = _single_qps(index, queries, QUERIES, SEARCH_SECONDS)
    # RSS counts the pages of a mapped file that were read (page cache the kernel may drop, shared between
    # processes); RssAnon is the process's own memory.
    print(json.dumps({"serve_rss_mib": round(_rss_mib(), 1), "serve_rss_opened_mib": round(opened, 1),
                      "serve_rss_before_mib": round(before, 1), "serve_qps_single": round(rate, 1),
                      "serve_rss_file_mib": round(_rss_mib("RssFile"), 1),
                      "serve_anon_opened_mib": round(anon_before, 1), "serve_anon_mib": round(_rss_mib("RssAnon"), 1),
                      "serve_anon_imports_mib": round(anon_imports, 1)}))


def _serve_in_child(index_file: str, queries_file: str, kind: str, knob: dict) -> dict:
    cmd = [sys.executable, "-m", "bench.bench_retrieval", "--child-serve", index_file, queries_file, kind,
           json.dumps(knob), "--threads", "1"]
    proc = subprocess.run(cmd, cwd=REPO, stdout=subprocess.PIPE, text=True, env=dict(os.environ))
    if proc.returncode != 0:
        raise RuntimeError(f"serving {index_file} failed with exit status {proc.returncode}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def index_in_child(source: str, kind: str, seed: int, threads: int | None) -> dict:
    cmd = [sys.executable, "-m", "bench.bench_retrieval", "--child-index", source, kind, "--seed", str(seed)]
    if threads:
        cmd += ["--threads", str(threads)]
    proc = subprocess.run(cmd, cwd=REPO, stdout=subprocess.PIPE, text=True, env=dict(os.environ))
    if proc.returncode != 0:
        raise RuntimeError(f"index {kind} of {source} failed with exit status {proc.returncode}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def served_model(seed: int = 0):
    """The model of the server rows (and of gpu-check's server step), in eval mode: EfficientNet-Lite0, ImageNet
    weights, 128 px, a seeded random 128-d head (search and serving speed do not depend on how well the head
    is trained)."""
    import torch

    from dcml.algorithm.models import build_model, default_config

    torch.manual_seed(seed)
    return build_model(default_config(backbone="efficientnet_lite0", weights="imagenet", image_size=128,
                                      embedding_dim=DIM)).eval()


def save_served_model(path: Path, seed: int = 0) -> Path:
    """:func:`served_model` as a dcml checkpoint at ``path``."""
    from dcml.contracts import checkpoint

    net = served_model(seed)
    checkpoint.save(path, {"model_config": net.config, "model": net.state_dict(), "record": "{}"})
    return path


def cars196_index(seed: int) -> tuple[Path, Path, dict] | None:
    """(index folder, one query JPEG, index stage record) of the cars196 test split, built once."""
    from bench.bench_speed import CARS196

    if not CARS196.is_dir():
        return None
    from components.index.stage import run as index_stage
    from components.ingest.stage import run as ingest
    from dcml.contracts import manifest as manifest_lib

    work = WORK / "retrieval"
    manifest = work / "cars196-manifest.parquet"
    if not manifest.exists():
        ingest(dataset="cars196", out=str(manifest), root=str(CARS196), split_mode="official")
    model = save_served_model(work / "cars196-model.pt", seed)
    folder = work / "cars196-index"
    record = index_stage(out=folder, manifest=manifest, model=model, index_type="flat", batch_size=64, seed=seed,
                         overwrite=True)
    man = manifest_lib.read(manifest)
    query = man.root / man.split("train")["path"].iloc[0]
    return folder, query, record


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_load(folder: Path, query: Path, clients: tuple[int, ...], requests_per_setting: int,
                seconds: float) -> list[dict]:
    """Requests/s and latency percentiles of `dcml serve`, for each server setting and number of clients:
    SERVER_ROUNDS rounds, each running every number of clients in turn (so a slower spell of the machine
    falls on all of them), the median round reported (every round's requests/s kept)."""
    rows = []
    body = query.read_bytes()
    for name, options in SERVER_SETTINGS:
        with served(folder, options) as url:
            for n in (1, max(clients)):  # first requests, each batch size the rounds will see: not counted
                _load(url, body, query.name, n, SERVER_WARMUP * n, seconds)
            rounds: dict[int, list[dict]] = {n: [] for n in clients}
            for _ in range(SERVER_ROUNDS):
                for n in clients:
                    before = _batching(url)
                    row = _load(url, body, query.name, n, requests_per_setting // SERVER_ROUNDS, seconds / SERVER_ROUNDS)
                    after = _batching(url)
                    batches = after["batches"] - before["batches"]
                    rounds[n].append({**row, "mean_batch": round((after["queries"] - before["queries"]) / batches, 2)
                                      if batches else None, "window_ms": after["window_ms"],
                                      "max_batch": after["max_batch"]})
            for n in clients:
                runs = sorted(rounds[n], key=lambda r: r["requests_per_s"])
                median = runs[len(runs) // 2]
                row = {"server": name, "options": " ".join(options) or "defaults",
                       **{k: v for k, v in median.items() if k not in ("window_ms", "max_batch")},
                       "requests": sum(r["requests"] for r in runs), "errors": sum(r["errors"] for r in runs),
                       "rounds_requests_per_s": [r["requests_per_s"] for r in rounds[n]],
                       "batch_window_ms": median["window_ms"], "batch_max": median["max_batch"]}
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


MODEL_COST_BATCHES = (1, 4, 8)


def model_cost(seed: int = 0) -> dict:
    """Milliseconds per image of the served model's forward pass (EfficientNet-Lite0, 128 px, this process's
    threads) in batches of 1, 4 and 8, traced as `dcml serve` runs it and as it is: what micro-batching can
    save per image."""
    import torch

    from dcml.retrieval.embedder import Embedder

    net = served_model(seed)
    out = {"threads": torch.get_num_threads()}
    for name, forward in (("traced", Embedder(net, "cpu", compiled=True).forward), ("eager", net)):
        cost = {}
        with torch.inference_mode():
            for batch in MODEL_COST_BATCHES:
                x = torch.randn(batch, 3, 128, 128)
                for _ in range(3):
                    forward(x)
                rounds, best = max(8, 64 // batch), float("inf")
                for _ in range(3):  # the fastest of 3 timings: the cost without the machine's other work
                    t0 = time.perf_counter()
                    for _ in range(rounds):
                        forward(x)
                    best = min(best, (time.perf_counter() - t0) / rounds / batch)
                cost[str(batch)] = round(1000 * best, 2)
        out[f"{name}_ms_per_image_by_batch"] = cost
    return out


def server_only(a, out_path: Path) -> dict:
    """The server rows alone, written into the existing result file (its index cases kept)."""
    folder, query = served_cars196(a.seed)
    report = json.loads(out_path.read_text()) if out_path.exists() else \
        {**result_header("retrieval: index build, search, server", "bench.bench_retrieval", []), "cases": []}
    run = result_header("retrieval: server rows", "bench.bench_retrieval", None)
    t0 = time.perf_counter()
    requests_per_setting = 100 if a.quick else SERVER_REQUESTS
    report["server"] = server_load(folder, query, CLIENTS, requests_per_setting, SERVER_SECONDS)
    report["server_model_cost"] = model_cost(a.seed)
    report["server_bounds"] = {"requests": requests_per_setting, "seconds": SERVER_SECONDS, "k": K,
                               "query": query.name, "rounds": SERVER_ROUNDS}
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
    parser.add_argument("--galleries", default=",".join(GALLERIES),
                        help=f"comma-separated, of {', '.join(GALLERIES)}; a subset is merged into the existing "
                             "result file (its other rows kept)")
    parser.add_argument("--types", default=",".join(TYPES), help=f"comma-separated index types, of {', '.join(TYPES)}")
    parser.add_argument("--no-server", action="store_true", help="skip the server rows (kept from the result file)")
    parser.add_argument("--model-cost", action="store_true", help="only the served model's cost per image in batches "
                        "of 1, 4, 8, written into the existing result file")
    parser.add_argument("--child-index", nargs=2, metavar=("SOURCE", "TYPE"), help=argparse.SUPPRESS)
    parser.add_argument("--child-serve", nargs=4, help=argparse.SUPPRESS)
    a = parser.parse_args(argv)
    threads = set_threads(a.threads or None)
    if a.child_index:
        child_index(a.child_index[0], a.child_index[1], a.seed)
        return {}
    if a.child_serve:
        child_serve(*a.child_serve)
        return {}
    galleries = [g for g in a.galleries.split(",") if g]
    types = [t for t in a.types.split(",") if t]
    unknown = sorted(set(galleries) - set(GALLERIES)) + sorted(set(types) - set(TYPES))
    if unknown:
        parser.error(f"unknown --galleries / --types: {', '.join(unknown)}")

    out_path = a.out or RESULTS / f"retrieval{'_quick' if a.quick else ''}.json"
    if a.server_only:
        return server_only(a, out_path)
    if a.model_cost:  # into the existing result file, beside the server rows it explains
        from dcml.contracts.io import write_json

        report = json.loads(out_path.read_text())
        report["server_model_cost"] = {**model_cost(a.seed), "command": result_header("", "bench.bench_retrieval",
                                                                                       argv)["command"]}
        write_json(out_path, report)
        log(f"model cost per image: {report['server_model_cost']}")
        return report
    report = result_header("retrieval: index build, search, server", "bench.bench_retrieval", argv)
    report.update(dim=DIM, threads=threads or "default", queries=QUERIES, k=K, search_seconds_bound=SEARCH_SECONDS,
                  quick=a.quick, cases=[], server=[])
    partial = set(galleries) != set(GALLERIES) or set(types) != set(TYPES) or a.no_server
    if partial and out_path.exists():  # merged: the rows not run again are kept, with their commands
        earlier = json.loads(out_path.read_text())
        report["cases"] = [r for r in earlier.get("cases", [])
                           if not (_gallery_key(r["gallery"]) in galleries and r["type"] in types)]
        for key in ("server", "server_bounds", "server_run", "cars196", "omniglot_views"):
            if key in earlier:
                report[key] = earlier[key]
        report["earlier_commands"] = earlier.get("earlier_commands", []) + [earlier.get("command")]
    t_start = time.perf_counter()
    built = cars196_index(a.seed) if "cars196" in galleries or not a.no_server else None
    sources = []
    if built and "cars196" in galleries:
        folder, query, record = built
        from dcml.retrieval.index import GalleryIndex, stored_vectors

        vectors_file = folder.parent / "cars196-vectors.npy"
        np.save(vectors_file, stored_vectors(GalleryIndex.open(folder).index))
        report["cars196"] = {"images": record["metrics"]["images"], "embed_and_index_s": record["duration_s"],
                             "model": "efficientnet_lite0 imagenet, 128 px, random 128-d head"}
        sources.append(("cars196", str(vectors_file)))
    sources += [(f"synthetic {n:,}", str(synthetic_file(n, a.seed))) for n in (QUICK_SYNTHETIC if a.quick else SYNTHETIC)
                if _gallery_key(f"synthetic {n:,}") in galleries]
    if "omniglot-views" in galleries and not a.quick:
        views = omniglot_views_file(OMNIGLOT_VIEWS, a.seed)
        if views:
            report["omniglot_views"] = {"images": 19_280, "views": OMNIGLOT_VIEWS,
                                        "model": "small_cnn 28 px, 128-d, trained 3 epochs on the training classes "
                                                 "(bench_rerank)", "file": str(views.relative_to(REPO))}
            sources.append((OMNIGLOT_GALLERY, str(views)))
    for name, source in sources:
        for kind in types:
            log(f"retrieval: {name} {kind} ...")
            row = {"gallery": name, **index_in_child(source, kind, a.seed, threads)}
            log(f"  {row}")
            report["cases"].append(row)
            report["total_wall_s"] = round(time.perf_counter() - t_start, 1)
            write_result(out_path, report, complete=False)
    report["cases"].sort(key=lambda r: (GALLERIES.index(_gallery_key(r["gallery"])), TYPES.index(r["type"])))
    if built and not a.no_server:
        requests_per_setting = 100 if a.quick else SERVER_REQUESTS
        report["server"] = server_load(built[0], built[1], CLIENTS, requests_per_setting, SERVER_SECONDS)
        report["server_model_cost"] = model_cost(a.seed)
        report["server_bounds"] = {"requests": requests_per_setting, "seconds": SERVER_SECONDS, "k": K,
                                   "query": built[1].name, "rounds": SERVER_ROUNDS}
    report["total_wall_s"] = round(time.perf_counter() - t_start, 1)
    write_result(out_path, report, complete=True)
    if not a.quick:
        plot_tradeoff(report)
    log(f"wrote {out_path} in {report['total_wall_s']:.0f} s")
    return report


# ----------------------------------------------------------------- running and report

def goal_lines(result: dict) -> list[str]:
    """The structured 1M gallery against the goals: >= 1,000 single queries/s at recall@10 >= 0.95, and a
    compressed index in at most 1/8 of flat's memory at recall@10 >= 0.9."""
    cases = [r for r in result.get("cases", []) if r["gallery"] == OMNIGLOT_GALLERY]
    flat = next((r for r in cases if r["type"] == "flat"), None)
    if not cases or not flat:
        return []
    meets = [r for r in cases if r["recall@10"] >= 0.95]
    fastest = max(meets, key=lambda r: r["qps_single"]) if meets else None
    lines = ["", f"Goals on the structured gallery ({flat['n']:,} Omniglot embeddings, 128-d): "]
    if fastest:
        ok = "met" if fastest["qps_single"] >= 1000 else "NOT met"
        lines[-1] += (f"at recall@10 >= 0.95 the fastest single-query search is {fastest['type']} "
                      f"({fastest['recall@10']:.3f}, {fastest['qps_single']:,.0f} q/s one thread; goal 1,000: {ok}; "
                      f"exact {flat['qps_single']:,.0f} q/s)")
        ivf = next((r for r in cases if r["type"] == "ivf"), None)
        if ivf and fastest is not ivf:
            lines[-1] += (f"; IVF, what `--index-type auto` picks from 100,000 images, {ivf['recall@10']:.3f} at "
                          f"{ivf['qps_single']:,.0f} q/s, built in {ivf['build_s']:.0f} s (vs {fastest['build_s']:.0f} s)")
    pq = next((r for r in cases if r["type"] == "ivfpq"), None)
    if pq:
        ratio = pq["index_mib"] / flat["index_mib"]
        ok = "met" if ratio <= 1 / 8 and pq["recall@10"] >= 0.9 else "NOT met"
        lines[-1] += (f"; the compressed index holds {pq['index_mib']:.0f} MiB in memory, 1/{1 / ratio:.1f} of flat's "
                      f"{flat['index_mib']:.0f} MiB, at recall@10 {pq['recall@10']:.3f} (goal <= 1/8 at >= 0.9: {ok}; "
                      f"its file, exact vectors included, {pq['file_mib']:.0f} MiB)")
    lines[-1] += "."
    return lines


def plot_tradeoff(result: dict) -> Path | None:
    """Recall@10 against single-query queries/s (one thread) of every index at every setting its calibration
    tried, one panel per gallery of 1M vectors; the goal's corner dotted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from bench.common import save_png

    galleries = [g for g in dict.fromkeys(r["gallery"] for r in result.get("cases", [])) if
                 max(r["n"] for r in result["cases"] if r["gallery"] == g) >= 10**6]
    if not galleries:
        return None
    fig, axes = plt.subplots(1, len(galleries), figsize=(6.5 * len(galleries), 5), squeeze=False)
    for ax, gallery in zip(axes[0], galleries):
        for r in (r for r in result["cases"] if r["gallery"] == gallery):
            if r["type"] == "flat":
                ax.plot(r["qps_single"], 1.0, marker="s", linestyle="none", color="black", label="flat (exact)")
                continue
            points = [(row[3], row[1]) for row in r.get("tradeoff", []) if len(row) > 3]
            if points:
                ax.plot(*zip(*points), marker="o", label=f"{r['type']} ({r['index_mib']:.0f} MiB in memory)")
        ax.axhline(0.95, linestyle=":", color="grey", linewidth=1)
        ax.axvline(1000, linestyle=":", color="grey", linewidth=1)
        ax.set(xscale="log", xlabel="single-query queries/s, one thread", ylabel="recall@10 against exact search",
               title=f"{gallery}: {max(r['n'] for r in result['cases'] if r['gallery'] == gallery):,} vectors")
        ax.legend(fontsize=8)
    return save_png(fig, RESULTS / "retrieval_tradeoff.png", dpi=100)


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
    cars, views = result.get("cars196"), result.get("omniglot_views")
    lines += [f"One thread; {result.get('dim')}-d L2-normalised vectors, inner-product search, k={result.get('k')}. "
              "Approximate indexes are calibrated when built: nprobe (IVF) / efSearch (HNSW) doubles until "
              f"recall@10 against exact search reaches 0.95 on {result.get('queries'):,} gallery vectors as queries "
              "(own row excluded); the recall column is the one reached and stored in the index. Single = one query "
              f"per call (at most {result.get('queries'):,} queries or {result.get('search_seconds_bound'):.0f} s), "
              "batch = the 1,000 queries in one call. In memory: what the index holds in memory (its vectors or codes, "
              "lists, ids or graph links); ivfpq's are its codes, lists and ids, and it maps its file (those and its "
              "exact vectors: the file's size in brackets) instead of reading it, so a query reads its lists and a "
              "short list of exact vectors from the file. Peak RSS is the whole building "
              "process (the vectors, their normalised copy, the index, ~0.6 GB of imports); serving memory is what "
              "opening the saved index as dcml does and answering the single queries adds to a fresh process: its "
              "own memory, + the pages of the index file it read (ivfpq's short lists; page cache the kernel may "
              "drop and processes share)."
              + (f" cars196: {cars['images']:,} test images, {cars['model']}; embedding them and building the "
                 f"exact index took {cars['embed_and_index_s']:.0f} s." if cars else "")
              + (f" {OMNIGLOT_GALLERY}: the {views['images']:,} images of Omniglot's background set, each as "
                 f"{views['views']} views (one as it is, the others under random affine maps: rotation +-15 degrees, "
                 f"scale 0.85-1.15, shear, shift +-10 %) through a {views['model']}: a structured gallery of real "
                 "embeddings (a query's 10 nearest neighbours include other views of its own image and other images)."
                 if views else ""), "",
              "| gallery | index | build (s) | search setting | recall@10 vs exact | queries/s single | "
              "queries/s batch | speed-up single vs exact | in memory (MiB) | peak RSS (MiB) | serving memory (MiB) |",
              "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    exact = {r["gallery"]: r["qps_single"] for r in result.get("cases", []) if r["type"] == "flat"}
    for r in result.get("cases", []):
        knob = ", ".join(f"{k}={v}" for k, v in {**r.get("params", {}), **r.get("knob", {})}.items()
                         if k in ("nlist", "nprobe", "M", "efSearch", "pq_m", "refine_factor")) or "exact"
        speedup = r["qps_single"] / exact[r["gallery"]] if exact.get(r["gallery"]) else None
        memory = num(r.get("index_mib"), 0) + (f" ({num(r['file_mib'], 0)})" if r.get("file_mib", r.get("index_mib"))
                                                != r.get("index_mib") else "")
        serving = None
        if "serve_anon_mib" in r:  # its own memory, and the pages of its file it read (page cache)
            own = r["serve_anon_mib"] - r["serve_anon_imports_mib"]
            read = r["serve_rss_mib"] - r["serve_rss_before_mib"] - own
            serving = f"{own:.0f}" + (f" + {read:.0f} read" if read >= 1 else "")
        lines.append(f"| {r['gallery']} | {r['type']} | {num(r['build_s'], 2)} | {knob} | {r['recall@10']:.3f} "
                     f"| {num(r['qps_single'], 0)} | {num(r['qps_batch'], 0)} | {num(speedup, 1, 'x')} "
                     f"| {memory} | {num(r['peak_rss_mib'], 0)} | {serving or '-'} |")
    approximate = [r for r in result.get("cases", []) if r.get("tradeoff")]
    if approximate:
        lines += ["", "Recall@10 against exact search, batch and (where measured) single-query queries/s at every "
                      "setting the calibration tried (setting: recall, batch q/s / single q/s):", ""]
        for r in approximate:
            name = "efSearch" if r["type"] == "hnsw" else "nprobe"
            size = f" of {r['params']['nlist']} lists" if "nlist" in r["params"] else ""
            lines.append(f"- {r['gallery']}, {r['type']} ({name}{size}): "
                         + "; ".join(f"{row[0]}: {row[1]:.3f}, {num(row[2], 0)}"
                                     + (f" / {num(row[3], 0)}" if len(row) > 3 else "") for row in r["tradeoff"]))
        def setting(r):
            name = "efSearch" if r["type"] == "hnsw" else "nprobe"
            size = f" of {r['params']['nlist']}" if "nlist" in r["params"] else ""
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
        lines += goal_lines(result)
        if (RESULTS / "retrieval_tradeoff.png").exists():
            lines += ["", "![recall against single-query speed](bench/results/retrieval_tradeoff.png)"]
    server = result.get("server", [])
    if server:
        bounds = result.get("server_bounds", {})
        run = result.get("server_run") or {}
        lines += ["", f"Server (`dcml serve` on the cars196 index, its own process, 1 thread; clients on loopback "
                      f"POST one cars196 JPEG to /search, k={bounds.get('k')}; at most {bounds.get('requests')} "
                      f"requests or {bounds.get('seconds', 0):.0f} s per setting"
                      + (f", in {bounds['rounds']} rounds that take every number of clients in turn; the median "
                         "round shown, every round's requests/s in the last column" if bounds.get("rounds") else "")
                      + "). Each request decodes, embeds (EfficientNet-Lite0, 128 px, traced: `dcml serve "
                      "--compile`, the default) and searches; batched: concurrent queries embedded together "
                      "(`dcml serve` defaults), unbatched: `--batch-max 1`; mean batch: queries per forward pass:",
                  "", "| server | concurrent clients | requests | errors | requests/s | p50 latency (ms) "
                      "| p99 latency (ms) | mean batch | rounds (requests/s) |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
        for s in server:
            lines.append(f"| {s.get('server', 'unbatched')} | {s['clients']} | {s['requests']} | {s['errors']} "
                         f"| {s['requests_per_s']:.1f} | {s['p50_ms']:.0f} | {s['p99_ms']:.0f} "
                         f"| {num(s.get('mean_batch'), 1)} | "
                         + ", ".join(f"{v:.1f}" for v in s.get("rounds_requests_per_s", [])) + " |")
        gains = []
        for kind in dict.fromkeys(s.get("server", "unbatched") for s in server):
            rate = {s["clients"]: s["requests_per_s"] for s in server if s.get("server", "unbatched") == kind}
            if rate.get(1):
                gains.append(f"{kind} " + ", ".join(f"{rate[n] / rate[1]:.2f}x at {n}" for n in sorted(rate) if n > 1))
        if gains:
            lines += ["", "Requests/s over those of one client: " + "; ".join(gains) + "."]
        costs = result.get("server_model_cost") or {}
        cost, eager = costs.get("traced_ms_per_image_by_batch"), costs.get("eager_ms_per_image_by_batch")
        if cost:
            single = {s["clients"]: s for s in server if s.get("server") == "batched"}.get(1)
            lines += ["", "What batching can save on this machine: the traced model's forward pass costs "
                          + ", ".join(f"{ms:.1f} ms per image in batches of {b}" for b, ms in cost.items())
                          + (" (as it is: " + ", ".join(f"{ms:.1f}" for ms in eager.values()) + ")" if eager else "")
                          + f" ({costs['threads']} thread), so one thread embeds at most "
                          f"{1000 / min(cost.values()):.0f} images/s however queries are batched"
                          + (f"; one client's request takes {1000 / single['requests_per_s']:.1f} ms, "
                             f"{1000 / single['requests_per_s'] - cost['1']:.1f} ms of it outside the model (HTTP, "
                             "decoding, search, the answer), work that runs in the request threads beside the model "
                             "on the machine's other core, which the load-generating clients share (the traced model "
                             "runs in TorchScript's interpreter, outside Python, so they do run beside it; the model "
                             "as it is, before `--compile`, gave 1.29x at 8 clients: 47.9 and 61.8 requests/s)"
                             if single else "")
                          + ". On a GPU a batch costs little more than one image: `make gpu-check` measures the "
                            "server there."]
        if run:
            lines += ["", f"Server rows: `{run['command']}` ({run['started'][:16].replace('T', ' ')} UTC, load "
                          f"average {run['machine']['load_average'][0]:.1f} at the start on "
                          f"{run['machine']['cores']} cores{'; ' + run['note'] if run.get('note') else ''})."]
    lines += ["", commands_line(result, results.step_command("retrieval")), ""]
    return lines


if __name__ == "__main__":
    main()
