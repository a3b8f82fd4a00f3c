"""Every tunable parameter of dcml, once: type, default, allowed values, help.

This table is the one source of truth the rest derives from:

- the pipeline's parameters (``pipeline.py`` builds its signature from
  :func:`pipeline_signature`) and their defaults;
- the stage command lines (``click_options``) and the stages' ``run``
  defaults (:func:`resolve`);
- the presets and ``--set`` / ``--config`` values, checked by
  :func:`validate` before anything runs (type, range, finiteness, choices);
- the KFP component signatures, checked against it by the tests.

A parameter may reach a stage under a shorter name (``finetune_epochs`` is
the finetune stage's ``epochs``): :data:`STAGE_NAMES` holds those renames.
"""

from __future__ import annotations

import inspect
import math
import os
from dataclasses import dataclass
from typing import Any, Iterable

from dcml.contracts.errors import DcmlError

LOSSES = ("margin", "triplet", "contrastive", "proxy_anchor", "multi_similarity")
MINERS = ("auto", "reference", "distance_weighted", "multi_similarity", "none")
BACKBONES = ("small_cnn", "resnet18", "resnet50", "efficientnet_lite0")
COMPRESS_METHODS = ("uniform", "kmeans", "loss-aware")
INDEX_TYPES = ("auto", "flat", "ivf", "hnsw", "ivfpq")


@dataclass(frozen=True)
class Param:
    name: str
    type: type  # int | float | bool | str
    default: Any
    help: str
    group: str
    choices: tuple | None = None
    low: float | None = None  # inclusive bounds
    high: float | None = None
    high_open: bool = False  # high is exclusive
    pipeline: bool = True  # a pipeline parameter (else stage-only)

    @property
    def kfp_type(self) -> str:
        return {int: "Integer", float: "Float", bool: "Boolean", str: "String"}[self.type]

    def describe_range(self) -> str:
        if self.choices:
            return "one of " + ", ".join(repr(c) if c == "" else str(c) for c in self.choices)
        parts = []
        if self.low is not None:
            parts.append(f"at least {self.low:g}")
        if self.high is not None:
            parts.append(f"{'below' if self.high_open else 'at most'} {self.high:g}")
        return " and ".join(parts) or f"a{'n' if self.type is int else ''} {self.type.__name__}"

    def check(self, value, source: str, label: str | None = None):
        """``value`` coerced to this parameter's type, or a one-line DcmlError (naming it ``label``)."""
        where = f"{source}: {label or self.name}={value!r}"
        if value is None:
            raise DcmlError(f"{where}: a value is required ({self.describe_range()}); drop the key to use the default {self.default!r}")
        if isinstance(value, os.PathLike) and self.type is str:
            value = os.fspath(value)
        if isinstance(value, str) and self.type is not str:
            value = _parse(value, self.type, where)
        if isinstance(value, bool) and self.type is str and self.choices and "true" in self.choices:
            value = "true" if value else "false"  # a tri-state flag given as a boolean
        if self.type is bool:
            if not isinstance(value, bool):
                raise DcmlError(f"{where}: expected true or false")
        elif self.type is int:
            if isinstance(value, bool) or not isinstance(value, int):
                if isinstance(value, float) and value.is_integer():
                    value = int(value)
                else:
                    raise DcmlError(f"{where}: expected a whole number ({self.describe_range()})")
        elif self.type is float:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise DcmlError(f"{where}: expected a number ({self.describe_range()})")
            value = float(value)
            if not math.isfinite(value):
                raise DcmlError(f"{where}: must be a finite number ({self.describe_range()})")
        elif not isinstance(value, str):
            raise DcmlError(f"{where}: expected text")
        if self.choices is not None and value not in self.choices:
            raise DcmlError(f"{where}: not allowed; use {self.describe_range()}")
        if self.low is not None and value < self.low or self.high is not None and (
                value >= self.high if self.high_open else value > self.high):
            raise DcmlError(f"{where}: out of range; use a value of {self.describe_range()}")
        return value


def _parse(text: str, kind: type, where: str):
    t = text.strip()
    if kind is bool:
        if t.lower() in ("1", "true", "yes", "on"):
            return True
        if t.lower() in ("0", "false", "no", "off"):
            return False
        raise DcmlError(f"{where}: expected true or false")
    try:
        return kind(t) if kind is int else float(t)
    except ValueError:
        raise DcmlError(f"{where}: expected {'a whole number' if kind is int else 'a number'}") from None


def _p(name, type_, default, help_, group, **kw) -> Param:
    return Param(name, type_, default, help_, group, **kw)


_PARAMS = [
    # -- data ------------------------------------------------------------------
    _p("dataset", str, "fashion-mnist", "Dataset reader (see `dcml ingest --help`).", "data"),
    _p("data_root", str, "", "Dataset folder ('' = the reader's default location).", "data"),
    _p("split_mode", str, "", "official or class-disjoint ('' = the dataset's default).", "data",
       choices=("", "official", "class-disjoint")),
    _p("max_per_class", int, 0, "Keep at most N images per class and split (0 = all).", "data", low=0),
    _p("check_images", bool, False, "Decode every image at ingestion and fail on a corrupt one.", "data"),
    _p("data_version", str, "", "The dataset's content fingerprint: `dcml run` sets it, so changed images re-run "
       "ingestion and everything after it (on a cluster: any label that changes with the data).", "data"),
    _p("val_fraction", float, 0.15, "Share of the training classes held out for validation (class-disjoint; "
       "picks the epoch kept; 0 = none).", "data", low=0.0, high=1.0, high_open=True),
    # -- model -----------------------------------------------------------------
    _p("backbone", str, "efficientnet_lite0", "Backbone network.", "model", choices=BACKBONES),
    _p("weights", str, "auto", "imagenet | none | a local state_dict file (auto: imagenet where the backbone "
       "has ImageNet weights, else none).", "model"),
    _p("image_size", int, 0, "Input side in pixels (0 = the backbone's default).", "model", low=0),
    _p("embedding_dim", int, 128, "Embedding size (split into K slices).", "model", low=1),
    _p("train_blocks", int, -1, "Backbone blocks that train, counted from the top (-1 = all, 0 = none: the head "
       "only); the rest is frozen.", "model", low=-1),
    _p("freeze_bn", str, "auto", "BatchNorm frozen (statistics and affine): true | false | auto (frozen for "
       "pretrained weights).", "model", choices=("auto", "true", "false")),
    _p("fast_views", int, 0, "Fast mode: cache the frozen lower part's output for this many augmented views per "
       "training image and train the top on them (0 = train on images).", "model", low=0),
    # -- clustering ------------------------------------------------------------
    _p("num_clusters", int, 4, "K: clusters, learners and embedding slices.", "cluster", low=1),
    _p("niter", int, 100, "k-means iterations at most (it stops earlier once converged).", "cluster", low=1),
    _p("nredo", int, 1, "k-means restarts (the best is kept).", "cluster", low=1),
    _p("cluster_grouping", str, "kmeans", "How the training images are split into K groups: kmeans (clusters of "
       "the backbone features, re-clustered every R epochs) or random (K random groups of whole classes, equal in "
       "classes, fixed: a control that has slices and one-group batches but no cluster structure).", "cluster",
       choices=("kmeans", "random")),
    # -- training --------------------------------------------------------------
    _p("loss", str, "margin", "Metric-learning loss (pytorch-metric-learning).", "training", choices=LOSSES),
    _p("margin", float, 0.0, "Loss margin (0 = the loss's own default).", "training", low=0.0),
    _p("miner", str, "auto", "Pair miner (auto: the loss's own).", "training", choices=MINERS),
    _p("classes_per_batch", int, 8, "P: classes per batch.", "training", low=2),
    _p("images_per_class", int, 4, "M: images per class in a batch.", "training", low=2),
    _p("lr_backbone", float, 1e-4, "Adam learning rate of the backbone.", "training", low=0.0),
    _p("lr_embedding", float, 1e-4, "Adam learning rate of the embedding head (1e-3 overfits a PCA-initialised "
       "head: BENCHMARKS.md).", "training", low=0.0),
    _p("lr_proxies", float, 0.0, "Learning rate of loss parameters (proxies; 0 = 100 x lr_embedding).", "training",
       low=0.0),
    _p("weight_decay", float, 1e-4, "Adam weight decay.", "training", low=0.0),
    _p("epochs", int, 4, "Training epochs (per worker in parallel mode).", "training", low=0),
    _p("recluster_every", int, 2, "Re-cluster every R epochs (shared mode; 0 = never).", "training", low=0),
    _p("whole_embedding_after", float, 8 / 19, "Shared mode, K>1: share of the epochs before fine-tuning after "
       "which each learner's loss sees the whole embedding, not its slice, while batches still come from one "
       "cluster each and re-clustering goes on (the reference code's 8/19; 1 = slices alone throughout, "
       "0 = the whole embedding from the start).", "training", low=0.0, high=1.0),
    _p("embedding_masks", bool, False, "Shared mode, K>1: instead of fixed slices, learner k weights the whole "
       "embedding with its own learned mask (ReLU, initialised to ones, kept apart by an orthogonality penalty; "
       "frozen once the loss sees the whole embedding): the journal version's learnable masks, at a fixed K.",
       "training"),
    _p("mask_orthogonality", float, 1.0, "With embedding_masks: weight of the penalty on the masks' mutual cosine "
       "similarity (the journal version's masking_lambda).", "training", low=0.0),
    _p("embedding_slices", bool, True, "Shared mode, K>1: each cluster's learner trains its own slice of the "
       "embedding. false = one embedding, normalised as a whole, the K clusters only choose each batch's "
       "images (a control: hard negatives without slices).", "training"),
    _p("finetune_epochs", int, 1, "Epochs of K=1 fine-tuning on all data after the merge.", "training", low=0),
    _p("finetune_cluster_epochs", int, 0, "Parallel mode: after the merge and before the K=1 fine-tuning, epochs "
       "that train the whole embedding on one-cluster batches, re-clustered every R epochs (the reference "
       "schedule's whole-embedding phase).", "training", low=0),
    _p("batches_per_epoch", int, 0, "Batches per epoch (0 = the sampler's natural epoch); equal values compare "
       "runs with different K at equal images.", "training", low=0),
    _p("head_init", str, "auto", "Embedding head init: pca (principal components of the pretrained features; "
       "with K slices, each cluster's own), pca-shared (one PCA of all training features, its components dealt "
       "round-robin to the K slices: each slice keeps a share of every variance level), whiten (PCA-whitening of "
       "the training images' pretrained features, shrinkage 0.25, one slice: dcml.algorithm.whitening), random, or "
       "auto (pca for pretrained backbones).", "training", choices=("auto", "pca", "pca-shared", "whiten", "random")),
    _p("warmup_epochs", int, 0, "First epochs train the head only (backbone frozen).", "training", low=0),
    _p("schedule", str, "constant", "Learning-rate schedule after the warm-up.", "training",
       choices=("constant", "cosine")),
    _p("select_on", str, "recall@1", "Validation metric that picks the epoch kept.", "training",
       choices=("recall@1", "map@r")),
    _p("fusion", bool, True, "With baseline_candidate: the trained model competes as one model with the no-training "
       "candidate the choice kept (the raw or whitened features), both embeddings side by side at equal weight "
       "(measured at least as good as the trained model alone in 85 of 89 small-data draws: BENCHMARKS.md); false: "
       "the trained model alone.", "training"),
    _p("baseline_candidate", bool, True, "No-training candidates -- the backbone's pretrained features, raw "
       "(L2-normalised, full width) and PCA-whitened -- compete with the trained model, and the run delivers what "
       "the noise-aware choice keeps: each step up from the raw features only when it wins beyond the noise of the "
       "classes that judge it (dcml.algorithm.choice; false: always the trained model).", "training"),
    _p("patience", int, 0, "Stop after this many epochs without a better validation score (0 = never).",
       "training", low=0),
    _p("eval_every", int, 1, "Test R@1 / MAP@R every N epochs, for the curves only (0 = never).", "training", low=0),
    _p("seed", int, 0, "Seed of everything random.", "training", low=0),
    _p("num_workers", int, 0, "DataLoader worker processes.", "runtime", low=0),
    _p("batch_size", int, 128, "Batch size of feature extraction.", "runtime", low=1),
    # -- DFML ------------------------------------------------------------------
    _p("dfml_groups", int, 3, "DFML: sub-blocks per block (G).", "dfml", low=2),
    _p("lr_router", float, 1e-4, "DFML: learning rate of the routers.", "dfml", low=0.0),
    # -- evaluation ------------------------------------------------------------
    _p("ks", str, "1,2,4,8", "Recall@K cut-offs, comma-separated.", "evaluate"),
    _p("eval_batch_size", int, 256, "Batch size of evaluation.", "evaluate", low=1),
    # -- compression -----------------------------------------------------------
    _p("compress_bits", int, 0, "Quantise the final model's weights to this many bits (0 = off).", "compress",
       low=0, high=8),
    _p("compress_method", str, "loss-aware", "Codebooks: uniform, kmeans or loss-aware.", "compress",
       choices=COMPRESS_METHODS),
    _p("compress_finetune_steps", int, 0, "Steps of centroid fine-tuning after quantisation.", "compress", low=0),
    # -- tracking --------------------------------------------------------------
    _p("experiment", str, "dcml", "MLflow experiment.", "tracking"),
    _p("run_name", str, "", "MLflow run name ('' = one that says what the run is).", "tracking"),
    # -- retrieval index -------------------------------------------------------
    _p("index_gallery", bool, False, "After evaluation, index the gallery (test or gallery split) for search "
       "and serving (`dcml search`, `dcml serve`).", "index"),
    _p("index_type", str, "auto", "Gallery index: flat (exact inner product), ivf, hnsw, ivfpq (compressed "
       "codes in memory, a short list re-ranked by the exact vectors read from disk), or auto (flat below "
       "100,000 images or at recall target 1, else ivf).", "index", choices=INDEX_TYPES),
    _p("index_target_recall", float, 0.95, "Approximate index: recall@10 against exact search that its search "
       "setting (nprobe / efSearch) is raised to reach.", "index", low=0.0, high=1.0),
    _p("index_false_match_rate", float, 0.01, "Match decisions: the share of different-class pairs of the "
       "validation split that may score above the index's match threshold (chosen on that split; hits get "
       "match true/false).", "index", low=0.0, high=1.0),
    # -- scale -----------------------------------------------------------------
    _p("gpus_per_task", int, 1, "Data-parallel processes (one per GPU; gloo processes on CPU) of every training "
       "stage: torchrun on one node, or per node of a TrainJob (dcml compile --nodes N); the cluster stages "
       "request this many GPUs.", "scale", low=1),
]

PARAMS: dict[str, Param] = {p.name: p for p in _PARAMS}

# The blocks ``train_blocks`` counts, per backbone (dcml.algorithm.models; the tests check them against the models).
BACKBONE_BLOCKS = {"small_cnn": 2, "resnet18": 8, "resnet50": 16, "efficientnet_lite0": 16}


def _masks_need_clusters(v: dict, n) -> str | None:
    if v["embedding_masks"] and v["num_clusters"] < 2:
        return (f"{n('embedding_masks')}=true learns a mask per cluster's learner, so it needs {n('num_clusters')} "
                f">= 2 (got {v['num_clusters']}); raise {n('num_clusters')} or set {n('embedding_masks')}=false")
    return None


def _fast_mode_needs_a_frozen_part(v: dict, n) -> str | None:
    if v["fast_views"] > 0 and v["train_blocks"] < 0:
        return (f"{n('fast_views')}={v['fast_views']} caches the frozen lower part of the backbone, but "
                f"{n('train_blocks')}=-1 trains all of it; set {n('train_blocks')} to the number of top blocks "
                "that train (e.g. 5)")
    return None


def _blocks_of_the_backbone(v: dict, n) -> str | None:
    blocks = BACKBONE_BLOCKS.get(v["backbone"])
    if blocks is not None and v["train_blocks"] > blocks:
        return (f"{n('train_blocks')}={v['train_blocks']}: {v['backbone']} has {blocks} blocks; use -1 (all) "
                f"or 0..{blocks}")
    return None


@dataclass(frozen=True)
class Constraint:
    """A rule between parameters: ``problem(values, name)`` says what is wrong with ``values`` (None:
    nothing), ``name(parameter)`` giving each parameter's name as the caller knows it."""

    names: tuple[str, ...]
    rule: str  # what `dcml params` shows
    problem: Any


CONSTRAINTS = (
    Constraint(("embedding_masks", "num_clusters"), "embedding_masks=true needs num_clusters >= 2 (a mask per "
               "learner)", _masks_need_clusters),
    Constraint(("fast_views", "train_blocks"), "fast_views > 0 needs train_blocks >= 0 (a frozen lower part to "
               "cache)", _fast_mode_needs_a_frozen_part),
    Constraint(("backbone", "train_blocks"), "train_blocks is at most the backbone's blocks ("
               + ", ".join(f"{b} {n}" for b, n in BACKBONE_BLOCKS.items()) + ")", _blocks_of_the_backbone),
)


def check_constraints(values: dict, source: str, known: Iterable[str] | None = None,
                      labels: dict | None = None) -> None:
    """Refuse values that break a rule between parameters (:data:`CONSTRAINTS`), in one line. ``values``: the
    checked values given (the others at their defaults); a rule is checked only where every parameter it
    names is ``known`` to the caller (a stage checks the rules among its own parameters)."""
    known = set(PARAMS if known is None else known)
    labels = labels or {}
    for constraint in CONSTRAINTS:
        if not set(constraint.names) <= known:
            continue
        full = {name: values.get(name, PARAMS[name].default) for name in constraint.names}
        problem = constraint.problem(full, lambda name: labels.get(name, name))
        if problem:
            raise DcmlError(f"{source}: {problem}")

# Pipeline parameter -> its name inside a stage, where they differ.
STAGE_NAMES: dict[str, dict[str, str]] = {
    "ingest": {"data_root": "root"},
    "extract": {"fast_views": "views"},
    "cluster": {"num_clusters": "k"},
    "finetune": {"finetune_epochs": "epochs"},
    "merge-finetune": {"finetune_epochs": "epochs"},
    "train-dfml": {"dfml_groups": "groups"},
    "evaluate": {"eval_batch_size": "batch_size"},
    "compress": {"compress_bits": "bits", "compress_method": "method", "compress_finetune_steps": "finetune_steps"},
    "index": {"eval_batch_size": "batch_size", "index_target_recall": "target_recall",
              "index_false_match_rate": "false_match_rate"},
}


def pipeline_params() -> list[Param]:
    return [p for p in _PARAMS if p.pipeline]


def defaults(names: Iterable[str] | None = None) -> dict:
    names = list(PARAMS) if names is None else list(names)
    return {n: PARAMS[n].default for n in names}


def validate(values: dict, source: str = "parameters", known: Iterable[str] | None = None,
             labels: dict | None = None, between: bool = True) -> dict:
    """Check and coerce ``values`` (name -> value or text); unknown names and bad values are one-line errors.

    ``labels``: the names to show for parameters a stage calls otherwise. ``between``: also the rules between
    parameters (:func:`check_constraints`, the ones not given at their defaults); False for a part of the values
    that is merged with others later (a preset and its --set), whose merge the caller checks.
    """
    allowed = set(PARAMS if known is None else known)
    unknown = sorted(set(values) - allowed)
    if unknown:
        raise DcmlError(f"{source}: unknown parameter(s) {', '.join(unknown)}; known: {', '.join(sorted(allowed))}")
    labels = labels or {}
    out = {name: PARAMS[name].check(value, source, labels.get(name)) for name, value in values.items()}
    check_ks(out.get("ks", PARAMS["ks"].default), source)
    if between:
        check_constraints(out, source, allowed, labels)
    if not (out.get("experiment", "x") or "").strip():
        raise DcmlError(f"{source}: experiment='': name the MLflow experiment")
    return out


def check_ks(ks, source: str = "ks") -> list[int]:
    """Recall@K cut-offs from '1,2,4' (or a sequence); each a whole number >= 1."""
    items = ks.split(",") if isinstance(ks, str) else list(ks)
    try:
        values = [int(str(k).strip()) for k in items if str(k).strip()]
    except ValueError:
        raise DcmlError(f"{source}: ks={ks!r}: expected comma-separated whole numbers, e.g. 1,2,4,8") from None
    if not values or min(values) < 1:
        raise DcmlError(f"{source}: ks={ks!r}: give at least one cut-off, each >= 1")
    return values


def resolve(names: Iterable[str], given: dict, source: str, rename: dict | None = None,
            fixed_defaults: dict | None = None) -> dict:
    """``given`` (a stage's keyword arguments) checked, every other name at its default.

    ``rename``: parameter -> the stage's name for it (STAGE_NAMES[stage]);
    ``given`` and the result use the stage's names. ``fixed_defaults``: the
    few defaults a stage must differ in because the table's cannot work
    there (DFML factorises EfficientNet only).
    """
    rename = rename or {}
    back = {rename.get(n, n): n for n in names}
    unknown = sorted(set(given) - set(back))
    if unknown:
        raise DcmlError(f"{source}: unknown argument(s) {', '.join(unknown)}; known: {', '.join(sorted(back))}")
    values = {back[k]: v for k, v in given.items() if v is not None}
    checked = {**defaults(names), **(fixed_defaults or {}), **validate(values, source, known=names, labels=rename)}
    return {rename.get(n, n): v for n, v in checked.items()}


def click_options(*names: str, rename: dict | None = None, fixed_defaults: dict | None = None,
                  aliases: dict | None = None):
    """Click options for ``names`` (defaults, help and choices from the table; ``aliases``: name -> more
    flags that set it, e.g. ``{"index_target_recall": ("--recall",)}``)."""
    import click

    rename, fixed_defaults, aliases = rename or {}, fixed_defaults or {}, aliases or {}

    def decorate(f):
        for name in reversed(names):
            p = PARAMS[name]
            dest = rename.get(name, name)
            flag = "--" + dest.replace("_", "-")
            kwargs: dict = {"default": fixed_defaults.get(name, p.default), "show_default": True, "help": p.help}
            if p.type is bool:
                f = click.option(f"{flag}/--no-{flag[2:]}", dest, **kwargs)(f)
                continue
            kwargs["type"] = click.Choice(list(p.choices)) if p.choices else p.type
            f = click.option(flag, *aliases.get(name, ()), dest, **kwargs)(f)
        return f

    return decorate


def pipeline_signature() -> inspect.Signature:
    """The pipeline function's signature: every pipeline parameter with its default."""
    return inspect.Signature([
        inspect.Parameter(p.name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=p.default, annotation=p.type)
        for p in pipeline_params()
    ])
