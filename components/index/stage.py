"""Optional stage: model + manifest -> a gallery index folder for search and serving.

The gallery images (split ``gallery`` when the manifest has one, else
``test``; or ``--split``) are embedded with the model (eval transforms),
L2-normalised and put in a faiss index (dcml.retrieval.index: exact inner
product by default, IVF / HNSW for large galleries, calibrated to a recall@10
target against exact search). The folder carries the model, so queries go
through the gallery's own preprocessing. ``--append`` adds the images of a
manifest that the index does not hold yet (by image_id) to an existing
folder with its own model, without rebuilding the index: ids continue after
the last one.
"""

from __future__ import annotations

from pathlib import Path

import click

from dcml.contracts import events, params
from dcml.contracts.errors import DcmlError
from dcml.contracts.io import check_writable
from dcml.contracts.records import StageTimer

STAGE = "index"
PARAMS = ("index_type", "index_target_recall", "eval_batch_size", "num_workers", "seed")
RENAME = params.STAGE_NAMES[STAGE]


def run(out, manifest, model=None, split: str = "auto", append: bool = False, index_type=None,
        target_recall=None, batch_size=None, num_workers=None, seed=None, device=None) -> dict:
    """Write the index folder ``out`` and return the stage record."""
    from dcml.retrieval import index as index_lib

    values = params.resolve(PARAMS, {"index_type": index_type, "target_recall": target_recall,
                                     "batch_size": batch_size, "num_workers": num_workers, "seed": seed},
                            STAGE, rename=RENAME)
    out = check_writable(out, folder=True)
    timer = StageTimer(STAGE, {"model": _str(model), "manifest": str(manifest), "out": str(out), "split": split,
                               "append": bool(append), **values})
    previous = None
    if append:
        if not out.is_dir():
            raise DcmlError(f"{out}: --append needs an existing index folder; build it first without --append")
        previous = index_lib.GalleryIndex.open(out)
        model_file = previous.model_file
        if model is not None and index_lib.file_sha256(model) != previous.meta["model"]["sha256"]:
            raise DcmlError(f"{model}: not the model the index {out} was built with; drop --model to embed with "
                            "the index's own model, or build a new index")
    elif model is None:
        raise DcmlError("index: pass --model CKPT (the model that embeds the gallery), or --append to an index")
    else:
        model_file = Path(model)

    import pandas as pd
    import torch

    from dcml.algorithm.inference import compute_vectors, device_for
    from dcml.contracts import manifest as manifest_lib
    from dcml.model_files import load_model

    man = manifest_lib.read(manifest)
    splits = index_lib.gallery_splits(split, set(man.df["split"]), str(manifest))
    rows = man.split(*splits)
    skipped = 0
    if previous is not None:
        known = rows["image_id"].astype(str).isin(set(previous.items["image_id"]))
        skipped = int(known.sum())
        rows = rows[~known].reset_index(drop=True)
    elif rows.empty:
        raise DcmlError(f"{manifest}: split(s) {', '.join(splits)} hold no images; pick another --split")

    device = device_for(device)
    net, ckpt = load_model(model_file, device=device)
    vectors = compute_vectors(net, man, rows, kind="embedding", batch_size=int(values["batch_size"]), device=device,
                              num_workers=int(values["num_workers"]), desc=f"index: embed {len(rows)} images")
    vectors = index_lib.normalized(vectors, str(manifest))
    first_id = previous.size if previous is not None else 0
    if previous is not None:
        gallery = previous.index
        if gallery.d != vectors.shape[1]:
            raise DcmlError(f"{out}: the index holds {gallery.d}-d vectors but its model gives {vectors.shape[1]}; "
                            "rebuild the index")
        info = {**previous.meta["build"], **index_lib.append(gallery, vectors, values["target_recall"], values["seed"])}
        items = pd.concat([previous.items, index_lib.items_from_manifest(rows, man.root, first_id)], ignore_index=True)
        sources = list(previous.meta["sources"])
    else:
        gallery, info = index_lib.build(vectors, values["index_type"], values["seed"], values["target_recall"])
        items = index_lib.items_from_manifest(rows, man.root)
        sources = []
    sources.append({"manifest": str(manifest), "dataset": man.dataset, "manifest_fingerprint": man.meta["fingerprint"],
                    "splits": splits, "added": len(rows), "skipped_already_indexed": skipped,
                    "ids": [first_id, first_id + len(rows) - 1] if len(rows) else []})

    search = {name: info[name] for name in ("nprobe", "efSearch") if name in info}
    model_sha = previous.meta["model"]["sha256"] if previous is not None else index_lib.file_sha256(model_file)
    metrics = {"images": int(gallery.ntotal), "added": len(rows), "dim": int(gallery.d),
               "index_recall@10": info["recall@10"],
               "build_seconds": info.get("append_seconds", info["build_seconds"])}
    lineage = {"index_type": info["type"], "dim": int(gallery.d), "model_sha256": model_sha,
               "manifest_fingerprint": man.meta["fingerprint"], "splits": splits, "skipped_already_indexed": skipped,
               "exact": info["exact"], **search, "device": str(device)}
    record = timer.finish(inputs={"model": model_file, "manifest": manifest, "index": out if previous else None},
                          metrics=metrics, extra=lineage)
    meta = {"type": info["type"], "dim": int(gallery.d), "count": int(gallery.ntotal),
            "metric": "inner product of L2-normalised embeddings (cosine)", "search": search,
            "recall@10": info["recall@10"], "exact": info["exact"], "build": info,
            "model": {"sha256": model_sha, "config": dict(net.config),
                      "exec_id": _record_of(ckpt).get("exec_id")},
            "sources": sources, "metrics": metrics, "record": record}
    index_lib.write(out, gallery, items, meta, model_file)
    events.emit("summary", text=describe(record, out))
    return record


def _record_of(ckpt: dict) -> dict:
    import json

    try:
        return json.loads(ckpt.get("record") or "{}")
    except json.JSONDecodeError:
        return {}


def _str(path) -> str | None:
    return None if path is None else str(path)


def describe(record: dict, out) -> str:
    """One line on what was indexed and how exact the search is."""
    m, x = record["metrics"], record["extra"]
    if x["exact"]:
        how = "exact search"
    else:
        knob = "nprobe" if "nprobe" in x else "efSearch"
        how = f"{knob} {x[knob]}: recall@10 vs exact {m['index_recall@10']:.3f}"
    skipped = f", {x['skipped_already_indexed']} already indexed" if x["skipped_already_indexed"] else ""
    return f"{out}: {m['images']} images ({m['added']} added{skipped}), {m['dim']}-d, {x['index_type']} index, {how}"


@click.command(name=STAGE, help="Gallery embeddings -> a faiss index folder for `dcml search` / `dcml serve`.")
@click.option("--model", default=None, type=click.Path(dir_okay=False, path_type=Path),
              help="The dcml checkpoint that embeds the gallery (copied into the index; optional with --append).")
@click.option("--manifest", required=True, type=click.Path(dir_okay=False, path_type=Path), help="Manifest Parquet.")
@click.option("--split", default="auto", show_default=True,
              help="Split(s) to index, comma-separated; auto = gallery, else test; all = every split.")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path), help="Index folder.")
@click.option("--append", is_flag=True, help="Add the manifest's images the index does not hold yet to --out.")
@params.click_options(*PARAMS, rename=RENAME)
@click.option("--device", default=None, help="cpu | cuda | cuda:N (default: cuda when available).")
def cli(model, manifest, split, out, append, index_type, target_recall, batch_size, num_workers, seed, device):
    record = run(out=out, manifest=manifest, model=model, split=split, append=append, index_type=index_type,
                 target_recall=target_recall, batch_size=batch_size, num_workers=num_workers, seed=seed,
                 device=device)
    click.echo(describe(record, out))
