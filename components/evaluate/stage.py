"""Stage 6: embeddings -> Recall@K, R-Precision, MAP@R, NMI, AMI (metrics JSON).

Either precomputed embeddings (a Parquet vector table with columns
``embedding``, ``label`` and ``split``; a ``feature`` table from `dcml
extract` works too) or a model checkpoint plus a manifest, whose images are
embedded first (and optionally written out). A data set with ``query`` and
``gallery`` splits (In-Shop) is evaluated query vs gallery; otherwise the rows
of ``split`` are evaluated against themselves, each query's own row excluded.
Numbers are those of pytorch-metric-learning's AccuracyCalculator (see
dcml.algorithm.metrics).
"""

from __future__ import annotations

from pathlib import Path

import click
import numpy as np
import pandas as pd

from dcml.contracts import events
from dcml.contracts.io import check_writable
from dcml.algorithm import metrics as metrics_lib
from dcml.contracts import params
from dcml.contracts.errors import DcmlError
from dcml.contracts.io import read_vectors, write_json, write_vectors
from dcml.contracts.records import StageTimer
from dcml.retrieval.rerank import DEFAULT as RERANK_DEFAULT, HELP as RERANK_HELP, QueryExpansion
from dcml import stagekit

STAGE = "evaluate"


def run(out, embeddings=None, model=None, manifest=None, split: str = "test", ks=params.PARAMS["ks"].default,
        embeddings_out=None, batch_size: int = params.PARAMS["eval_batch_size"].default,
        num_workers: int = params.PARAMS["num_workers"].default, include=None, device=None,
        rerank: str | None = None) -> dict:
    """Write ``out`` ({"metrics": {...}, "record": {...}}) and return the stage record."""
    stagekit.stage_process()  # this process: glibc keeps large batch buffers for reuse
    ks = metrics_lib.check_ks(params.check_ks(ks, "--ks") if isinstance(ks, str) else ks)
    include = metrics_lib.check_include(include)
    expansion = QueryExpansion.parse(rerank)  # dcml.retrieval.rerank: None = plain search
    check_writable(out)
    if embeddings_out is not None:
        check_writable(embeddings_out)
    record_params = {"embeddings": _str(embeddings), "model": _str(model), "manifest": _str(manifest), "split": split,
              "ks": ks, "include": list(include), "embeddings_out": _str(embeddings_out),
              "batch_size": int(batch_size), "num_workers": int(num_workers),
              **({"rerank": expansion.describe()} if expansion else {})}
    timer = StageTimer(STAGE, record_params)
    if (embeddings is None) == (model is None):
        raise DcmlError("evaluate: pass either --embeddings FILE.parquet or --model CKPT with --manifest M")
    if model is not None and manifest is None:
        raise DcmlError(f"{model}: a model needs --manifest to know which images to embed; pass the manifest Parquet")
    if embeddings is not None and (manifest is not None or embeddings_out is not None):
        raise DcmlError("evaluate: --manifest and --embeddings-out go with --model; precomputed --embeddings need neither")
    if int(batch_size) < 1:
        raise DcmlError(f"--batch-size: must be >= 1, got {batch_size}")

    extra: dict = {}
    if embeddings is not None:
        source = str(embeddings)
        table, vectors, meta = read_vectors(embeddings)
        _check_columns(table, source)
        mode, query_rows, reference_rows = select_rows(table, split, source)
        extra["vector_column"] = meta.get("vector_column", "embedding")
    else:
        from dcml.contracts import manifest as manifest_lib
        from dcml.model_files import load_model
        from dcml.algorithm.inference import compute_vectors, resolve_device

        source = str(manifest)
        man = manifest_lib.read(manifest)
        mode, query_rows, reference_rows = select_rows(man.df, split, source)
        needed = query_rows if reference_rows is None else np.concatenate([query_rows, reference_rows])
        table = man.df.iloc[needed].reset_index(drop=True)
        device = resolve_device(device)
        net, _ = load_model(model, device=device)
        vectors = compute_vectors(net, man, table, kind="embedding", batch_size=int(batch_size), device=device,
                                  num_workers=int(num_workers), desc=f"evaluate: embed {len(table)} images")
        query_rows = np.arange(len(query_rows))
        reference_rows = None if reference_rows is None else np.arange(len(query_rows), len(table))
        extra.update(device=str(device), model_config=dict(net.config))

    if vectors.shape[1] == 0:
        raise DcmlError(f"{source}: the embeddings have dimension 0; recompute them")
    labels = table["label"].to_numpy()
    details: dict = {}
    query = vectors[query_rows]
    reference = None if reference_rows is None else vectors[reference_rows]
    # Re-ranked: the expanded queries are searched (each query's own row still left out).
    searched = None if expansion is None else expansion.expand_in_set(query, reference)
    if reference_rows is None:
        metrics = metrics_lib.evaluate_embeddings(query, labels[query_rows], ks=ks, include=include, details=details,
                                                  search_query=searched)
    else:
        metrics = metrics_lib.evaluate_embeddings(query, labels[query_rows], reference, labels[reference_rows],
                                                  ks=ks, include=include, details=details, search_query=searched)
    extra.update(mode=mode, dim=int(vectors.shape[1]),
                 splits=["query", "gallery"] if mode == "query_vs_gallery" else ([split] if "split" in table.columns else None),
                 **{key: (round(value, 3) if isinstance(value, float) else value) for key, value in details.items()})
    record = timer.finish(inputs={"embeddings": embeddings, "model": model, "manifest": manifest},
                          metrics=metrics, extra=extra)

    if embeddings_out is not None:
        meta = {"model_config": extra["model_config"], "dataset": man.dataset,
                "manifest_fingerprint": man.meta.get("fingerprint"), "mode": mode, "record": record}
        write_vectors(embeddings_out, table[["image_id", "label", "split"]], vectors, "embedding", meta)
    write_json(out, {"metrics": metrics, "record": record})
    shown = [k for k in metrics if k.startswith("recall@")][:1] + [k for k in ("map@r",) if k in metrics]
    events.emit("summary", text=", ".join(f"{k} {metrics[k]:.3f}" for k in shown)
                + f" ({extra.get('num_queries', '?')} queries)")
    return record


def select_rows(df: pd.DataFrame, split: str, source: str) -> tuple[str, np.ndarray, np.ndarray | None]:
    """(mode, query row positions, reference row positions or None = the queries themselves).

    mode is "query_vs_gallery" or "reference_includes_query" (PML's term).
    """
    if "split" not in df.columns:  # a table from elsewhere: every row is evaluated
        return "reference_includes_query", np.arange(len(df)), None
    splits = df["split"].astype(str).to_numpy()
    present = sorted(set(splits))
    if split not in present and {"query", "gallery"} <= set(present):
        return "query_vs_gallery", np.flatnonzero(splits == "query"), np.flatnonzero(splits == "gallery")
    if split in present:
        return "reference_includes_query", np.flatnonzero(splits == split), None
    raise DcmlError(f"{source}: no rows in split '{split}' (has {', '.join(present) or 'no rows'}); "
                    "pick an existing --split, or give the data query and gallery splits")


def _check_columns(table: pd.DataFrame, source: str) -> None:
    if "label" not in table.columns:
        raise DcmlError(f"{source}: no 'label' column (has {', '.join(table.columns) or 'none'}); "
                        "evaluation needs the class of every row")
    if table["label"].isna().any():
        raise DcmlError(f"{source}: {int(table['label'].isna().sum())} row(s) have no label; label every row")


def _str(path) -> str | None:
    return None if path is None else str(path)


def _parse_ks(k_values, ks_text) -> list[int]:
    values = list(k_values or ())
    for part in (ks_text or "").split(","):
        if part.strip():
            try:
                values.append(int(part))
            except ValueError:
                raise DcmlError(f"--ks: {part.strip()!r} is not an integer; pass e.g. --ks 1,2,4,8") from None
    return values or [1, 2, 4, 8]


def format_table(metrics: dict, record: dict) -> str:
    extra = record.get("extra", {})
    against = "the gallery" if extra.get("mode") == "query_vs_gallery" else "themselves"
    lines = [f"{extra.get('num_queries', '?')} queries against {against}: "
             f"{extra.get('num_reference', '?')} references, {extra.get('num_classes', '?')} classes"]
    width = max(len(key) for key in metrics) if metrics else 6
    lines += [f"  {key:<{width}}  {value:.4f}" for key, value in metrics.items()]
    return "\n".join(lines)


@click.command(name=STAGE, help="Recall@K, R-Precision, MAP@R, NMI, AMI of embeddings -> metrics JSON.")
@click.option("--embeddings", default=None, type=click.Path(dir_okay=False, path_type=Path),
              help="Precomputed embeddings Parquet (columns embedding, label, split).")
@click.option("--model", default=None, type=click.Path(dir_okay=False, path_type=Path),
              help="A dcml checkpoint to embed the manifest's images with.")
@click.option("--manifest", default=None, type=click.Path(dir_okay=False, path_type=Path),
              help="Manifest Parquet (with --model).")
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path), help="Output metrics JSON.")
@click.option("--split", default="test", show_default=True,
              help="Split evaluated against itself (query vs gallery is used when the data has those and not this).")
@click.option("--k", "k_values", multiple=True, type=int, help="A K of Recall@K; repeat for several.")
@click.option("--ks", "ks_text", default=None,
              help=f"Comma-separated Ks, e.g. 1,10,100,1000 (default {params.PARAMS['ks'].default}).")
@click.option("--include", default=None,
              help=f"Comma-separated metric families (default all): {', '.join(metrics_lib.METRICS)}.")
@click.option("--embeddings-out", default=None, type=click.Path(dir_okay=False, path_type=Path),
              help="With --model: also write the computed embeddings here (Parquet).")
@click.option("--batch-size", default=params.PARAMS["eval_batch_size"].default, show_default=True, type=int,
              help=params.PARAMS["eval_batch_size"].help)
@click.option("--num-workers", default=params.PARAMS["num_workers"].default, show_default=True, type=int,
              help=params.PARAMS["num_workers"].help)
@click.option("--device", default=None, help="cpu | cuda | cuda:N (default: cuda when available).")
@click.option("--rerank", default=RERANK_DEFAULT, show_default=True, help=RERANK_HELP)
def cli(embeddings, model, manifest, out, split, k_values, ks_text, include, embeddings_out, batch_size,
        num_workers, device, rerank):
    include_list = [part.strip() for part in include.split(",") if part.strip()] if include else None
    record = run(out=out, embeddings=embeddings, model=model, manifest=manifest, split=split,
                 ks=_parse_ks(k_values, ks_text), embeddings_out=embeddings_out, batch_size=batch_size,
                 num_workers=num_workers, include=include_list, device=device, rerank=rerank)
    click.echo(format_table(record["metrics"], record))
    click.echo(f"wrote {out}")
