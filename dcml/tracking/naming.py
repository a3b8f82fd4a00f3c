"""What a pipeline run is called and which parameters it shows in MLflow.

* The parent run's parameters are the pipeline's parameters as the run got
  them (:func:`pipeline_parameters`, every one of dcml.contracts.params'
  pipeline parameters), never the stages' internals (a stage's split, score,
  batch size: those are on its own nested run). Runs logged from bare
  artifacts (no pipeline parameters handed over) show the pipeline parameters
  their stage records name (:func:`lineage_parameters`).
* A run's name says what it is (:func:`base_name`: dataset, method-mode, K,
  loss, seed) and then what sets it apart in its experiment
  (:func:`distinct_name`): the parameters that differ from the experiment's
  first run of that kind, and ``#n`` when that is still not unique.
"""

from __future__ import annotations

import json
import re

from dcml.contracts import params

# Paths and run bookkeeping: never a setting of their own.
_PATH_KEYS = ("manifest", "out", "features", "clusters", "model", "checkpoints", "init",
              "embeddings", "embeddings_out")
# Not part of what makes a run different from another (they name or place the run).
_NOT_DIFFERENCES = ("experiment", "run_name")
_IN_BASE_NAME = ("dataset", "num_clusters", "loss", "seed")  # a run differing in these has another base name
BASE_NAME_TAG = "dcml.base_name"
MAX_DIFFERENCES = 3  # parameters a name lists; "+N" says how many more differ


def metric_key(name: str) -> str:
    """A name MLflow accepts (alphanumerics, _ - . / : and spaces): recall@1 -> recall_at_1."""
    return re.sub(r"[^\w.\-/ :]", "_", name.replace("@", "_at_"))


def flat_params(values: dict, prefix: str = "") -> dict[str, str]:
    out = {}
    for key, value in values.items():
        name = f"{prefix}{metric_key(str(key))}"
        if isinstance(value, dict):
            out.update(flat_params(value, f"{name}."))
        else:
            text = json.dumps(value) if isinstance(value, (list, tuple)) else str(value)
            out[name] = text[:6000]
    return out


def pipeline_parameters(values: dict) -> dict[str, str]:
    """The parent run's parameters: the pipeline's parameters as it ran, each printed as its type prints it.

    kfp hands a dict of pipeline channels over as text (``"3.0"`` for a whole
    number under kfp.local, ``"true"``); each value is read back with its
    parameter's type (dcml.contracts.params) first.
    """
    out = {}
    for name, value in values.items():
        spec = params.PARAMS.get(name)
        if spec is not None and value is not None:
            if spec.type is int and isinstance(value, str) and re.fullmatch(r"-?\d+\.0*", value.strip()):
                value = value.strip().split(".")[0]
            value = spec.check(value, "pipeline parameters")
        out[name] = str(value)
    return dict(sorted(out.items()))


def lineage_parameters(lineage: list[dict]) -> dict[str, str]:
    """The pipeline parameters the stage records name (stage names mapped back, internals left out)."""
    merged: dict = {}
    for rec in lineage:
        back = {inner: outer for outer, inner in params.STAGE_NAMES.get(rec.get("stage"), {}).items()}
        for key, value in rec.get("params", {}).items():
            name = back.get(key, key)
            spec = params.PARAMS.get(name)
            if spec is not None and spec.pipeline and key not in _PATH_KEYS:
                merged[name] = value
    train = [r for r in lineage if r.get("stage") in ("train", "train-dfml")]
    if train and train[0].get("params", {}).get("num_slices") is not None:
        merged["num_clusters"] = train[0]["params"]["num_slices"]
    if train and train[0].get("params", {}).get("epochs") is not None:
        merged["epochs"] = train[0]["params"]["epochs"]  # finetune's epochs are finetune_epochs
    return flat_params(dict(sorted(merged.items())))


def structure(lineage: list[dict]) -> dict:
    """What the pipeline was, from its records: method (dc, dfml or eval), mode, K, and the code."""
    train = [r for r in lineage if r.get("stage") in ("train", "train-dfml")]
    out: dict = {"method": "eval"}
    if train:
        first = train[0].get("params", {})
        out["method"] = "dfml" if train[0]["stage"] == "train-dfml" else "dc"
        out["mode"] = first.get("mode", "dfml")
        out["num_clusters"] = first.get("num_slices") or first.get("k")
        if first.get("groups") is not None:
            out["groups"] = first["groups"]
    clusters = [r for r in lineage if r.get("stage") == "cluster"]
    if out.get("num_clusters") is None and clusters:
        out["num_clusters"] = clusters[0].get("params", {}).get("k")
    commits = {r.get("git_commit") for r in lineage if r.get("git_commit")}
    tags = {r.get("image_tag") for r in lineage if r.get("image_tag")}
    out["git_commit"] = ",".join(sorted(commits)) or "unknown"
    out["image_tag"] = ",".join(sorted(tags)) or "local (no image)"
    return out


def base_name(lineage: list[dict], values: dict) -> str:
    """``cars196 dc-shared K=4 margin seed0`` (dataset, method-mode, K, loss, seed); ``dfml G=3`` for DFML."""
    s = structure(lineage)
    if s["method"] == "dfml":
        what = "dfml" + (f" G={s['groups']}" if s.get("groups") is not None else "")
    elif s["method"] == "dc":
        mode = "parallel" if s.get("mode") == "worker" else s.get("mode", "shared")
        what = f"dc-{mode}" + (f" K={s['num_clusters']}" if s.get("num_clusters") is not None else "")
    else:
        what = "eval"
    parts = [str(values.get("dataset") or "data"), what, str(values.get("loss") or ""),
             f"seed{values['seed']}" if values.get("seed") not in (None, "") else ""]
    return " ".join(p for p in parts if p)


def _short(name: str, value: str) -> str:
    if name == "data_root":
        value = value.rstrip("/").rsplit("/", 1)[-1]
    if name == "data_version":
        value = value[:8]
    return value if len(value) <= 24 else value[:11] + "…" + value[-11:]


def differences(values: dict[str, str], reference: dict[str, str]) -> list[str]:
    """``name=value`` of the parameters in which ``values`` differ from ``reference`` (not those the base
    name shows), at most MAX_DIFFERENCES, then ``+N``."""
    changed = [k for k in sorted(set(values) | set(reference))
               if k not in _NOT_DIFFERENCES + _IN_BASE_NAME and values.get(k) != reference.get(k)]
    items = [f"{k}={_short(k, values.get(k, '-'))}" for k in changed[:MAX_DIFFERENCES]]
    if len(changed) > MAX_DIFFERENCES:
        items.append(f"+{len(changed) - MAX_DIFFERENCES}")
    return items


def distinct_name(client, experiment_id: str, base: str, values: dict[str, str]) -> str:
    """``base`` plus what sets this run apart from the experiment's first pipeline run named ``base``;
    ``#n`` added when another run of the experiment has that name already."""
    earlier = client.search_runs([experiment_id], filter_string="tags.`dcml.kind` = 'pipeline'",
                                 order_by=["attributes.start_time ASC"], max_results=5000)
    same = [r for r in earlier if r.data.tags.get(BASE_NAME_TAG) == base]
    # The first run of that kind carries the bare base name; start times alone can tie (runs logged in the
    # same millisecond, or with the stages' recorded times), so they only decide when no run has it.
    same.sort(key=lambda r: r.info.run_name != base)
    name = base
    if same:
        name = " ".join([base] + differences(values, same[0].data.params))
    taken = {r.info.run_name for r in earlier}
    if name not in taken:
        return name
    n = 2
    while f"{name} #{n}" in taken:
        n += 1
    return f"{name} #{n}"
