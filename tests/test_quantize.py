"""dcml.methods.quantize: 1-D codebooks (uniform, k-means, loss-aware), bit packing,
importance, centroid fine-tuning and the compressed checkpoint format."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
from sklearn.cluster import KMeans
from torch import nn

from dcml.methods import quantize as Q
from dcml.contracts.errors import DcmlError

torch.set_num_threads(1)
ALL_BITS = range(2, 9)


def gaussian(n=4000, seed=0) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).standard_normal(n).astype(np.float32) * 0.05)


class TinyNet(nn.Module):
    """conv + BN + linear: two quantisable weights, biases and BN stay float."""

    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(1, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.head = nn.Linear(6, 5)
        self.config = {"backbone": "tiny", "embedding_dim": 5}
        with torch.no_grad():  # non-trivial BN statistics
            self.bn.running_mean.uniform_(-0.1, 0.1)
            self.bn.running_var.uniform_(0.5, 1.5)
            self.bn.weight.uniform_(0.5, 1.5)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv(x)))
        return self.head(x.mean(dim=(2, 3)))


def batches(n=3, size=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, 1, 6, 6, generator=g), torch.arange(size) % 4, torch.arange(size)) for _ in range(n)]


def sq_loss(embeddings, labels):
    target = nn.functional.one_hot(labels, embeddings.shape[1]).float()
    return ((embeddings - target) ** 2).mean()


# -- codebooks and indices ----------------------------------------------------------

@pytest.mark.parametrize("method", Q.METHODS)
@pytest.mark.parametrize("bits", ALL_BITS)
def test_codebook_size_and_index_range(method, bits):
    w = gaussian(3000, seed=bits).reshape(30, 100)
    h = torch.rand(3000).reshape(30, 100)
    q = Q.quantize_tensor(w, bits, method, importance=h)
    assert q.codebook.dtype == torch.float32 and q.codebook.shape == (1 << bits,)
    assert q.indices.shape == (3000,) and q.indices.dtype == torch.int64
    assert int(q.indices.min()) >= 0 and int(q.indices.max()) < (1 << bits)
    deq = q.dequantize()
    assert deq.shape == w.shape
    assert torch.unique(deq).numel() <= 1 << bits


@pytest.mark.parametrize("bits", ALL_BITS)
def test_uniform_error_at_most_half_a_step(bits):
    w = gaussian(5000, seed=1)
    q = Q.uniform_quantize(w, bits)
    step = (w.max() - w.min()).item() / ((1 << bits) - 1)
    err = (q.dequantize() - w).abs().max().item()
    assert err <= step / 2 + 1e-7
    # levels are the min-max grid, ends included
    assert q.codebook[0].item() == pytest.approx(w.min().item()) and q.codebook[-1].item() == pytest.approx(w.max().item())
    assert np.allclose(np.diff(q.codebook.numpy()), step, rtol=1e-4)


@pytest.mark.parametrize("bits", ALL_BITS)
def test_kmeans_mse_no_worse_than_uniform(bits):
    w = gaussian(6000, seed=2)
    mse_uniform = (Q.uniform_quantize(w, bits).dequantize() - w).pow(2).mean().item()
    mse_kmeans = (Q.kmeans_quantize(w, bits).dequantize() - w).pow(2).mean().item()
    assert mse_kmeans <= mse_uniform * (1 + 1e-6)
    if bits <= 4:  # on gaussian weights k-means is clearly better at low bits
        assert mse_kmeans < 0.8 * mse_uniform


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_kmeans_matches_sklearn_lloyd_from_linear_init(bits):
    w = gaussian(3000, seed=3)
    q = Q.kmeans_quantize(w, bits, max_iter=1000)
    x = w.double().numpy().reshape(-1, 1)
    init = np.linspace(x.min(), x.max(), 1 << bits).reshape(-1, 1)
    ref = KMeans(1 << bits, init=init, n_init=1, max_iter=1000, tol=0, algorithm="lloyd").fit(x)
    assert np.allclose(np.sort(ref.cluster_centers_.ravel()), q.codebook.numpy(), atol=1e-6)


def test_kmeans_is_a_fixed_point_of_lloyd():
    w = gaussian(2000, seed=4).double().numpy()
    h = np.random.default_rng(4).gamma(0.5, size=2000)
    centroids, idx, iters = Q.lloyd_1d(w, 8, h, max_iter=10_000)
    assert iters < 10_000
    # nearest-centroid assignment
    nearest = np.abs(w[:, None] - centroids[None, :]).argmin(axis=1)
    assert np.allclose(np.abs(w - centroids[idx]), np.abs(w - centroids[nearest]))
    # every non-empty centroid is the weighted mean of its members
    for j in np.unique(idx):
        members = idx == j
        assert centroids[j] == pytest.approx(np.average(w[members], weights=h[members]), rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("bits", ALL_BITS)
def test_loss_aware_equals_kmeans_when_importances_equal(bits):
    w = gaussian(4000, seed=5)
    plain = Q.kmeans_quantize(w, bits)
    for value in (1.0, 3.7e-9, 250.0):
        aware = Q.quantize_tensor(w, bits, "loss-aware", importance=torch.full_like(w, value))
        assert torch.equal(aware.codebook, plain.codebook)
        assert torch.equal(aware.indices, plain.indices)


def test_loss_aware_centroids_move_towards_important_weights():
    w = gaussian(6000, seed=6)
    h = torch.full_like(w, 1e-3)
    important = (w > 0.02) & (w < 0.06)
    h[important] = 1.0
    plain = Q.kmeans_quantize(w, 2)
    aware = Q.quantize_tensor(w, 2, "loss-aware", importance=h)

    def weighted(q):
        return float((h * (w - q.dequantize()) ** 2).sum())

    assert weighted(aware) < 0.6 * weighted(plain)
    err_plain = (w - plain.dequantize())[important].abs().mean()
    err_aware = (w - aware.dequantize())[important].abs().mean()
    assert err_aware < 0.8 * err_plain
    # ... paid for on the unimportant weights: plain k-means wins there
    assert (w - aware.dequantize()).pow(2).mean() > (w - plain.dequantize()).pow(2).mean()


@pytest.mark.parametrize("bits", ALL_BITS)
def test_loss_aware_never_loses_to_kmeans_on_the_weighted_objective(bits):
    # heavy-tailed importances, like a Fisher diagonal from a few batches
    rng = np.random.default_rng(bits)
    w = torch.from_numpy(np.concatenate([rng.standard_normal(5000), 4 + rng.standard_normal(300)]).astype(np.float32))
    h = torch.from_numpy(rng.pareto(1.2, w.numel()).astype(np.float32))

    def weighted(q):
        return float((h.double() * (w.double() - q.dequantize().double()) ** 2).sum())

    plain = Q.kmeans_quantize(w, bits)
    aware = Q.quantize_tensor(w, bits, "loss-aware", importance=h)
    assert weighted(aware) <= weighted(plain) * (1 + 1e-9)
    assert not torch.equal(aware.codebook, plain.codebook)


def test_damping_moves_loss_aware_towards_plain_kmeans():
    w = gaussian(6000, seed=8)
    h = torch.full_like(w, 1e-3)
    h[(w > 0.02) & (w < 0.06)] = 1.0
    plain = Q.kmeans_quantize(w, 2).codebook
    gaps = [float((Q.quantize_tensor(w, 2, "loss-aware", importance=h, damping=d).codebook - plain).abs().max())
            for d in (0.0, 1.0, 1e6)]
    assert gaps[0] > gaps[1] > gaps[2] and gaps[2] < 1e-4
    with pytest.raises(DcmlError, match="damping"):
        Q.quantize_tensor(w, 2, "loss-aware", importance=h, damping=-1)


def test_zero_importance_falls_back_to_kmeans_and_is_deterministic():
    w = gaussian(3000, seed=7)
    plain = Q.kmeans_quantize(w, 3)
    aware = Q.quantize_tensor(w, 3, "loss-aware", importance=torch.zeros_like(w))
    assert torch.equal(aware.codebook, plain.codebook)
    h = torch.rand(3000, generator=torch.Generator().manual_seed(0))
    a = Q.quantize_tensor(w, 3, "loss-aware", importance=h)
    b = Q.quantize_tensor(w.clone(), 3, "loss-aware", importance=h.clone())
    assert torch.equal(a.codebook, b.codebook) and torch.equal(a.indices, b.indices)


def test_constant_tensor_and_bad_arguments():
    q = Q.kmeans_quantize(torch.full((10,), 0.5), 2)
    assert torch.all(q.dequantize() == 0.5)
    q = Q.uniform_quantize(torch.full((10,), 0.5), 2)
    assert torch.all(q.dequantize() == 0.5)
    for bits in (1, 9, 2.5, True):
        with pytest.raises(DcmlError, match="bits"):
            Q.uniform_quantize(gaussian(10), bits)
    with pytest.raises(DcmlError, match="method"):
        Q.quantize_tensor(gaussian(10), 4, "kmedians")
    with pytest.raises(DcmlError, match="importance"):
        Q.quantize_tensor(gaussian(10), 4, "loss-aware")
    with pytest.raises(DcmlError, match="NaN"):
        Q.kmeans_quantize(torch.tensor([0.0, float("nan")]), 2)
    with pytest.raises(DcmlError, match="non-negative"):
        Q.quantize_tensor(gaussian(10), 2, "loss-aware", importance=-torch.ones(10))


# -- bit packing ------------------------------------------------------------------

@pytest.mark.parametrize("bits", ALL_BITS)
def test_pack_unpack_round_trip(bits):
    rng = np.random.default_rng(bits)
    for n in (1, 3, 7, 13, 1001):
        idx = rng.integers(0, 1 << bits, n)
        idx[0] = (1 << bits) - 1  # the extremes survive
        idx[-1] = 0 if n > 1 else idx[-1]
        packed = Q.pack_indices(idx, bits)
        assert packed.dtype == np.uint8 and packed.size == math.ceil(n * bits / 8)
        assert np.array_equal(Q.unpack_indices(packed, bits, n), idx)
    with pytest.raises(ValueError):
        Q.pack_indices([1 << bits], bits)
    with pytest.raises(ValueError):
        Q.unpack_indices(np.zeros(3, np.uint8), bits, 100)


def test_pack_layout_is_msb_first():
    # 2-bit indices 3,0,1,2 -> bits 11 00 01 10 -> one byte 0b11000110
    assert Q.pack_indices([3, 0, 1, 2], 2).tolist() == [0b11000110]
    # 3-bit 5,2,7 -> 101 010 111 (+ 7 zero pad bits) -> 10101011 10000000
    assert Q.pack_indices([5, 2, 7], 3).tolist() == [0b10101011, 0b10000000]


# -- a whole model, storage ------------------------------------------------------------

def test_quantizable_weights_are_conv_and_linear_only():
    model = TinyNet()
    assert list(Q.quantizable_weights(model)) == ["conv.weight", "head.weight"]


@pytest.mark.parametrize("method", Q.METHODS)
@pytest.mark.parametrize("bits", [2, 3, 5, 8])
def test_save_dequantize_matches_in_memory_and_fits_budget(tmp_path, method, bits):
    model = TinyNet()
    importance = Q.compute_importance(model, batches(), sq_loss)
    quantized = Q.quantize_model(model, bits, method, importance, progress=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    record = {"stage": "compress", "metrics": {"bits": bits}}
    path = tmp_path / "c.pt"
    report = Q.save_compressed(path, model, quantized, record=record)

    # the model itself is untouched by quantise/save
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    Q.apply_quantized(model, quantized)
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["format"] == "dcml.compressed/1" and ckpt["model_config"] == model.config
    state = Q.dequantize_state_dict(ckpt)
    expected = model.state_dict()
    assert set(state) == set(expected)
    for k in expected:
        assert torch.equal(state[k], expected[k]), k
    # biases and BatchNorm stay float32 and unchanged
    for k in ("conv.bias", "bn.weight", "bn.running_var", "head.bias"):
        assert state[k].dtype == torch.float32 and torch.equal(state[k], before[k])
    assert ckpt["layers"]["conv.weight"]["indices"].dtype == torch.uint8
    assert ckpt["layers"]["conv.weight"]["indices"].numel() == math.ceil(54 * bits / 8)

    size = os.path.getsize(path)
    n_weights = 54 + 30
    remainder = sum(v.numel() * 4 for k, v in before.items() if k not in quantized and v.is_floating_point()) + 8
    budget = math.ceil(54 * bits / 8) + math.ceil(30 * bits / 8) + 2 * 4 * (1 << bits) + remainder
    assert report["budget_bytes"] == budget
    assert report["quantized_weights"] == n_weights
    # torch.save's zip container: a fixed part (pickle, record, directory) and
    # a few hundred bytes per stored tensor (10 here)
    assert budget < size <= budget + 4096 + 10 * 320
    stored = __import__("json").loads(ckpt["record"])
    assert stored["metrics"]["compressed_size_bytes"] == size == report["compressed_size_bytes"]
    assert stored["metrics"]["bits"] == bits
    assert report["compression_ratio"] == pytest.approx(report["float_size_bytes"] / size)


def test_size_on_disk_tracks_the_bit_budget_on_a_larger_layer(tmp_path):
    model = nn.Sequential(nn.Linear(512, 512, bias=False))
    for bits in (2, 4, 8):
        q = Q.quantize_model(model, bits, "kmeans", progress=False)
        report = Q.save_compressed(tmp_path / f"m{bits}.pt", model, q)
        assert report["index_bytes"] == 512 * 512 * bits // 8
        assert 0 < report["overhead_bytes"] <= 2048
        assert report["compression_ratio"] == pytest.approx(32 / bits, rel=0.05)


def test_dequantize_rejects_bad_checkpoints(tmp_path):
    model = TinyNet()
    ckpt = Q.compressed_checkpoint(model, Q.quantize_model(model, 3, "uniform", progress=False))
    with pytest.raises(DcmlError, match="format"):
        Q.dequantize_state_dict({**ckpt, "format": "dcml.checkpoint/1"})
    broken = {**ckpt, "layers": {**ckpt["layers"], "conv.weight": {**ckpt["layers"]["conv.weight"]}}}
    broken["layers"]["conv.weight"]["indices"] = broken["layers"]["conv.weight"]["indices"][:-1]
    with pytest.raises(DcmlError, match="conv.weight"):
        Q.dequantize_state_dict(broken)
    broken["layers"]["conv.weight"] = {"bits": 3}
    with pytest.raises(DcmlError, match="malformed"):
        Q.dequantize_state_dict(broken)


# -- importance and centroid fine-tuning ---------------------------------------------

def test_importance_is_summed_squared_gradient_and_restores_the_model():
    model = TinyNet()
    model.train()
    model.head.bias.requires_grad_(False)
    data = batches(n=3)
    stats = {}
    importance = Q.compute_importance(model, data, sq_loss, stats=stats)
    assert stats == {"batches_used": 3, "batches_skipped": 0}
    assert set(importance) == {"conv.weight", "head.weight"}
    assert model.training and not model.head.bias.requires_grad and model.conv.bias.requires_grad
    assert all(p.grad is None for p in model.parameters())

    ref = {name: torch.zeros_like(p) for name, p in Q.quantizable_weights(model).items()}
    model.eval()
    for images, labels, _ in data:
        model.zero_grad()
        sq_loss(model(images), labels).backward()
        for name, p in Q.quantizable_weights(model).items():
            ref[name] += p.grad ** 2
    for name in ref:
        assert torch.allclose(importance[name], ref[name], rtol=1e-5, atol=1e-12)
        assert importance[name].shape == ref[name].shape and (importance[name] > 0).any()
    # num_batches re-iterates the batches
    twice = Q.compute_importance(model, data, sq_loss, num_batches=6)
    assert torch.allclose(twice["head.weight"], 2 * importance["head.weight"], rtol=1e-5)


def test_importance_needs_a_gradient():
    model = TinyNet()
    with pytest.raises(DcmlError, match="zero on all 3"):
        Q.compute_importance(model, batches(), lambda e, y: torch.tensor(0.0))


def test_finetune_moves_each_centroid_by_its_members_summed_gradient():
    model = TinyNet()
    codebooks = Q.quantize_model(model, 2, "kmeans", progress=False)
    data = batches(n=1)
    # reference: gradient of the loss at the quantised weights, summed per cluster
    ref = TinyNet()
    ref.load_state_dict(model.state_dict())
    Q.apply_quantized(ref, codebooks)
    ref.eval()
    sq_loss(ref(data[0][0]), data[0][1]).backward()
    lr = 0.05
    tuned, losses = Q.finetune_centroids(model, codebooks, data, sq_loss, steps=1, lr=lr, optimizer="sgd")
    assert len(losses) == 1
    for name, q in codebooks.items():
        grad = dict(ref.named_parameters())[name].grad.reshape(-1)
        summed = torch.zeros(4).index_add_(0, q.indices, grad)
        assert torch.allclose(tuned[name].codebook, q.codebook - lr * summed, atol=1e-7)
        assert torch.equal(tuned[name].indices, q.indices)
        # the model holds the fine-tuned quantised weights
        assert torch.equal(dict(model.named_parameters())[name].detach(), tuned[name].dequantize())
    assert torch.equal(model.conv.bias, ref.conv.bias) and torch.equal(model.bn.running_mean, ref.bn.running_mean)


def test_finetune_lowers_the_loss():
    model = TinyNet()
    codebooks = Q.quantize_model(model, 2, "uniform", progress=False)
    data = batches(n=2, size=16)
    _, losses = Q.finetune_centroids(model, codebooks, data, sq_loss, steps=40, lr=0.01)
    assert len(losses) == 40
    assert np.mean(losses[-4:]) < 0.9 * np.mean(losses[:2])
    with pytest.raises(DcmlError):
        Q.finetune_centroids(model, codebooks, data, sq_loss, steps=1, lr=0.0)


# -- channel equalisation, bias correction, distillation ------------------------------

def uneven_tiny_net() -> TinyNet:
    """TinyNet whose conv channels differ in scale by up to 10^2.5, like depthwise convs."""
    model = TinyNet()
    with torch.no_grad():
        scale = 10.0 ** (-torch.arange(6.0) / 2)
        model.conv.weight.mul_(scale.view(-1, 1, 1, 1))
        model.conv.bias.mul_(scale)
        model.bn.running_mean.mul_(scale)
        model.bn.running_var.mul_(scale ** 2)
    return model.eval()


def test_conv_bn_pairs_follow_the_data_flow():
    assert Q.conv_bn_pairs(TinyNet(), batches(n=1)[0][0]) == [("conv", "bn")]

    class NoBN(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2)

        def forward(self, x):  # the BatchNorm sees a ReLU's output, not the conv's
            return self.bn(torch.relu(self.conv(x)))

    assert Q.conv_bn_pairs(NoBN(), batches(n=1)[0][0]) == []


def test_equalisation_keeps_the_function_and_equalises_channel_ranges():
    model = uneven_tiny_net()
    x = batches(n=1)[0][0]
    before = model(x).detach()
    assert Q.equalize_channels(model, x) == ["conv"]
    assert torch.allclose(model(x), before, atol=1e-5)
    peaks = model.conv.weight.detach().abs().amax(dim=(1, 2, 3))
    assert torch.allclose(peaks, peaks.mean().expand(6), rtol=1e-5)
    # one shared 3-bit codebook now serves every channel: the output error drops
    raw = uneven_tiny_net()
    errors = []
    for net in (raw, model):
        quantized = Q.quantize_model(net, 3, "kmeans", progress=False)
        Q.apply_quantized(net, quantized)
        errors.append(float((net(x).detach() - before).pow(2).mean()))
    assert errors[1] < 0.1 * errors[0]


def test_equalisation_refuses_a_conv_output_used_twice():
    class Shared(TinyNet):
        def forward(self, x):
            z = self.conv(x)  # also read past its BatchNorm: rescaling it would change the output
            return self.head((torch.relu(self.bn(z)) + z).mean(dim=(2, 3)))

    model = Shared()
    with torch.no_grad():
        model.conv.weight[0].mul_(100)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(DcmlError, match="--no-equalize"):
        Q.equalize_channels(model, batches(n=1)[0][0])
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_bias_correction_restores_the_float_channel_means():
    reference = uneven_tiny_net()
    model = uneven_tiny_net()
    Q.apply_quantized(model, Q.quantize_model(model, 2, "kmeans", progress=False))
    x = torch.cat([images for images, _, _ in batches(n=4)])

    def bn_output_means(net):
        out = {}
        handle = net.bn.register_forward_hook(lambda m, i, o: out.__setitem__("mean", o.mean(dim=(0, 2, 3))))
        with torch.no_grad():
            net(x)
        handle.remove()
        return out["mean"]

    target = bn_output_means(reference)
    shifted = (bn_output_means(model) - target).abs().max()
    assert Q.correct_bias(model, reference, x) == 1
    assert shifted > 1e-3 and torch.allclose(bn_output_means(model), target, atol=1e-5)
    assert model.bn.running_var.equal(uneven_tiny_net().bn.running_var)  # only the means move


def test_distillation_finetune_trains_centroids_and_float_parameters():
    teacher = TinyNet()
    model = TinyNet()
    codebooks = Q.quantize_model(model, 2, "uniform", progress=False)
    data = batches(n=2, size=16)
    gamma = model.bn.weight.detach().clone()
    tuned, losses = Q.finetune_centroids(model, codebooks, data, None, steps=40, lr=0.01, teacher=teacher,
                                         train_float=True)
    assert np.mean(losses[-4:]) < 0.5 * np.mean(losses[:2])
    assert not torch.equal(model.bn.weight.detach(), gamma)
    assert all(p.grad is None for p in model.parameters())
    # the first loss is the distance to the teacher's embedding of the same batch
    start = TinyNet()
    Q.apply_quantized(start, codebooks)
    start.eval()
    first = Q.distillation_loss(start(data[0][0]), teacher(data[0][0])).item()
    assert losses[0] == pytest.approx(first, rel=1e-5)
    with pytest.raises(DcmlError, match="needs a loss"):
        Q.finetune_centroids(model, codebooks, data, None, steps=1, lr=0.01)
