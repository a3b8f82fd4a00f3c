"""Weight sharing by 1-D clustering: each conv/linear weight tensor keeps only
2^B distinct values (a per-layer codebook) and a B-bit index per weight.

Three ways to pick a layer's codebook:

* ``uniform``: 2^B evenly spaced levels between the layer's min and max
  weight; each weight takes the nearest level.
* ``kmeans``: Lloyd's 1-D k-means started from that same linear grid (the
  "linear initialisation" of Deep Compression, Han et al., ICLR 2016).
* ``loss-aware``: importance-weighted 1-D k-means (Choi et al., ICLR 2017):
  minimise ``sum_j sum_{i in C_j} h_i (w_i - c_j)^2`` where ``h_i`` is the
  diagonal Fisher (squared gradients of the metric loss summed over training
  batches, :func:`compute_importance`). A weight still goes to its *nearest*
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

Biases, BatchNorm parameters and buffers are left in float32. Two
function-level corrections keep one codebook per layer usable on networks
with BatchNorm (MobileNet/EfficientNet style): :func:`equalize_channels`
before clustering (per-channel weight ranges made equal, the scale moved into
the BatchNorm, the float function unchanged) and :func:`correct_bias` after it
(BatchNorm running means shifted back to the float model's activation means).
:func:`finetune_centroids` can distil the float model's embeddings. The compressed
checkpoint (``format`` ``dcml.compressed/1``, see :func:`save_compressed`)
stores each layer's float32 codebook and its indices bit-packed at B bits;
:func:`dequantize_state_dict` turns it back into a normal state_dict, which is
what ``dcml.contracts.checkpoint.load_model`` does for this format.
"""

from __future__ import annotations

import io
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from dcml.contracts.errors import DcmlError

FORMAT = "dcml.compressed/1"
METHODS = ("uniform", "kmeans", "loss-aware")
MIN_BITS, MAX_BITS = 2, 8
# Relative floor on normalised importances: a weight the sampled batches never
# touched still counts a little, so no cluster ends up with zero mass.
IMPORTANCE_FLOOR = 1e-8

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


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


def _device_of(model: nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


# -- channel equalisation (function-preserving, before clustering) --------------

def conv_bn_pairs(model: nn.Module, example: torch.Tensor) -> list[tuple[str, str]]:
    """(conv name, BatchNorm name) for every conv whose output goes straight
    into a BatchNorm with running statistics, found by running ``example``
    through the model (eval mode, no gradients) with forward hooks."""
    names = {id(m): n for n, m in model.named_modules()}
    produced: dict[int, tuple[str, torch.Tensor]] = {}
    pairs: list[tuple[str, str]] = []
    hooks = []

    def after_conv(module, _inputs, output):
        produced[id(output)] = (names[id(module)], output)

    def before_bn(module, inputs):
        hit = produced.get(id(inputs[0]))
        if hit is not None and hit[1] is inputs[0]:
            pairs.append((hit[0], names[id(module)]))

    for module in model.modules():
        if isinstance(module, nn.modules.conv._ConvNd):
            hooks.append(module.register_forward_hook(after_conv))
        elif (isinstance(module, nn.modules.batchnorm._BatchNorm) and module.affine
              and module.track_running_stats and module.running_var is not None):
            hooks.append(module.register_forward_pre_hook(before_bn))
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(example.to(_device_of(model)))
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    return list(dict.fromkeys(pairs))


@torch.no_grad()
def equalize_channels(model: nn.Module, example: torch.Tensor, *, rtol: float = 1e-3) -> list[str]:
    """Give every output channel of each conv that feeds a BatchNorm the same
    largest |weight|, moving the scale into the BatchNorm; returns the convs changed.

    One codebook per layer has to serve every channel of it. In depthwise and
    1x1 convs the channels' weight ranges differ by orders of magnitude, so a
    shared 16-value codebook rounds the small channels to a single value --
    and their BatchNorm, which divides by their small running std, then
    magnifies that error. A BatchNorm makes the conv's per-channel scale a free
    choice: for conv channel c scaled by a_c, the BatchNorm's running mean is
    scaled by a_c, its running variance by a_c^2, and its gamma corrected by
    sqrt(a_c^2 var + eps) / (a_c sqrt(var + eps)), which leaves the eval-mode
    output unchanged. Then every channel gets the same share of the codebook.
    The model's output on ``example`` is checked before and after; if it moved
    (a conv output that also feeds something else), the model is restored and
    a DcmlError raised.
    """
    modules = dict(model.named_modules())
    example = example.to(_device_of(model))
    pairs = conv_bn_pairs(model, example)
    if not pairs:
        return []
    was_training = model.training
    model.eval()
    before = model(example)
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    changed = []
    for conv_name, bn_name in pairs:
        conv, bn = modules[conv_name], modules[bn_name]
        w = conv.weight
        peak = w.reshape(w.shape[0], -1).abs().amax(dim=1).double()
        # Channels with (almost) no weights have nothing to share; leave them.
        alive = peak > peak.max() * 1e-6
        if int(alive.sum()) < 2:
            continue
        scale = torch.where(alive, peak[alive].mean() / peak.clamp_min(1e-30), torch.ones_like(peak))
        var = bn.running_var.double()
        gamma_fix = torch.sqrt(scale * scale * var + bn.eps) / (scale * torch.sqrt(var + bn.eps))
        w.mul_(scale.to(w.dtype).view(-1, *[1] * (w.dim() - 1)))
        if conv.bias is not None:
            conv.bias.mul_(scale.to(conv.bias.dtype))
        bn.weight.mul_(gamma_fix.to(bn.weight.dtype))
        bn.running_mean.mul_(scale.to(bn.running_mean.dtype))
        bn.running_var.mul_((scale * scale).to(bn.running_var.dtype))
        changed.append(conv_name)
    after = model(example)
    model.train(was_training)
    drift = float((after - before).abs().max())
    if not drift <= rtol * max(float(before.abs().max()), 1e-12):
        model.load_state_dict(saved)
        raise DcmlError(f"channel equalisation changed the model's output by {drift:.3g} on a training batch (a conv "
                        "output feeds more than its BatchNorm in this architecture); compress with --no-equalize")
    return changed


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


@torch.no_grad()
def correct_bias(model: nn.Module, reference: nn.Module, images: torch.Tensor) -> int:
    """Shift each BatchNorm's running mean by the change quantisation caused in
    the mean of its input (Nagel et al., ICCV 2019, "empirical bias correction");
    returns the number of BatchNorms corrected.

    Rounding a filter's weights changes its response to the image's average
    intensity: with zero-sum filters (edges) the output mean moves by much
    more than the output's own spread. ``reference`` (the float model, same
    architecture) is run on ``images`` to record every BatchNorm's per-channel
    input mean; then ``model`` (quantised) runs on the same images and each
    BatchNorm first moves its running mean by the difference, so layers further
    down already see the corrected activations. Eval-mode outputs on these
    images then match the float model's per-channel means at every BatchNorm.
    """
    def batchnorms(net):
        return {name: m for name, m in net.named_modules()
                if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None}

    targets: dict[str, torch.Tensor] = {}
    ours, theirs = batchnorms(model), batchnorms(reference)
    if set(ours) != set(theirs):
        raise DcmlError("bias correction needs the float model of the same architecture as the quantised one")

    def channel_mean(x: torch.Tensor) -> torch.Tensor:
        return x.transpose(0, 1).reshape(x.shape[1], -1).mean(dim=1)

    def record(name):
        return lambda _module, inputs: targets.__setitem__(name, channel_mean(inputs[0]))

    def shift(name):
        def hook(module, inputs):
            module.running_mean.add_((channel_mean(inputs[0]) - targets[name]).to(module.running_mean.dtype))
        return hook

    for net, hook_of in ((reference, record), (model, shift)):
        hooks = [m.register_forward_pre_hook(hook_of(name)) for name, m in batchnorms(net).items()]
        was_training = net.training
        try:
            net.eval()
            net(images.to(_device_of(net)))
        finally:
            for h in hooks:
                h.remove()
            net.train(was_training)
    return len(ours)


# -- importance and centroid fine-tuning -------------------------------------------

def _images_and_labels(batch, device) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(batch, (list, tuple)) or len(batch) < 2:
        raise DcmlError("each batch must be a tuple (images, labels, ...); use a DataLoader over dcml.algorithm.data.ManifestImageDataset")
    return batch[0].to(device), batch[1].to(device)


def _cycle(batches: Iterable, count: int):
    """``count`` batches, re-iterating ``batches`` when it runs out."""
    taken = 0
    while taken < count:
        yielded = False
        for batch in batches:
            yielded = True
            yield batch
            taken += 1
            if taken >= count:
                return
        if not yielded:
            raise DcmlError("no training batches to draw from; the train split needs at least two classes with two images each")


class _EvalWithGrads:
    """Eval mode (frozen BN statistics, no dropout) with gradients on the
    quantisable weights only; restores modes and requires_grad flags on exit."""

    def __init__(self, model: nn.Module, names: Iterable[str]):
        self.model = model
        self.names = set(names)

    def __enter__(self):
        self.was_training = self.model.training
        self.flags = {name: p.requires_grad for name, p in self.model.named_parameters()}
        self.model.eval()
        for name, p in self.model.named_parameters():
            p.requires_grad_(name in self.names)
        return self

    def __exit__(self, *exc):
        for name, p in self.model.named_parameters():
            p.requires_grad_(self.flags[name])
            p.grad = None
        self.model.train(self.was_training)
        return False


def compute_importance(model: nn.Module, batches: Iterable, loss_fn: LossFn, *,
                       num_batches: int | None = None, stats: dict | None = None,
                       desc: str = "importance") -> dict[str, torch.Tensor]:
    """Diagonal Fisher of the metric loss for every conv/linear weight.

    For each batch ``(images, labels, ...)`` the loss ``loss_fn(model(images),
    labels)`` is back-propagated in eval mode and the squared gradient of every
    quantisable weight is accumulated. ``num_batches`` draws that many batches
    (re-iterating ``batches`` if needed); None uses ``batches`` once. Batches
    whose loss is zero or carries no gradient (no active pair mined) are
    skipped; when every batch is, a DcmlError says so.
    Returns float32 tensors on the CPU, same shapes as the weights; ``stats``
    (a dict, optional) receives ``batches_used`` and ``batches_skipped``.
    """
    layers = quantizable_weights(model)
    device = _device_of(model)
    importance = {name: torch.zeros_like(p, dtype=torch.float32, device=device) for name, p in layers.items()}
    stream = batches if num_batches is None else _cycle(batches, int(num_batches))
    used = skipped = 0
    with _EvalWithGrads(model, layers):
        for batch in tqdm(stream, desc=desc, total=num_batches, disable=None, leave=False):
            model.zero_grad(set_to_none=True)
            images, labels = _images_and_labels(batch, device)
            loss = loss_fn(model(images), labels)
            # A zero loss (no active pair/triplet) carries no information.
            if not loss.requires_grad or float(loss.detach()) == 0.0:
                skipped += 1
                continue
            loss.backward()
            for name, p in layers.items():
                if p.grad is not None:
                    importance[name] += p.grad.detach().float() ** 2
            used += 1
    if used == 0:
        raise DcmlError(f"the loss was zero on all {skipped} importance batches, so no importance could be measured; "
                        "use more batches, another miner (e.g. --miner none) or the plain kmeans method")
    if stats is not None:
        stats.update(batches_used=used, batches_skipped=skipped)
    return {name: h.cpu() for name, h in importance.items()}


def distillation_loss(embeddings: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Half the squared distance to the float model's embedding, batch mean
    (for unit-norm embeddings: 1 - cosine; for K slices, summed over slices)."""
    return 0.5 * ((embeddings - target) ** 2).sum(dim=1).mean()


def float_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Every parameter that is not a quantised weight: biases, BatchNorm gamma/beta."""
    quantized = {id(p) for p in quantizable_weights(model).values()}
    return {name: p for name, p in model.named_parameters() if id(p) not in quantized}


def finetune_centroids(model: nn.Module, codebooks: Mapping[str, QuantizedTensor], batches: Iterable,
                       loss_fn: LossFn | None, steps: int, lr: float, *, optimizer: str = "adam",
                       teacher: nn.Module | None = None, train_float: bool = False,
                       desc: str = "finetune centroids") -> tuple[dict[str, QuantizedTensor], list[float]]:
    """Train the shared values (Deep Compression's centroid fine-tuning).

    Each step materialises every quantised weight from its codebook and fixed
    indices, back-propagates the loss of one batch, and gives centroid j the
    summed gradient of its members (the exact gradient of the loss w.r.t. the
    shared value); ``optimizer`` ("adam" or "sgd") then moves the centroids.
    The loss is ``loss_fn(embeddings, labels)`` or, with a ``teacher`` (the
    float model), :func:`distillation_loss` to the teacher's embedding of the
    same images: a dense signal on every image, where a metric loss on a
    trained model is near zero on most pairs. ``train_float`` also trains the
    float parameters (biases, BatchNorm gamma/beta; stored in float32 anyway)
    at the same learning rate. Indices and BatchNorm statistics stay fixed;
    the model runs in eval mode. Returns (new codebooks, loss per step); the
    model ends up holding the fine-tuned quantised weights.
    """
    if steps < 0:
        raise DcmlError(f"finetune steps={steps}: must be >= 0")
    if lr <= 0:
        raise DcmlError(f"finetune lr={lr}: must be > 0")
    if loss_fn is None and teacher is None:
        raise DcmlError("centroid fine-tuning needs a loss: pass loss_fn or a teacher model to distil from")
    layers = quantizable_weights(model)
    device = _device_of(model)
    centroids = {name: q.codebook.detach().to(device, torch.float32).clone().requires_grad_(True)
                 for name, q in codebooks.items()}
    indices = {name: q.indices.to(device) for name, q in codebooks.items()}
    extra = float_parameters(model) if train_float else {}
    trainable = list(centroids.values()) + list(extra.values())
    if optimizer == "adam":
        opt = torch.optim.Adam(trainable, lr=lr)
    elif optimizer == "sgd":
        opt = torch.optim.SGD(trainable, lr=lr)
    else:
        raise DcmlError(f"optimizer={optimizer!r}: use 'adam' or 'sgd'")
    if teacher is not None:
        teacher.eval()

    def materialise():
        with torch.no_grad():
            for name, c in centroids.items():
                layers[name].copy_(c[indices[name]].reshape(layers[name].shape))

    def batch_loss(batch):
        images, labels = _images_and_labels(batch, device)
        embeddings = model(images)
        if teacher is None:
            return loss_fn(embeddings, labels)
        with torch.no_grad():
            target = teacher(images)
        return distillation_loss(embeddings, target)

    losses: list[float] = []
    materialise()
    with _EvalWithGrads(model, [*centroids, *extra]):
        for batch in tqdm(_cycle(batches, steps) if steps else [], desc=desc, total=steps, disable=None, leave=False):
            model.zero_grad(set_to_none=True)
            opt.zero_grad(set_to_none=True)
            loss = batch_loss(batch)
            losses.append(float(loss.detach()))
            if not loss.requires_grad:
                continue
            loss.backward()
            for name, c in centroids.items():
                grad = layers[name].grad
                if grad is not None:
                    c.grad = torch.zeros_like(c).index_add_(0, indices[name], grad.reshape(-1).float())
            opt.step()
            materialise()
    tuned = {name: QuantizedTensor(codebook=c.detach().cpu().clone(), indices=codebooks[name].indices,
                                   shape=codebooks[name].shape, bits=codebooks[name].bits)
             for name, c in centroids.items()}
    return tuned, losses


# -- bit packing ------------------------------------------------------------------

def pack_indices(indices, bits: int) -> np.ndarray:
    """Pack integer indices in [0, 2^bits) at ``bits`` bits each (MSB first)
    into ceil(n * bits / 8) bytes."""
    bits = check_bits(bits)
    idx = np.asarray(indices).reshape(-1)
    if idx.size and (idx.min() < 0 or idx.max() >= (1 << bits)):
        raise ValueError(f"indices must lie in [0, {1 << bits}) for {bits} bits")
    idx = idx.astype(np.uint8)
    planes = np.empty((idx.size, bits), dtype=np.uint8)
    for b in range(bits):
        planes[:, b] = (idx >> (bits - 1 - b)) & 1
    return np.packbits(planes.reshape(-1))


def unpack_indices(packed, bits: int, count: int) -> np.ndarray:
    """Inverse of :func:`pack_indices`: ``count`` int64 indices."""
    bits = check_bits(bits)
    packed = np.asarray(packed, dtype=np.uint8).reshape(-1)
    if packed.size != math.ceil(count * bits / 8):
        raise ValueError(f"{packed.size} packed bytes cannot hold exactly {count} indices of {bits} bits")
    planes = np.unpackbits(packed, count=count * bits).reshape(count, bits)
    out = np.zeros(count, dtype=np.int64)
    for b in range(bits):
        out |= planes[:, b].astype(np.int64) << (bits - 1 - b)
    return out


# -- storage -----------------------------------------------------------------------

def _own_storage(t: torch.Tensor) -> torch.Tensor:
    # torch.save writes a view's whole storage; copy so only the tensor is stored.
    return t.detach().cpu().contiguous().clone()


def compressed_checkpoint(model: nn.Module, quantized: Mapping[str, QuantizedTensor]) -> dict:
    """The compressed checkpoint dict (without ``record``)."""
    state = model.state_dict()
    missing = [name for name in quantized if name not in state]
    if missing:
        raise DcmlError(f"quantised layer(s) {', '.join(missing[:3])} are not in the model's state_dict")
    layers = {}
    for name, q in quantized.items():
        if tuple(state[name].shape) != tuple(q.shape):
            raise DcmlError(f"quantised layer {name!r} has shape {tuple(q.shape)}, the model's is {tuple(state[name].shape)}")
        layers[name] = {
            "bits": int(q.bits),
            "shape": [int(s) for s in q.shape],
            "codebook": _own_storage(q.codebook.float()),
            "indices": torch.from_numpy(pack_indices(q.indices.numpy(), q.bits)),
        }
    remainder = {}
    for name, t in state.items():
        if name in quantized:
            continue
        remainder[name] = _own_storage(t.float() if t.is_floating_point() else t)
    return {
        "format": FORMAT,
        "model_config": dict(getattr(model, "config", {}) or {}),
        "layers": layers,
        "float": remainder,
    }


def budget_bytes(quantized: Mapping[str, QuantizedTensor], remainder: Mapping[str, torch.Tensor]) -> dict:
    """The theoretical size: packed indices + float32 codebooks + float remainder."""
    index_bytes = sum(math.ceil(q.numel * q.bits / 8) for q in quantized.values())
    codebook_bytes = sum(4 * (1 << q.bits) for q in quantized.values())
    remainder_bytes = sum(t.numel() * t.element_size() for t in remainder.values())
    return {
        "index_bytes": index_bytes,
        "codebook_bytes": codebook_bytes,
        "remainder_bytes": remainder_bytes,
        "budget_bytes": index_bytes + codebook_bytes + remainder_bytes,
    }


def _serialise(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def float_size_bytes(model: nn.Module) -> int:
    """Size of the float32 model as a plain checkpoint (state_dict + config), in bytes."""
    state = {k: _own_storage(v.float() if v.is_floating_point() else v) for k, v in model.state_dict().items()}
    return len(_serialise({"format": "dcml.checkpoint/1", "model_config": dict(getattr(model, "config", {}) or {}),
                           "model": state, "record": "{}"}))


def save_compressed(path: str | os.PathLike, model: nn.Module, quantized: Mapping[str, QuantizedTensor],
                    record: dict | None = None) -> dict:
    """Write the compressed model atomically; return its size report.

    The file is a ``torch.save`` dict (loadable with ``weights_only=True``):
    ``format`` "dcml.compressed/1", ``model_config``, ``layers`` (per quantised
    weight: ``bits``, ``shape``, float32 ``codebook`` [2^B] and the uint8
    ``indices`` bit-packed at B bits), ``float`` (the rest of the state_dict,
    float32) and ``record`` (JSON string). When ``record`` is given, the size
    report is stored in ``record["metrics"]`` with ``compressed_size_bytes``
    equal to the final file's exact size.
    """
    from dcml.contracts.io import atomic_path

    ckpt = compressed_checkpoint(model, quantized)
    report = budget_bytes(quantized, ckpt["float"])
    report["float_size_bytes"] = float_size_bytes(model)
    report["quantized_weights"] = sum(q.numel for q in quantized.values())
    report["float_params"] = sum(t.numel() for t in ckpt["float"].values())
    record = dict(record) if record is not None else None

    size = 0
    for _ in range(10):  # the record holds the file size: iterate to a fixed point
        report["compressed_size_bytes"] = size
        report["compression_ratio"] = report["float_size_bytes"] / size if size else 0.0
        report["overhead_bytes"] = size - report["budget_bytes"]
        if record is not None:
            record["metrics"] = {**record.get("metrics", {}), **report}
        blob = _serialise({**ckpt, "record": json.dumps(record or {}, sort_keys=True)})
        if len(blob) == size:
            break
        size = len(blob)
    with atomic_path(path) as tmp:
        Path(tmp).write_bytes(blob)
    report["compressed_size_bytes"] = os.path.getsize(path)
    report["compression_ratio"] = report["float_size_bytes"] / report["compressed_size_bytes"]
    report["overhead_bytes"] = report["compressed_size_bytes"] - report["budget_bytes"]
    return report


def dequantize_state_dict(ckpt: Mapping) -> dict[str, torch.Tensor]:
    """The float32 state_dict of a ``dcml.compressed/1`` checkpoint dict."""
    fix = "re-create it with `dcml compress`"
    if not isinstance(ckpt, Mapping) or ckpt.get("format") != FORMAT:
        got = ckpt.get("format") if isinstance(ckpt, Mapping) else type(ckpt).__name__
        raise DcmlError(f"compressed model: format is {got!r}, expected {FORMAT!r}; {fix}")
    layers, remainder = ckpt.get("layers"), ckpt.get("float")
    if not isinstance(layers, Mapping) or not isinstance(remainder, Mapping):
        raise DcmlError(f"compressed model: lacks 'layers' or 'float'; {fix}")
    state = dict(remainder)
    for name, entry in layers.items():
        try:
            bits = check_bits(entry["bits"])
            shape = tuple(int(s) for s in entry["shape"])
            codebook = entry["codebook"].float()
            packed = entry["indices"]
        except (KeyError, TypeError, AttributeError, DcmlError) as exc:
            raise DcmlError(f"compressed model: layer {name!r} is malformed ({exc}); {fix}") from None
        if codebook.numel() != 1 << bits:
            raise DcmlError(f"compressed model: layer {name!r} has {codebook.numel()} codebook entries for {bits} bits; {fix}")
        count = math.prod(shape)
        try:
            indices = unpack_indices(packed.numpy(), bits, count)
        except ValueError as exc:
            raise DcmlError(f"compressed model: layer {name!r}: {exc}; {fix}") from None
        state[name] = codebook[torch.from_numpy(indices)].reshape(shape)
    return state


__all__ = [
    "FORMAT", "METHODS", "QuantizedTensor", "quantizable_weights", "uniform_quantize", "kmeans_quantize",
    "lloyd_1d", "quantize_tensor", "quantize_model", "apply_quantized", "reconstruction_errors",
    "error_summary", "compute_importance", "finetune_centroids", "distillation_loss", "float_parameters",
    "conv_bn_pairs", "equalize_channels", "correct_bias", "pack_indices", "unpack_indices",
    "compressed_checkpoint", "save_compressed", "dequantize_state_dict", "float_size_bytes", "budget_bytes",
]
