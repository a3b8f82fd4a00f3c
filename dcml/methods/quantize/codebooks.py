"""Per-layer codebooks: each conv/linear weight tensor keeps only 2^B distinct
values (its codebook) and a B-bit index per weight.

Three ways to pick a layer's codebook (:data:`METHODS`):

* ``uniform``: 2^B evenly spaced levels between the layer's min and max
  weight; each weight takes the nearest level.
* ``kmeans``: Lloyd's 1-D k-means started from that same linear grid (the
  "linear initialisation" of Deep Compression, Han et al., ICLR 2016).
* ``loss-aware``: importance-weighted 1-D k-means (Choi et al., ICLR 2017):
  minimise ``sum_j sum_{i in C_j} h_i (w_i - c_j)^2`` where ``h_i`` is the
  diagonal Fisher (squared gradients of the metric loss summed over training
  batches, :func:`.importance.compute_importance`). A weight still goes to its *nearest*
  centroid (weighting a 1-D assignment by a per-weight factor cannot change
  which centroid is nearest); what changes is the update: each centroid is
  the h-weighted mean of its members, so it moves towards the weights whose
  error costs the most loss. Weighted Lloyd starts from both the linear grid
  and the plain k-means solution and keeps the lower weighted error, so it is
  never worse than plain k-means on its own objective.

All three share one exact, deterministic Lloyd implementation on the sorted
weights: with centroids in increasing order every cluster is a contiguous run
of the sorted weights, so an iteration is two ``searchsorted`` calls on the
centroid midpoints plus differences of prefix sums -- O(k log n) after one
sort, no per-weight distance matrix.

Also here: which tensors get quantised (:func:`quantizable_weights`), codebooks
for a whole model, writing them into it, and their reconstruction errors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import numpy as np
import torch
from torch import nn
from tqdm import tqdm  # not tqdm.auto: see dcml.contracts.events.progress

from dcml.contracts.errors import DcmlError

METHODS = ("uniform", "kmeans", "loss-aware")
MIN_BITS, MAX_BITS = 2, 8
# Relative floor on normalised importances: a weight the sampled batches never
# touched still counts a little, so no cluster ends up with zero mass.
IMPORTANCE_FLOOR = 1e-8


@dataclass
class QuantizedTensor:
    """One layer's weight as a codebook plus an index per weight."""

    codebook: torch.Tensor  # float32 [2**bits]
    indices: torch.Tensor  # int64 [numel], row-major order of ``shape``
    shape: tuple[int, ...]
    bits: int

    @property
    def numel(self) -> int:
        return int(self.indices.numel())

    def dequantize(self) -> torch.Tensor:
        return self.codebook[self.indices].reshape(self.shape)


# -- which tensors get quantised ------------------------------------------------

_QUANTIZED_MODULES = (nn.Linear, nn.modules.conv._ConvNd)


def quantizable_weights(model: nn.Module) -> dict[str, nn.Parameter]:
    """The ``weight`` of every conv and linear layer, keyed by its state_dict name.

    A parameter shared by several layers is listed once (under its first name).
    """
    out: dict[str, nn.Parameter] = {}
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        if not isinstance(module, _QUANTIZED_MODULES):
            continue
        weight = getattr(module, "weight", None)
        if not isinstance(weight, nn.Parameter) or id(weight) in seen:
            continue
        seen.add(id(weight))
        out[f"{module_name}.weight" if module_name else "weight"] = weight
    return out


# -- arguments -------------------------------------------------------------------

def check_bits(bits: int) -> int:
    if isinstance(bits, bool) or int(bits) != bits or not MIN_BITS <= int(bits) <= MAX_BITS:
        raise DcmlError(f"bits={bits!r}: weights are quantised to 2^B shared values with B from {MIN_BITS} to {MAX_BITS}; pick one in that range")
    return int(bits)


def check_method(method: str) -> str:
    if method not in METHODS:
        raise DcmlError(f"method={method!r}: unknown quantisation method; use one of {', '.join(METHODS)}")
    return method


# -- one tensor -------------------------------------------------------------------

def _as_float64(values) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().to("cpu", torch.float64).numpy()
    arr = np.asarray(values, dtype=np.float64).reshape(-1)
    if arr.size == 0:
        raise DcmlError("cannot quantise an empty weight tensor")
    if not np.isfinite(arr).all():
        raise DcmlError("weight tensor holds NaN or inf values; the model is broken -- retrain or load another checkpoint")
    return arr


def _quantized(codebook: np.ndarray, indices: np.ndarray, shape, bits: int) -> QuantizedTensor:
    return QuantizedTensor(
        codebook=torch.from_numpy(np.ascontiguousarray(codebook, dtype=np.float32)),
        indices=torch.from_numpy(np.ascontiguousarray(indices, dtype=np.int64)),
        shape=tuple(int(s) for s in shape),
        bits=bits,
    )


def uniform_quantize(weights: torch.Tensor, bits: int) -> QuantizedTensor:
    """2^B evenly spaced levels from min to max; every weight to the nearest level."""
    bits = check_bits(bits)
    values = _as_float64(weights)
    k = 1 << bits
    lo, hi = float(values.min()), float(values.max())
    codebook = np.linspace(lo, hi, k)
    if hi > lo:
        step = (hi - lo) / (k - 1)
        indices = np.clip(np.rint((values - lo) / step), 0, k - 1).astype(np.int64)
    else:
        indices = np.zeros(values.size, dtype=np.int64)
    return _quantized(codebook, indices, tuple(weights.shape), bits)


def normalize_importance(importance, size: int, damping: float = 0.0) -> np.ndarray | None:
    """Importances scaled to max 1, plus ``damping`` x their mean, with a small
    floor; None when they carry no preference (all equal, or all zero).

    Scaling by the max keeps equal importances exactly equal, so loss-aware
    k-means with constant importance is plain k-means. A layer whose
    importance is all zero (no gradient reached it) falls back to plain
    k-means. Damping (as in Levenberg-Marquardt) shrinks a noisy, heavy-tailed
    Fisher estimate towards uniform weights.
    """
    if importance is None:
        return None
    h = _as_float64(importance)
    if h.size != size:
        raise DcmlError(f"importance has {h.size} entries for a weight tensor of {size}; compute it for the same model")
    if (h < 0).any():
        raise DcmlError("importance values must be non-negative (squared gradients); recompute them with compute_importance")
    if damping < 0:
        raise DcmlError(f"damping={damping}: must be >= 0")
    top = h.max()
    if top <= 0 or (h == top).all():
        return None
    h = h / top
    if damping:
        h = h + damping * h.mean()
        h = h / h.max()
    return np.maximum(h, IMPORTANCE_FLOOR)


class _SortedValues:
    """A weight tensor sorted once, with prefix sums of the (weighted) values,
    so that each Lloyd iteration costs O(k log n)."""

    def __init__(self, values: np.ndarray, weights: np.ndarray | None):
        self.values = np.asarray(values, dtype=np.float64).reshape(-1)
        self.weights = None if weights is None else np.asarray(weights, dtype=np.float64).reshape(-1)
        order = np.argsort(self.values, kind="stable")
        self.sorted = self.values[order]
        mass = np.ones(self.values.size) if self.weights is None else self.weights[order]
        self.cum_mass = np.concatenate([[0.0], np.cumsum(mass)])
        self.cum_moment = np.concatenate([[0.0], np.cumsum(mass * self.sorted)])

    def lloyd(self, centroids: np.ndarray, max_iter: int) -> tuple[np.ndarray, int]:
        sorted_values, n = self.sorted, self.sorted.size
        centroids = np.sort(np.asarray(centroids, dtype=np.float64))
        bounds = None
        iterations = 0
        for iterations in range(1, max_iter + 1):
            midpoints = (centroids[:-1] + centroids[1:]) / 2
            # Cluster j holds sorted positions [bounds[j], bounds[j+1]): values <= midpoint j.
            new_bounds = np.concatenate([[0], np.searchsorted(sorted_values, midpoints, side="right"), [n]])
            if bounds is not None and np.array_equal(new_bounds, bounds):
                break
            bounds = new_bounds
            cluster_mass = self.cum_mass[bounds[1:]] - self.cum_mass[bounds[:-1]]
            cluster_moment = self.cum_moment[bounds[1:]] - self.cum_moment[bounds[:-1]]
            filled = (bounds[1:] > bounds[:-1]) & (cluster_mass > 0)
            means = cluster_moment / np.where(filled, cluster_mass, 1.0)
            # Prefix-sum differences can stray by an ulp outside the run; clamp.
            lo_run = sorted_values[np.minimum(bounds[:-1], n - 1)]
            hi_run = sorted_values[np.maximum(bounds[1:] - 1, 0)]
            centroids = np.where(filled, np.clip(means, lo_run, hi_run), centroids)
        return centroids, iterations

    def assign(self, centroids: np.ndarray) -> np.ndarray:
        """Index of the nearest centroid (ties to the lower one) of every value."""
        midpoints = (centroids[:-1] + centroids[1:]) / 2
        return np.searchsorted(midpoints, self.values, side="left").astype(np.int64)

    def objective(self, centroids: np.ndarray) -> float:
        err = (self.values - centroids[self.assign(centroids)]) ** 2
        return float(np.sum(err if self.weights is None else self.weights * err))

    def linear_init(self, k: int) -> np.ndarray:
        return np.linspace(self.sorted[0], self.sorted[-1], k)


def lloyd_1d(values: np.ndarray, k: int, weights: np.ndarray | None = None,
             max_iter: int = 300, init: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, int]:
    """Weighted 1-D k-means (Lloyd) from ``init`` (default: a linear grid
    between min and max).

    Returns (centroids [k] in increasing order, indices [n], iterations). Each
    iteration assigns every value to its nearest centroid (ties to the lower
    one) and moves each centroid to the weighted mean of its members; an empty
    cluster keeps its centroid. Stops when the assignment no longer changes.
    """
    data = _SortedValues(values, weights)
    centroids, iterations = data.lloyd(data.linear_init(k) if init is None else init, max_iter)
    return centroids, data.assign(centroids), iterations


def kmeans_quantize(weights: torch.Tensor, bits: int, importance=None, *, max_iter: int = 300,
                    damping: float = 0.0) -> QuantizedTensor:
    """Deep Compression k-means (importance=None) or importance-weighted k-means.

    Weighted Lloyd is a local search, and on heavy-tailed importances the
    linear-grid start can end in a worse optimum of the *weighted* objective
    than plain k-means' own solution. So the weighted run starts from both the
    grid and the plain k-means centroids and keeps whichever reaches the lower
    weighted error: loss-aware is never worse than plain k-means on its own
    objective, and with equal importances it is plain k-means.
    """
    bits = check_bits(bits)
    values = _as_float64(weights)
    k = 1 << bits
    h = normalize_importance(importance, values.size, damping=damping)
    plain = _SortedValues(values, None)
    centroids, _ = plain.lloyd(plain.linear_init(k), max_iter)
    if h is not None:
        weighted = _SortedValues(values, h)
        candidates = [weighted.lloyd(start, max_iter)[0] for start in (weighted.linear_init(k), centroids)]
        centroids = min(candidates, key=weighted.objective)
    return _quantized(centroids, plain.assign(centroids), tuple(weights.shape), bits)


def quantize_tensor(weights: torch.Tensor, bits: int, method: str, importance=None, *,
                    max_iter: int = 300, damping: float = 0.0) -> QuantizedTensor:
    check_method(method)
    if method == "uniform":
        return uniform_quantize(weights, bits)
    if method == "kmeans":
        return kmeans_quantize(weights, bits, None, max_iter=max_iter)
    if importance is None:
        raise DcmlError("method 'loss-aware' needs importances; compute them with compute_importance(model, batches, loss_fn)")
    return kmeans_quantize(weights, bits, importance, max_iter=max_iter, damping=damping)


# -- a whole model ----------------------------------------------------------------

def quantize_model(model: nn.Module, bits: int, method: str,
                   importance: Mapping[str, torch.Tensor] | None = None, *,
                   max_iter: int = 300, damping: float = 0.0, progress: bool = True) -> dict[str, QuantizedTensor]:
    """Codebooks for every conv/linear weight of ``model`` (the model is not changed)."""
    bits = check_bits(bits)
    check_method(method)
    layers = quantizable_weights(model)
    if not layers:
        raise DcmlError("the model has no conv or linear layer to quantise")
    if method == "loss-aware":
        if importance is None:
            raise DcmlError("method 'loss-aware' needs importances; compute them with compute_importance(model, batches, loss_fn)")
        missing = [name for name in layers if name not in importance]
        if missing:
            raise DcmlError(f"importance lacks layer(s) {', '.join(missing[:3])}; compute it for this model")
    out = {}
    for name, weight in tqdm(layers.items(), desc=f"quantise {method} {bits}b", disable=not progress or None, leave=False):
        out[name] = quantize_tensor(weight, bits, method, importance[name] if method == "loss-aware" else None,
                                    max_iter=max_iter, damping=damping)
    return out


@torch.no_grad()
def apply_quantized(model: nn.Module, quantized: Mapping[str, QuantizedTensor]) -> nn.Module:
    """Overwrite the model's weights in place with their dequantised values."""
    layers = quantizable_weights(model)
    for name, q in quantized.items():
        if name not in layers:
            raise DcmlError(f"quantised layer {name!r} does not exist in the model; quantise this model's own weights")
        param = layers[name]
        if tuple(param.shape) != tuple(q.shape):
            raise DcmlError(f"quantised layer {name!r} has shape {tuple(q.shape)}, the model's is {tuple(param.shape)}")
        param.copy_(q.dequantize().to(param.device, param.dtype))
    return model


def reconstruction_errors(weights: Mapping[str, torch.Tensor], quantized: Mapping[str, QuantizedTensor],
                          importance: Mapping[str, torch.Tensor] | None = None) -> dict[str, dict]:
    """Per layer: mse, max_abs, relative mse (mse / weight variance) and, with
    importances, the importance-weighted squared error sum_i h_i (w_i - q_i)^2."""
    out = {}
    for name, q in quantized.items():
        w = _as_float64(weights[name])
        err = w - q.dequantize().to(torch.float64).numpy().reshape(-1)
        var = float(w.var())
        row = {
            "numel": int(w.size),
            "mse": float(np.mean(err ** 2)),
            "max_abs": float(np.abs(err).max()),
            "rel_mse": float(np.mean(err ** 2) / var) if var > 0 else 0.0,
            "used_levels": int(np.unique(q.indices.numpy()).size),
        }
        if importance is not None and name in importance:
            row["weighted_sq_error"] = float(np.sum(_as_float64(importance[name]) * err ** 2))
        out[name] = row
    return out


def error_summary(errors: Mapping[str, dict]) -> dict:
    """Whole-model summary of :func:`reconstruction_errors` (numel-weighted mse)."""
    rows = list(errors.values())
    numel = sum(r["numel"] for r in rows)
    summary = {
        "layers": len(rows),
        "weights": numel,
        "mse": sum(r["mse"] * r["numel"] for r in rows) / max(numel, 1),
        "rel_mse_mean": float(np.mean([r["rel_mse"] for r in rows])) if rows else 0.0,
        "rel_mse_max": max((r["rel_mse"] for r in rows), default=0.0),
        "max_abs": max((r["max_abs"] for r in rows), default=0.0),
    }
    if rows and all("weighted_sq_error" in r for r in rows):
        summary["weighted_sq_error"] = sum(r["weighted_sq_error"] for r in rows)
    return summary
