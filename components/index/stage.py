"""Optional stage: model + manifest -> a gallery index folder for search and serving.

The gallery images (split ``gallery`` when the manifest has one, else
``test``; or ``--split``) are embedded with the model (eval transforms),
L2-normalised and put in a faiss index (dcml.retrieval.index: exact inner
product by default, IVF / HNSW for large galleries, calibrated to a recall@10
target against exact search). The folder carries the model, so queries go
through the gallery's own preprocessing. ``--append`` adds the images of a
manifest that the index does not hold yet (by image_id) to an existing
folder with its own model, without rebuilding the index: ids continue after
the last one. ``--folder DIR`` stands for a manifest: the images of DIR
(data_prep.folder.unsplit: class folders, or loose images taking DIR's name
as their class), a class the index holds keeping its label. A poor match
threshold (too few impostor pairs for the rate asked, or under 10 % of true
pairs accepted) gets one warning line (dcml.retrieval.verify.advice).
"""

from __future__ import annotations

from pathlib import Path

import click

from dcml.contracts import events, params
from dcml.contracts.errors import DcmlError
from dcml.contracts.io import check_writable
from dcml.contracts.records import StageTimer
from dcml import stagekit

STAGE = "index"
PARAMS = ("index_type", "index_target_recall", "index_false_match_rate", "eval_batch_size", "num_workers", "seed")
RENAME = params.STAGE_NAMES[STAGE]


def run(out, manifest=None, model=None, split: str = "auto", append: bool = False, overwrite: bool = False,
        remove=(), index_type=None, target_recall=None, false_match_rate=None, batch_size=None, num_workers=None,
        seed=None, device=None, folder=None) -> dict:
    """Write the index folder ``out`` (build, ``append`` a manifest or a ``folder``, or ``remove`` ids) and
    return the record."""
    stagekit.stage_process()  # this process: glibc keeps large batch buffers for reuse
    from data_prep.folder import unsplit
    from dcml.algorithm.inference import resolve_device
    from dcml.retrieval import api
    from dcml.retrieval import index as index_lib

    values = params.resolve(PARAMS, {"index_type": index_type, "target_recall": target_recall,
                                     "false_match_rate": false_match_rate, "batch_size": batch_size,
                                     "num_workers": num_workers, "seed": seed}, STAGE, rename=RENAME)
    remove = [int(i) for i in remove or ()]
    existing = Path(out).exists() and (not Path(out).is_dir() or any(Path(out).iterdir()))
    if (append or remove) and overwrite:
        raise DcmlError("index: --overwrite replaces the index; it does not go with --append or --remove")
    if existing and not (append or remove or overwrite):
        raise DcmlError(f"{out}: already exists; pass --append to add images to it, --remove ID to take items out, "
                        f"or --overwrite to replace it (`dcml threshold --index {out} --false-match-rate RATE` "
                        "changes only the match threshold, nothing re-embedded)")
    if manifest is not None and folder is not None:
        raise DcmlError("index: pass the images with --manifest M or --folder DIR, not both")
    if manifest is None and folder is None and not remove:
        raise DcmlError("index: pass --manifest M or --folder DIR (the images to index), or --remove ID to take "
                        "items out")
    images = unsplit(folder) if folder is not None else None  # path, class_name; read before any work
    out = check_writable(out, folder=True)
    device = resolve_device(device)
    timer = StageTimer(STAGE, {"model": _str(model), "manifest": _str(manifest), "folder": _str(folder),
                               "out": str(out), "split": split,
                               "append": bool(append), "remove": remove, **values})
    if append or remove:
        if not out.is_dir():
            raise DcmlError(f"{out}: --{'append' if append else 'remove'} needs an existing index folder; "
                            "build it first without it")
        index = api.Index.open(out, device)
        if model is not None and index_lib.file_sha256(model) != index.gallery.meta["model"]["sha256"]:
            raise DcmlError(f"{model}: not the model the index {out} was built with; drop --model to embed with "
                            "the index's own model, or build a new index")
        removed = index.remove(remove) if remove else 0
        given = _images_of(manifest, split, images)
        added = index.add(**given, batch_size=int(values["batch_size"]), num_workers=int(values["num_workers"]),
                          seed=int(values["seed"])) if given else []
        source = index.gallery.meta["sources"][-1] if given else {}
        if remove:
            index.gallery.meta.setdefault("removed", []).extend(remove)
    elif model is None:
        raise DcmlError("index: pass --model CKPT (the model that embeds the gallery), or --append to an index")
    else:
        index = api.Index.build(api.load_model(model, device), **_images_of(manifest, split, images, True), path=out,
                                index_type=values["index_type"], target_recall=values["target_recall"],
                                seed=int(values["seed"]), false_match_rate=values["false_match_rate"],
                                batch_size=int(values["batch_size"]), num_workers=int(values["num_workers"]))
        added, removed, source = range(len(index)), 0, index.gallery.meta["sources"][-1]
    if folder is not None:
        source["folder"] = str(folder)
    meta = index.gallery.meta
    info = meta["build"]
    verification = meta.get("verification") or {}
    metrics = {"images": len(index), "added": len(added), "dim": int(meta["dim"]), "index_recall@10": meta["recall@10"],
               "build_seconds": info.get("append_seconds", info["build_seconds"])}
    if remove:
        metrics["removed"] = removed
    if verification:
        metrics.update(match_threshold=verification["threshold"],
                       match_true_rate=verification["true_match_rate"],
                       match_false_rate=verification["measured_false_match_rate"])
    lineage = {"index_type": meta["type"], "dim": int(meta["dim"]), "model_sha256": meta["model"]["sha256"],
               "manifest_fingerprint": source.get("manifest_fingerprint"), "splits": source.get("splits", []),
               "skipped_already_indexed": source.get("skipped_already_indexed", 0), "exact": meta["exact"],
               "picked": None if (append or remove) else info.get("picked"),
               **meta["search"], "device": str(device),
               "verification": {k: v for k, v in verification.items() if k != "table"},
               "threshold_table": verification.get("table", [])}
    model_file = index.model.path
    record = timer.finish(inputs={"model": model_file, "manifest": manifest, "index": out if (append or remove)
                                  else None}, metrics=metrics, extra=lineage)
    meta["model"]["exec_id"] = meta["model"].get("exec_id") or _record_of(_checkpoint(model_file)).get("exec_id")
    index.save(out, exclusive=not (append or remove or overwrite), metrics=metrics, record=record)
    events.emit("summary", text=describe(record, out))
    warning = warning_of(record, out)
    if warning:  # `dcml run` shows it under the stage's line
        events.emit("warning", text=warning)
    return record


def warning_of(record: dict, out) -> str | None:
    """The line that says what to do about a poor match threshold (dcml.retrieval.verify.advice), or None."""
    from dcml.retrieval.verify import advice

    x = record["extra"]
    return advice({**x["verification"], "table": x["threshold_table"]} if x["verification"] else None, out)


def _images_of(manifest, split: str, images, numbered: bool = False) -> dict:
    """The arguments naming the images to index: a manifest's split, or a folder's files with their class names
    (``numbered``: and labels numbering the sorted class names from 0, as the folder reader does); {} for none."""
    if manifest is not None:
        return {"manifest": manifest, "split": split}
    if images is None:
        return {}
    names = images["class_name"].tolist()
    number = {name: i for i, name in enumerate(sorted(set(names)))}
    return {"images": images["path"].tolist(), "class_names": names,
            **({"labels": [number[name] for name in names]} if numbered else {})}


def _checkpoint(path) -> dict:
    from dcml.contracts.checkpoint import load

    return load(path)


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
    removed = f", {m['removed']} removed" if m.get("removed") else ""
    v = x.get("verification") or {}
    match = (f"; match threshold {v['threshold']:.4f} (false-match rate {v['false_match_rate']:g} on the "
             f"validation split, true-match rate {v['true_match_rate']:.3f})" if v else "")
    picked = f" (auto: {x['picked']}; --index-type to choose)" if x.get("picked") else ""
    return (f"{out}: {m['images']} images ({m['added']} added{removed}{skipped}), {m['dim']}-d, {x['index_type']} "
            f"index{picked}, {how}{match}")


@click.command(name=STAGE, help="Gallery embeddings -> a faiss index folder for `dcml search` / `dcml serve`.")
@click.option("--model", default=None, type=click.Path(dir_okay=False, path_type=Path),
              help="The dcml checkpoint that embeds the gallery (copied into the index; optional with --append).")
@click.option("--manifest", default=None, type=click.Path(dir_okay=False, path_type=Path),
              help="Manifest Parquet of the images to index (a 'val' split there chooses the match threshold).")
@click.option("--folder", default=None, type=click.Path(file_okay=False, path_type=Path),
              help="Or: index the images of this folder (class folders, any number, or loose images that take "
                   "the folder's name as their class); no manifest needed.")
@click.option("--split", default="auto", show_default=True,
              help="Split(s) to index, comma-separated; auto = gallery, else test; all = every split.")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path), help="Index folder.")
@click.option("--append", is_flag=True, help="Add the images (--manifest or --folder) the index does not hold yet "
              "to --out.")
@click.option("--overwrite", is_flag=True, help="Replace an existing index folder --out.")
@click.option("--remove", "remove", multiple=True, type=click.IntRange(0),
              help="Remove the item with this id (as `dcml search` shows it) from --out; repeat for several.")
@params.click_options(*PARAMS, rename=RENAME, aliases={"index_target_recall": ("--recall",)})
@click.option("--device", default=None, help="cpu | cuda | cuda:N (default: cuda when available).")
def cli(model, manifest, folder, split, out, append, overwrite, remove, index_type, target_recall, false_match_rate,
        batch_size, num_workers, seed, device):
    record = run(out=out, manifest=manifest, model=model, split=split, append=append, overwrite=overwrite,
                 remove=remove, index_type=index_type, target_recall=target_recall,
                 false_match_rate=false_match_rate, batch_size=batch_size, num_workers=num_workers, seed=seed,
                 device=device, folder=folder)
    click.echo(describe(record, out))
    warning = warning_of(record, out)
    if warning:
        click.echo(f"warning: {warning}", err=True)
