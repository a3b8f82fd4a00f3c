"""`dcml search` (query images against an index folder) and `dcml export` (TorchScript / ONNX)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from dcml.contracts.errors import DcmlError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
QUERY_BATCH = 32


def images_in(folder: Path) -> list[Path]:
    """The image files directly inside ``folder`` (by suffix), sorted."""
    if not folder.is_dir():
        raise DcmlError(f"{folder}: no such folder; pass a folder of query images")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DcmlError(f"{folder}: no image files ({', '.join(IMAGE_SUFFIXES)}); pass a folder of query images")
    return files


def search_files(index_dir: Path, paths: list[Path], k: int, device: str = "cpu") -> list[dict]:
    """[{"query": path, "neighbours": [hit, ...]}] for every query file, in order."""
    from dcml.retrieval.search import Searcher, read_query_file

    searcher = Searcher(index_dir, device=device)
    results = []
    for start in range(0, len(paths), QUERY_BATCH):
        batch = paths[start:start + QUERY_BATCH]
        images = [searcher.decode(read_query_file(path), str(path)) for path in batch]
        for path, hits in zip(batch, searcher.search(images, k)):
            results.append({"query": str(path), "neighbours": hits})
    return results


def format_table(results: list[dict]) -> str:
    from tabulate import tabulate

    blocks = []
    for result in results:
        rows = [(rank, h["id"], h["label"], h["class_name"], f"{h['score']:.4f}", h["path"] or h["image_id"])
                for rank, h in enumerate(result["neighbours"], 1)]
        blocks.append(f"query: {result['query']}\n"
                      + tabulate(rows, headers=["rank", "id", "label", "class", "score", "path"]))
    return "\n\n".join(blocks)


@click.command(name="search", help="Top-k gallery images of query images, from an index folder (`dcml index`).")
@click.option("--index", "index_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Index folder written by `dcml index`.")
@click.option("--image", "images", multiple=True, type=click.Path(dir_okay=False, path_type=Path),
              help="A query image; repeat for several.")
@click.option("--folder", default=None, type=click.Path(file_okay=False, path_type=Path),
              help="Every image file in this folder is a query.")
@click.option("--k", default=10, show_default=True, type=click.IntRange(1, 1000), help="Neighbours per query.")
@click.option("--format", "fmt", default="table", show_default=True, type=click.Choice(["table", "json"]))
@click.option("--device", default="cpu", show_default=True, help="cpu | cuda | cuda:N.")
def search_cli(index_dir, images, folder, k, fmt, device):
    if bool(images) == (folder is not None):
        raise DcmlError("search: pass query images with --image PATH (repeatable) or --folder DIR, not both")
    results = search_files(index_dir, list(images) or images_in(folder), k, device)
    click.echo(json.dumps(results, indent=2) if fmt == "json" else format_table(results))


def real_images(manifest: Path | None, split: str, images: tuple[Path, ...], count: int) -> list:
    """PIL images to check an export on: the first ``count`` images of the manifest's split, and image files."""
    from dcml.retrieval.search import decode_query, read_query_file

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
