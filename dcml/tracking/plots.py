"""The plots of a pipeline run (PNG files logged under ``plots/``) and of ``dcml compare``.

* ``training_curves.png``: per training stage, the training loss, the
  validation R@1 and MAP@R (what selects the model kept), the test R@1 (for
  the curves only) and the epoch kept (``best_epoch``) marked on each panel;
* ``recall_at_k.png``, ``cluster_sizes.png`` (each (re-)clustering),
  ``routing_<stage>.png`` (DFML), ``embedding_map.png`` (PCA of the test
  embeddings).
"""

from __future__ import annotations

import re
from pathlib import Path

from dcml.contracts.errors import DcmlError


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def kept_epoch(record: dict) -> int | None:
    """The epoch whose weights a training stage kept (validation's best_epoch), if it validated."""
    best = [h["best_epoch"] for h in record.get("history", []) if h.get("best_epoch") is not None]
    if best:
        return int(best[-1])
    value = record.get("metrics", {}).get("best_epoch")
    return None if value is None else int(value)


def _series(history: list[dict], key: str) -> list[tuple[int, float]]:
    return [(int(h.get("epoch", i)), float(h[key])) for i, h in enumerate(history)
            if isinstance(h.get(key), (int, float)) and not isinstance(h.get(key), bool)]


def training_curves_figure(trained: list[dict]):
    """Loss | validation R@1 and MAP@R | test R@1, one colour per training stage,
    the epoch kept marked (dotted line, star on validation R@1). Epoch 0 is the
    initial model: scores, no loss."""
    plt = _pyplot()
    has_val = any(_series(r["history"], "val_recall@1") or _series(r["history"], "val_map@r") for r in trained)
    has_test = any(_series(r["history"], "recall@1") for r in trained)
    panels = ["loss"] + (["val"] if has_val else []) + (["test"] if has_test else [])
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2), squeeze=False, sharex=True)
    ax = dict(zip(panels, axes[0]))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, rec in enumerate(trained):
        hist, colour = rec["history"], colours[i % len(colours)]
        label = rec.get("name") or rec["stage"]
        best = kept_epoch(rec)
        loss = _series(hist, "loss")
        if loss:
            ax["loss"].plot(*zip(*loss), marker=".", color=colour, label=label)
        if "val" in ax:
            val_r1, val_map = _series(hist, "val_recall@1"), _series(hist, "val_map@r")
            if val_r1:
                ax["val"].plot(*zip(*val_r1), marker="o", color=colour, label=f"{label} val R@1")
            if val_map:
                ax["val"].plot(*zip(*val_map), marker="s", linestyle="--", color=colour, label=f"{label} val MAP@R")
            kept = [v for e, v in val_r1 if e == best]
            if kept:
                ax["val"].plot([best], kept, marker="*", markersize=16, linestyle="none", color=colour,
                               markeredgecolor="black", label=f"{label} kept: epoch {best}")
        if "test" in ax:
            test_r1 = _series(hist, "recall@1")
            if test_r1:
                ax["test"].plot(*zip(*test_r1), marker="o", linestyle=":", color=colour, label=f"{label} test R@1")
        if best is not None:
            for name, a in ax.items():
                a.axvline(best, color=colour, linestyle=":", alpha=0.8,
                          label=f"{label} epoch kept ({best})" if name == "loss" else None)
    ax["loss"].set(title="training loss", xlabel="epoch", ylabel="loss")
    if "val" in ax:
        ax["val"].set(title="validation R@1 and MAP@R (selects the epoch kept)", xlabel="epoch", ylabel="score")
    if "test" in ax:
        ax["test"].set(title="test R@1 during training (curves only)", xlabel="epoch", ylabel="R@1")
    for a in ax.values():
        a.xaxis.set_major_locator(MaxNLocator(integer=True))
        a.grid(alpha=0.3)
        if a.get_legend_handles_labels()[0]:
            a.legend(fontsize=7)
    return fig


def make_plots(lineage: list[dict], final_metrics: dict, embeddings: str | None, out_dir: Path) -> list[Path]:
    """Training curves, Recall@K curve, cluster sizes, routing, 2-D embedding map (PNG files)."""
    plt = _pyplot()
    paths = []
    trained = [r for r in lineage if any("loss" in h or "recall@1" in h or "val_recall@1" in h
                                         for h in r.get("history", []))]
    if trained:
        paths.append(_save(training_curves_figure(trained), out_dir / "training_curves.png"))

    recall = sorted((int(k.split("@")[1]), v) for k, v in final_metrics.items() if k.startswith("recall@"))
    if recall:
        fig, ax = plt.subplots(figsize=(5, 4))
        ax.plot([k for k, _ in recall], [v for _, v in recall], marker="o")
        ax.set(xscale="log", title="Recall@K", xlabel="K", ylabel="recall", ylim=(0, 1.01))
        ax.grid(alpha=0.3)
        paths.append(_save(fig, out_dir / "recall_at_k.png"))

    sizes = [(r.get("name") or r["stage"], h["epoch"], h["cluster_sizes"]) for r in lineage
             for h in r.get("history", []) if h.get("cluster_sizes")]
    sizes += [(r.get("name") or r["stage"], 0, r["metrics"].get("sizes") or r.get("extra", {}).get("sizes"))
              for r in lineage if r.get("stage") == "cluster"
              and (r.get("metrics", {}).get("sizes") or r.get("extra", {}).get("sizes"))]
    if sizes:
        fig, ax = plt.subplots(figsize=(6, 4))
        for i, (name, epoch, counts) in enumerate(sizes):
            counts = sorted(counts, reverse=True)
            ax.bar([i + j / (len(counts) + 1) for j in range(len(counts))], counts,
                   width=1 / (len(counts) + 1), label=f"{name} @ epoch {epoch}")
        ax.set(title="cluster sizes at each (re-)clustering", ylabel="images", xticks=[])
        ax.legend(fontsize=7)
        paths.append(_save(fig, out_dir / "cluster_sizes.png"))

    routed = [r for r in lineage if any("routing" in h for h in r.get("history", []))]
    for rec in routed:
        name = rec.get("name") or rec["stage"]
        groups = rec.get("extra", {}).get("groups", "?")
        paths.append(routing_plot(rec["history"], out_dir / f"routing_{name}.png",
                                  title=f"DFML routing ({name}, G={groups})"))

    if embeddings and Path(embeddings).is_file():
        paths.append(embedding_map(embeddings, out_dir / "embedding_map.png"))
    return paths


def _short_unit(name: str) -> str:
    # "backbone.net._blocks.7" -> "7"; ViT "backbone.blocks.3.attn" stays readable
    return name.rsplit("_blocks.", 1)[-1] if "_blocks." in name else name.replace("backbone.", "")


def routing_plot(history: list[dict], dest: Path, title: str = "DFML routing") -> Path:
    """How a DFML model spreads samples over its sub-blocks: the share sent to each
    sub-block per routed block (training images of the last epoch, and the test
    images of the last evaluation when there is one), plus the normalised
    routing entropy (1 = even spread, 0 = collapsed) and R@1 per epoch."""
    import numpy as np

    plt = _pyplot()

    trained = [h for h in history if "routing" in h]
    panels = [("training images, last epoch", trained[-1]["routing"])]
    evaluated = [h for h in history if "eval_routing" in h]
    if evaluated:
        panels.append(("test images, last evaluation", evaluated[-1]["eval_routing"]))
    fig, axes = plt.subplots(1, len(panels) + 1, figsize=(5 * (len(panels) + 1), 4.5))
    groups = 1
    for ax, (panel_title, counts) in zip(axes, panels):
        # Network order (JSON round trips may have sorted "10" before "2").
        names = sorted(counts, key=lambda n: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", n)])
        table = np.array([counts[n] for n in names], dtype=float)
        shares = table / np.maximum(table.sum(axis=1, keepdims=True), 1)
        groups = shares.shape[1]
        left = np.zeros(len(names))
        for g in range(groups):
            ax.barh(range(len(names)), shares[:, g], left=left, label=f"sub-block {g}")
            left += shares[:, g]
        ax.set_yticks(range(len(names)), [_short_unit(n) for n in names], fontsize=7)
        ax.invert_yaxis()
        ax.set(xlim=(0, 1), xlabel="share of samples", ylabel="block", title=panel_title)
    axes[0].legend(loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=groups, fontsize=8)
    ax = axes[-1]
    ax.plot([h["epoch"] for h in trained], [h["routing_entropy"] for h in trained], marker="o",
            label="routing entropy (train)")
    if evaluated:
        ax.plot([h["epoch"] for h in evaluated], [h["recall@1"] for h in evaluated], marker="s", label="R@1 full")
        routed_r1 = [(h["epoch"], h["routed_recall@1"]) for h in evaluated if "routed_recall@1" in h]
        if routed_r1:
            ax.plot(*zip(*routed_r1), marker="^", label="R@1 routed")
    ax.set(ylim=(0, 1.05), xlabel="epoch", title="spread and retrieval per epoch")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.suptitle(title)
    return _save(fig, dest)


def embedding_map(embeddings: str, dest: Path, max_points: int = 3000) -> Path:
    """PCA of test embeddings to 2-D, coloured by class."""
    import numpy as np
    from sklearn.decomposition import PCA

    from dcml.contracts.io import read_vectors

    meta, vectors, _ = read_vectors(embeddings, "embedding")
    rng = np.random.default_rng(0)
    idx = rng.permutation(len(vectors))[:max_points]
    xy = PCA(n_components=2, random_state=0).fit_transform(vectors[idx])
    labels = meta["label"].to_numpy()[idx]
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 6))
    ax.scatter(xy[:, 0], xy[:, 1], c=labels, cmap="tab20", s=4, alpha=0.7)
    ax.set(title=f"test embeddings (PCA, {len(idx)} points, colour = class)", xticks=[], yticks=[])
    return _save(fig, dest)


def _save(fig, dest: Path) -> Path:
    plt = _pyplot()
    fig.tight_layout()
    fig.savefig(dest, dpi=110, format="png")
    plt.close(fig)
    return dest


def plot_metric(table, metric: str, dest: str, label_cols: tuple[str, ...] = ()) -> None:
    """A bar chart of one metric per run (a ``compare_runs`` table)."""
    if metric not in table.columns:
        raise DcmlError(f"metric '{metric}' not logged in these runs; pick one of {', '.join(c for c in table.columns if '@' in c or c in ('nmi', 'ami'))}")
    labels = [" ".join(str(row[c]) for c in label_cols) if label_cols else str(row["run"]) for _, row in table.iterrows()]
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(5, 0.6 * len(table)), 4))
    values = table[metric].astype(float)
    bars = ax.bar(range(len(table)), values)
    ax.set_xticks(range(len(table)), labels, rotation=45, ha="right", fontsize=8)
    ax.set(ylabel=metric, title=f"{metric} per run (axis zoomed to the values)")
    finite = values[values.notna()]
    if len(finite):  # zoom to the data: 0.864 against 0.892 must be visible
        lo, hi = float(finite.min()), float(finite.max())
        pad = max(0.15 * (hi - lo), 0.005 * max(abs(hi), 1e-3))
        ax.set_ylim(lo - pad, hi + pad)
        ax.bar_label(bars, labels=[f"{v:.4f}" if v == v else "" for v in values], fontsize=7, padding=2)
    ax.grid(axis="y", alpha=0.3)
    Path(dest).parent.mkdir(parents=True, exist_ok=True)
    _save(fig, Path(dest))
