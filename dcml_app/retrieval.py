"""`dcml search` (query images against an index folder), `dcml threshold` (choose an index's match threshold
again), `dcml embed` (images -> a vectors file) and `dcml export` (TorchScript / ONNX). Search, threshold and
embed are command lines of the Python API (dcml.retrieval.api)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from dcml.contracts.errors import DcmlError
from dcml.retrieval.rerank import DEFAULT as RERANK_DEFAULT, HELP as RERANK_HELP, QueryExpansion
from dcml.retrieval.search import MAX_K

RESULT_COLUMNS = ["query", "rank", "id", "image_id", "label", "class_name", "score", "match", "path",
                  "threshold", "false_match_rate", "true_match_rate"]  # the last three: what match means
SHOWN_FAILURES = 10


def query_files(images, folder, recursive: bool) -> list[Path]:
    """The query files: --image paths, or the image files of --folder (subfolders too with ``recursive``)."""
    from dcml.retrieval.embedder import image_files

    if bool(images) == (folder is not None):
        raise DcmlError("search: pass query images with --image PATH (repeatable) or --folder DIR, not both")
    return list(images) if images else image_files(folder, recursive)


def out_format(out: Path | None) -> str | None:
    """csv or jsonl from --out's suffix, checked (and the file writable) before any work."""
    from dcml.contracts.io import check_writable

    if out is None:
        return None
    kind = {".csv": "csv", ".jsonl": "jsonl"}.get(out.suffix.lower())
    if kind is None:
        raise DcmlError(f"{out}: --out must end in .csv or .jsonl (one row per hit)")
    check_writable(out)
    return kind


def report_failures(failed: list[tuple[str, str]], total: int, verbose: bool, what: str = "images") -> None:
    """Skipped files on stderr: a count, the first few (all with --verbose); all failed is a DcmlError."""
    if not failed:
        return
    if len(failed) == total:
        if total == 1:
            raise DcmlError(failed[0][1])
        raise DcmlError(f"all {total} {what} failed, e.g. {failed[0][1]}; pass readable JPEG / PNG images")
    shown = failed if verbose else failed[:SHOWN_FAILURES]
    for _, reason in shown:
        click.echo(f"skipped: {reason}", err=True)
    more = f" ({len(failed) - len(shown)} more: --verbose lists them)" if len(shown) < len(failed) else ""
    click.echo(f"skipped {len(failed)} of {total} {what} that could not be read{more}", err=True)


def search_files(index_dir: Path, paths: list[Path], k: int, device: str | None = None, strict: bool = True,
                 progress: bool = False, rerank: str | None = None):
    """(results [{"query": path, "decision": what match means, "neighbours": [hit, ...]}] in order,
    failed [(path, reason)]); decision: threshold and measured rates (dcml.retrieval.verify.decision)."""
    from dcml.retrieval.api import Index

    index = Index.open(index_dir, device)
    index.gallery.rerank = QueryExpansion.parse(rerank)
    done = index.model.embed_files(paths, strict=strict, progress=progress)
    hits = index.gallery.search(done.vectors, k) if len(done.paths) else []
    return [{"query": path, "decision": index.decision, "neighbours": h} for path, h in zip(done.paths, hits)], \
        done.failed


def flat_rows(results: list[dict]) -> list[dict]:
    def rule(result):
        return {c: (result["decision"] or {}).get(c) for c in RESULT_COLUMNS[-3:]}

    return [{"query": r["query"], "rank": rank, **{c: h[c] for c in RESULT_COLUMNS[2:-3]}, **rule(r)}
            for r in results for rank, h in enumerate(r["neighbours"], 1)]


def write_results(out: Path, kind: str, results: list[dict]) -> None:
    import pandas as pd

    from dcml.contracts.io import atomic_path

    rows = flat_rows(results)
    with atomic_path(out) as tmp:
        if kind == "csv":
            pd.DataFrame(rows, columns=RESULT_COLUMNS).to_csv(tmp, index=False)
        else:
            tmp.write_text("".join(json.dumps(row) + "\n" for row in rows))


def format_table(results: list[dict]) -> str:
    from tabulate import tabulate

    def match(value):
        return "-" if value is None else ("yes" if value else "no")

    blocks = []
    for result in results:
        rows = [(rank, h["id"], h["image_id"], h["label"], h["class_name"], f"{h['score']:.4f}", match(h["match"]),
                 h["path"] or "-") for rank, h in enumerate(result["neighbours"], 1)]
        blocks.append(f"query: {result['query']}\n"
                      + tabulate(rows, headers=["rank", "id", "image_id", "label", "class", "score", "match", "path"]))
    rule = results[0]["decision"] if results else None
    if rule:
        from dcml.retrieval.verify import describe

        blocks.append(describe(rule))
    return "\n\n".join(blocks)


@click.command(name="search", help="Top-k gallery images of query images, from an index folder (`dcml index`). "
               f"k is at most {MAX_K}, as in `dcml serve`'s API. A hit's `match` is true when its score reaches the "
               "index's match threshold (chosen on the validation split at a false-match rate; - when the index "
               "has none); the answer says the threshold and the false- and true-match rates measured when it was "
               "chosen (`dcml threshold` changes it). Unreadable query files are skipped and counted on stderr "
               "(exit 2 only when all fail, or at the first with --strict).")
@click.option("--index", "index_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Index folder written by `dcml index`.")
@click.option("--image", "images", multiple=True, type=click.Path(dir_okay=False, path_type=Path),
              help="A query image; repeat for several.")
@click.option("--folder", default=None, type=click.Path(file_okay=False, path_type=Path),
              help="Every image file in this folder (and its subfolders) is a query.")
@click.option("--recursive/--no-recursive", default=True, show_default=True, help="With --folder: look into subfolders.")
@click.option("--k", default=10, show_default=True, type=click.IntRange(1, MAX_K), help="Neighbours per query.")
@click.option("--format", "fmt", default="table", show_default=True, type=click.Choice(["table", "json"]))
@click.option("--out", default=None, type=click.Path(dir_okay=False, path_type=Path),
              help="Also write the hits to this .csv or .jsonl file (one row per hit).")
@click.option("--strict", is_flag=True, help="Stop at the first unreadable query file (exit 2).")
@click.option("--verbose", "-v", is_flag=True, help="List every skipped file.")
@click.option("--device", default=None, help="cpu | cuda | cuda:N (default: cuda when available).")
@click.option("--rerank", default=RERANK_DEFAULT, show_default=True, help=RERANK_HELP)
def search_cli(index_dir, images, folder, recursive, k, fmt, out, strict, verbose, device, rerank):
    from dcml.algorithm.inference import resolve_device

    paths = query_files(images, folder, recursive)
    kind = out_format(out)
    resolve_device(device)
    QueryExpansion.parse(rerank)  # checked before any work
    results, failed = search_files(index_dir, paths, k, device, strict, progress=len(paths) > 32, rerank=rerank)
    report_failures(failed, len(paths), verbose, "query files")
    if kind:
        write_results(out, kind, results)
    click.echo(json.dumps(results, indent=2) if fmt == "json" else format_table(results))


@click.command(name="threshold", help="Choose an index's match threshold again at another false-match rate, on "
               "the validation embeddings the index keeps: nothing is embedded, the model is not loaded. With "
               "--manifest, on that manifest's held-out labelled images instead (only they are embedded).")
@click.option("--index", "index_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Index folder written by `dcml index`.")
@click.option("--false-match-rate", "rate", required=True, type=float,
              help="Share of different-item pairs that may match, e.g. 0.01.")
@click.option("--manifest", default=None, type=click.Path(dir_okay=False, path_type=Path),
              help="Choose on this manifest's --split (held-out classes, labelled) instead.")
@click.option("--split", default="val", show_default=True, help="With --manifest: the split of held-out images.")
@click.option("--verbose", "-v", is_flag=True, help="Also print the threshold at several rates.")
@click.option("--device", default=None, help="With --manifest: cpu | cuda | cuda:N.")
def threshold_cli(index_dir, rate, manifest, split, verbose, device):
    from dcml.retrieval import api, verify

    verify.check_rate(rate)
    if manifest is None:
        entry = api.rethreshold(index_dir, rate)
    else:
        index = api.Index.open(index_dir, device)
        entry = index.choose_threshold(manifest=manifest, split=split, false_match_rate=rate)
        index.save()
    click.echo(f"{index_dir}: {verify.describe(verify.decision(entry))}")
    if verbose:
        from tabulate import tabulate

        click.echo(tabulate([(r["false_match_rate"], f"{r['threshold']:.4f}", f"{r['measured_false_match_rate']:.4f}",
                              f"{r['true_match_rate']:.3f}") for r in entry["table"]],
                            headers=["asked", "threshold", "false-match rate", "true-match rate"]))
    warning = verify.advice(entry, index_dir)
    if warning:
        click.echo(f"warning: {warning}", err=True)


@click.command(name="embed", help="Images -> a Parquet file of id, path, image_id and embedding (L2-normalised, "
               "float32), for a vector database of your own. Unreadable images are skipped and counted on stderr "
               "(exit 2 only when all fail, or at the first with --strict).")
@click.option("--model", default=None, type=click.Path(dir_okay=False, path_type=Path), help="A dcml checkpoint.")
@click.option("--index", "index_dir", default=None, type=click.Path(file_okay=False, path_type=Path),
              help="Or: an index folder, to embed with its model.")
@click.option("--folder", default=None, type=click.Path(file_okay=False, path_type=Path),
              help="Embed the image files of this folder (and its subfolders).")
@click.option("--recursive/--no-recursive", default=True, show_default=True, help="With --folder: look into subfolders.")
@click.option("--manifest", default=None, type=click.Path(dir_okay=False, path_type=Path),
              help="Embed the images of this manifest (--split).")
@click.option("--split", default="all", show_default=True, help="With --manifest: split(s), comma-separated, or all.")
@click.option("--image", "images", multiple=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Embed this image; repeat for several.")
@click.option("--list", "listing", default=None, type=click.Path(dir_okay=False, path_type=Path),
              help="Embed the image files named in this text file (one path a line).")
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path), help="The .parquet file.")
@click.option("--raw", is_flag=True, help="Keep the model's own norm (each slice unit-norm) instead of unit length.")
@click.option("--strict", is_flag=True, help="Stop at the first unreadable image (exit 2).")
@click.option("--verbose", "-v", is_flag=True, help="List every skipped file.")
@click.option("--device", default=None, help="cpu | cuda | cuda:N (default: cuda when available).")
def embed_cli(model, index_dir, folder, recursive, manifest, split, images, listing, out, raw, strict, verbose, device):
    from dcml.algorithm.inference import resolve_device
    from dcml.contracts.io import check_writable

    if (model is None) == (index_dir is None):
        raise DcmlError("embed: pass --model CKPT or --index DIR (the model that embeds), one of them")
    given = [name for name, value in (("--folder", folder), ("--manifest", manifest), ("--image", images),
                                      ("--list", listing)) if value]
    if len(given) != 1:
        raise DcmlError("embed: pass the images with one of --folder DIR, --manifest M, --image PATH, --list FILE"
                        + (f" (got {', '.join(given)})" if given else ""))
    if out.suffix.lower() != ".parquet":
        raise DcmlError(f"{out}: --out must be a .parquet file")
    check_writable(out)
    resolve_device(device)
    table, embedded, total = embed_inputs(model, index_dir, folder, recursive, manifest, split, images, listing,
                                          not raw, strict, device)
    report_failures(embedded.failed, total, verbose)
    write_embeddings(out, table, embedded, model or Path(index_dir) / "model.pt", not raw)
    click.echo(f"wrote {out}: {len(embedded.paths)} embeddings of {embedded.vectors.shape[1]} dimensions"
               + (f" ({len(embedded.failed)} images skipped)" if embedded.failed else ""))


def listed_files(listing: Path) -> list[Path]:
    if not listing.is_file():
        raise DcmlError(f"{listing}: no such file; pass a text file with one image path a line")
    files = [Path(line.strip()) for line in listing.read_text().splitlines() if line.strip()]
    if not files:
        raise DcmlError(f"{listing}: names no image files; put one image path on each line")
    return [f if f.is_absolute() else listing.parent / f for f in files]


def embed_inputs(model, index_dir, folder, recursive, manifest, split, images, listing, normalize, strict, device):
    """(rows: DataFrame of path / image_id / label / class_name, Embedded, how many images were tried)."""
    import pandas as pd

    from dcml.retrieval.api import load_model
    from dcml.retrieval.embedder import image_files

    if manifest is not None:
        from dcml.contracts import manifest as manifest_lib
        from dcml.retrieval.index import gallery_splits

        man = manifest_lib.read(manifest)
        rows = man.split(*gallery_splits(split, set(man.df["split"]), str(manifest))).reset_index(drop=True)
        net = load_model(model or Path(index_dir) / "model.pt", device)
        done = net.embedder.embed_rows(man, rows, strict, normalize, f"embed {len(rows)} images")
        table = rows.set_index(rows["image_id"].astype(str)).loc[done.paths]
        table = pd.DataFrame({"path": [str(man.root / p) if isinstance(p, str) and p else None for p in table["path"]],
                              "image_id": table["image_id"].astype(str).to_numpy(),
                              "label": table["label"].to_numpy(), "class_name": table["class_name"].astype(str).to_numpy(),
                              "split": table["split"].astype(str).to_numpy()})
        return table, done, len(rows)
    if folder is not None:
        files = image_files(folder, recursive)
    elif listing is not None:
        files = listed_files(listing)
    else:
        files = list(images)
    net = load_model(model or Path(index_dir) / "model.pt", device)
    done = net.embedder.embed_files(files, strict, normalize, f"embed {len(files)} images")
    base = Path(folder) if folder is not None else None
    ids = [str(Path(p).relative_to(base)) if base else str(p) for p in done.paths]
    return pd.DataFrame({"path": [str(Path(p).resolve()) for p in done.paths], "image_id": ids}), done, len(files)


def write_embeddings(out: Path, table, embedded, model_file: Path, normalized: bool) -> None:
    import numpy as np

    from dcml.contracts.io import write_vectors
    from dcml.retrieval.index import file_sha256

    table = table.reset_index(drop=True)
    table.insert(0, "id", np.arange(len(table), dtype=np.int64))
    write_vectors(out, table, embedded.vectors, "embedding",
                  {"model_sha256": file_sha256(model_file), "model": str(model_file), "normalized": normalized,
                   "skipped": [{"path": p, "error": e} for p, e in embedded.failed]})


def real_images(manifest: Path | None, split: str, images: tuple[Path, ...], count: int) -> list:
    """PIL images to check an export on: the first ``count`` images of the manifest's split, and image files."""
    from dcml.retrieval.queries import decode_query, read_query_file

    out = []
    if manifest is not None:
        from dcml.algorithm.data import ManifestImageDataset
        from dcml.contracts import manifest as manifest_lib
        from dcml.retrieval.index import gallery_splits

        man = manifest_lib.read(manifest)
        rows = man.split(*gallery_splits(split, set(man.df["split"]), str(manifest))).head(count)
        dataset = ManifestImageDataset(man, rows, transform=None)
        out += [dataset.load_image(i) for i in range(len(rows))]
    return out + [decode_query(read_query_file(path), str(path)) for path in images]


@click.command(name="export", help="Export a model to TorchScript or ONNX, checked against PyTorch on real images.")
@click.option("--model", required=True, type=click.Path(dir_okay=False, path_type=Path), help="A dcml checkpoint.")
@click.option("--format", "fmt", required=True, type=click.Choice(["torchscript", "onnx"]))
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path), help="The exported file.")
@click.option("--manifest", default=None, type=click.Path(dir_okay=False, path_type=Path),
              help="Check the export on images of this manifest.")
@click.option("--split", default="auto", show_default=True,
              help="With --manifest: the split to take check images from (auto = gallery, else test).")
@click.option("--image", "images", multiple=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Check the export on this image too; repeat for several.")
@click.option("--check-images", default=16, show_default=True, type=click.IntRange(1, 4096),
              help="How many manifest images the check uses.")
def export_cli(model, fmt, out, manifest, split, images, check_images):
    from dcml.model_files import load_model
    from dcml.retrieval.export import export
    from dcml.retrieval.index import file_sha256

    if manifest is None and not images:
        raise DcmlError("export: pass --manifest M and/or --image PATH: the export is checked against the PyTorch "
                        "model on real images before it is written")
    net, _ = load_model(model)
    meta = export(net, fmt, out, real_images(manifest, split, images, check_images), file_sha256(model))
    check = meta["check"]
    click.echo(f"wrote {out} ({fmt}, {out.stat().st_size / 2**20:.1f} MiB): input pixels "
               f"{meta['input']['shape']}, embedding {meta['output']['dim']}-d; on {check['images']} real images "
               f"max |export - PyTorch| = {check['max_abs_diff']:.2e} (tolerance {check['tolerance']:g})")
