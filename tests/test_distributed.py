"""Data-parallel training: N processes (gloo on CPU here) compute what one process computes.

The equivalence tests train once in one process and once in two (torchrun,
`--nproc 2`) on the same global batches and compare the weights.

Tolerance (ATOL = 1e-4 on every weight, after 15-18 Adam steps): two processes
compute the same sums in another order -- each embeds half of the batch
(convolution and matrix kernels block a batch of 8 differently from one of 16)
and the whole batch's gradient is the sum of the halves' gradients instead of
one backward pass over all rows. Those are float32 rounding differences,
about 1e-7 relative per step; Adam divides each gradient by its running RMS,
so a relative error of the gradient becomes an error of the step of the same
relative size (times lr = 1e-3), and they add up over the steps. Measured:
at most 1e-5 (shared mode, three re-clusterings) and 1e-6 (fine-tuning);
1e-4 is ten times that and still a thousand times below what the weights move
in training (the check below asserts they moved by more than 1e-2). Those
tests run with dropout 0; at the default dropout (0.01) and with trainable
BatchNorm, whose tiny trainings are chaotic at the float level, the comparison
is against a floor measured in the test itself
(test_two_processes_train_like_one_at_the_default_dropout).
A resumed two-process run is compared bitwise with an uninterrupted one (same
process count: the same operations in the same order).
"""

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from dcml import launch
from dcml.algorithm import distributed
from dcml.algorithm.samplers import ClusterBatchSampler
from dcml.algorithm.training import SeededItems, ShareSampler, item_seed
from dcml.contracts import checkpoint
from dcml.contracts import manifest as manifest_mod
from dcml.contracts.errors import DcmlError

_spec = importlib.util.spec_from_file_location(
    "fmnist_data", Path(__file__).resolve().parents[1] / "components" / "train" / "tests" / "fmnist_data.py")
fmnist_data = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fmnist_data)

ATOL = 1e-4  # see the module docstring
STAGE_ATOL = 1e-2  # see test_two_processes_train_shared_mode_with_reclustering_like_one
MODEL = dict(backbone="small_cnn", weights="none", image_size=28, embedding_dim=16, freeze_bn="true", dropout=0.0)
TRAIN = dict(classes_per_batch=4, images_per_class=4, lr_backbone=1e-3, lr_embedding=1e-3, eval_every=0, seed=3,
             threads=1)


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    torch.set_num_threads(1)
    return fmnist_data.make_manifest(tmp_path_factory.mktemp("fm") / "manifest.parquet", per_class=16,
                                     train_classes=(0, 1, 2, 3, 4, 5), test_per_class=8)


def weights(path) -> dict:
    ckpt = torch.load(path, weights_only=True)
    return ckpt["model"] if "model" in ckpt else ckpt


def largest_gap(a: dict, b: dict) -> float:
    """The largest difference of two state_dicts' floating-point entries (the others must be equal)."""
    assert a.keys() == b.keys()
    worst = 0.0
    for key in a:
        if a[key].is_floating_point():
            worst = max(worst, float((a[key] - b[key]).abs().max()))
        else:
            assert torch.equal(a[key], b[key]), key
    return worst


def assert_same_weights(a: dict, b: dict, atol: float = ATOL) -> float:
    worst = largest_gap(a, b)
    assert worst <= atol, f"largest weight difference {worst:.2e} > {atol:.0e}"
    return worst


def moved(start: dict, end: dict) -> float:
    return max(float((end[k] - start[k]).abs().max()) for k in end if end[k].is_floating_point())


# -- one process: the pieces ------------------------------------------------------

def test_share_bounds_cut_a_batch_into_contiguous_shares():
    assert distributed.share_bounds(10, 3) == [(0, 4), (4, 7), (7, 10)]
    assert distributed.share_bounds(16, 2) == [(0, 8), (8, 16)]
    assert distributed.share_bounds(5, 1) == [(0, 5)]


def test_the_shares_of_n_processes_add_up_to_the_batches_of_one():
    labels = np.repeat(np.arange(6), 9)
    clusters = np.where(labels < 3, 0, 1)

    def sampler():
        return ClusterBatchSampler(labels, clusters, classes_per_batch=3, images_per_class=3, seed=5, epoch=2)

    whole = list(ShareSampler(sampler(), 0, 1, seeds=(5, 2)))
    assert [[i for i, _ in b] for b in whole] == sampler().epoch_batches()
    for world in (2, 3, 4):
        shares = [list(ShareSampler(sampler(), r, world, seeds=(5, 2))) for r in range(world)]
        joined = [sum((shares[r][b] for r in range(world)), []) for b in range(len(whole))]
        assert joined == whole, world  # the same images with the same augmentation seeds, in order
    assert item_seed(5, 2, 0, 0) != item_seed(5, 2, 0, 1) != item_seed(5, 3, 0, 1)


def test_an_images_augmentation_depends_on_its_place_not_on_the_process(manifest):
    from dcml.algorithm.data import ManifestImageDataset, build_transform

    man = manifest_mod.read(manifest)
    rows = man.split("train")
    items = SeededItems(ManifestImageDataset(man, rows, build_transform({"backbone": "small_cnn"}, train=True)))
    before = torch.get_rng_state()
    a, b = items[(3, 1234)], items[(3, 1234)]
    assert torch.equal(a[0], b[0]) and a[1:] == b[1:] == (int(rows["label"].iloc[3]), 3)
    assert torch.equal(torch.get_rng_state(), before)  # the process's own stream is left as it was
    others = [items[(3, s)][0] for s in range(1, 9)]
    assert any(not torch.equal(a[0], o) for o in others)  # other places, other crops / flips


def test_the_dropout_masks_of_the_shares_add_up_to_the_masks_of_the_whole_batch():
    """In a step, every draw is of the whole global batch (one generator per batch) and a process keeps its
    share's rows: three processes' dropout and stochastic-depth masks, put together, are one process's."""
    from dcml.algorithm import noise

    x, y = torch.ones(10, 64), torch.ones(10, 4, 3, 3)

    def masks(share):
        start, stop = share
        with noise.global_batch(1234, 10, share):
            return noise.dropout(x[start:stop], 0.5, True), noise.drop_connect(y[start:stop], 0.5, True)

    whole = masks((0, 10))
    shares = [masks(share) for share in distributed.share_bounds(10, 3)]
    assert torch.equal(torch.cat([d for d, _ in shares]), whole[0])
    assert torch.equal(torch.cat([c for _, c in shares]), whole[1])
    assert 0.3 < float((whole[0] == 0).float().mean()) < 0.7 and set(whole[0].unique().tolist()) == {0.0, 2.0}
    assert torch.equal(masks((0, 10))[0], whole[0])  # a pure function of the batch's seed
    with noise.global_batch(1235, 10, (0, 10)):
        assert not torch.equal(noise.dropout(x, 0.5, True), whole[0])  # another batch, other masks
    assert torch.equal(noise.dropout(x, 0.5, False), x)  # eval: the identity
    with pytest.raises(RuntimeError, match="share has 4"), noise.global_batch(1, 10, (6, 10)):
        noise.dropout(x, 0.5, True)  # a tensor that is not this process's share


def test_efficientnet_blocks_draw_their_stochastic_depth_like_the_package_outside_a_step():
    """dcml runs efficientnet-lite-pytorch's MBConv blocks itself so that their drop-connect can be drawn per
    sample of the global batch; outside a training step it draws from torch's stream exactly as the package
    does: the same outputs, bit for bit, in training mode (drop-connect on) and in eval mode."""
    from dcml.algorithm.models import build_model

    backbone = build_model({"backbone": "efficientnet_lite0", "weights": "none", "image_size": 32}).backbone
    x = torch.randn(4, 3, 32, 32)
    block_in = backbone.run_units(x, 0, 8)  # the input of block 7 (a block with a skip connection)
    rate = backbone.net._global_params.drop_connect_rate * 7 / backbone.num_blocks
    for training in (True, False):
        backbone.train(training)
        torch.manual_seed(5)
        ours = backbone._block(7, block_in)
        torch.manual_seed(5)
        theirs = backbone.net._blocks[7](block_in, drop_connect_rate=rate)
        assert torch.equal(ours, theirs), training


def test_an_efficientnets_training_forward_on_shares_is_its_forward_on_the_whole_batch():
    """Dropout (0.3 here) and drop-connect in a whole EfficientNet-Lite0 in training mode (BatchNorm frozen,
    so rows do not mix): the shares' embeddings, put together, are the whole batch's (float32 kernels on
    3 rows vs 6; measured 1.3e-7), and another batch seed draws other masks (embeddings 0.2 apart; 0.03
    from drop-connect alone). The head's bias is zeroed: an untrained backbone with frozen statistics
    gives features of ~1e-9, which the bias would drown."""
    from dcml.algorithm import noise
    from dcml.algorithm.models import build_model

    torch.manual_seed(0)
    model = build_model({"backbone": "efficientnet_lite0", "weights": "none", "image_size": 32, "freeze_bn": True,
                         "dropout": 0.3}).train()
    torch.nn.init.zeros_(model.head.bias)
    x = torch.randn(6, 3, 32, 32)

    def embed(seed, share):
        with torch.no_grad(), noise.global_batch(seed, 6, share):
            return model(x[share[0]:share[1]])

    whole = embed(7, (0, 6))
    assert torch.allclose(torch.cat([embed(7, (0, 3)), embed(7, (3, 6))]), whole, atol=1e-5)
    assert not torch.allclose(embed(8, (0, 6)), whole, atol=0.1)
    model.dropout.p = 0.0
    assert not torch.allclose(embed(8, (0, 6)), embed(7, (0, 6)), atol=1e-2)  # drop-connect's own masks


def test_one_process_helpers_are_the_identity():
    x = torch.randn(5, 3, requires_grad=True)
    assert distributed.gather_batch(x, [5]) is x
    assert distributed.broadcast_object({"a": 1}) == {"a": 1}
    assert distributed.all_gather_object(7) == [7]
    p = torch.nn.Parameter(torch.ones(2))
    p.grad = torch.full((2,), 3.0)
    distributed.all_reduce_gradients([p])
    assert torch.equal(p.grad, torch.full((2,), 3.0))
    assert distributed.world_size() == 1 and distributed.rank() == 0 and distributed.is_main()
    assert not launch.needed(1) and launch.needed(2)


def test_nproc_must_be_positive(manifest, tmp_path):
    from components.train import stage

    with pytest.raises(DcmlError, match="nproc=0"):
        stage.run(manifest=manifest, out=tmp_path / "m.pt", nproc=0, **MODEL, **TRAIN)


# -- two processes ----------------------------------------------------------------

@pytest.mark.slow
def test_two_processes_train_shared_mode_with_reclustering_like_one(manifest, tmp_path):
    """The train stage (``nproc=2``) in shared mode, K=2, re-clustering after every epoch, trainable BatchNorm
    (the demo's freeze_bn=false: statistics of the whole global batch on every process,
    dcml.algorithm.batchnorm), ProxyAnchor, dropout at its default: the same clusters, batches and
    non-zero loss terms as one process, the losses within 1e-4 relative and the weights and BatchNorm
    buffers within STAGE_ATOL.

    This tiny set-up is chaotic at the float level, which is why the test once failed on one install
    (weights 3.5e-3 apart with dropout 0) and passed on another (2e-5..8e-5): during its second epoch a
    discrete switch flips on a rounding difference (at that step the two runs' losses agree to 5e-7
    while the second conv layer's Adam moment jumps by 4e-3), and Adam turns that into steps of the
    learning rate. One process shows the same: its initial weights moved by one float32 ulp end 2.2e-4
    apart after two epochs, 4.2e-4 after three. So the comparison against that floor is made in
    test_two_processes_train_like_one_at_the_default_dropout; this test checks the stage's plumbing, with
    STAGE_ATOL = 1e-2: 7x the 1.5e-3 measured here, and far below the 4.8e-1 that per-process dropout
    masks gave on this set-up (two epochs, Trainer level)."""
    from components.train import stage

    common = dict(manifest=str(manifest), num_slices=2, recluster_every=1, epochs=2, miner="none", resume=False,
                  loss="proxy_anchor", **{**MODEL, "freeze_bn": "false", "dropout": None}, **TRAIN)
    one = stage.run(out=str(tmp_path / "one.pt"), nproc=1, **common)
    two = stage.run(out=str(tmp_path / "two.pt"), nproc=2, **common)
    assert one["extra"]["processes"] == 1 and two["extra"]["processes"] == 2
    a, b = checkpoint.load(tmp_path / "one.pt"), checkpoint.load(tmp_path / "two.pt")
    assert a["model_config"]["dropout"] == 0.01  # the default
    # The same clusters after every re-clustering (rank 0 computed them once and broadcast them).
    assert [h["cluster_sizes"] for h in one["history"]] == [h["cluster_sizes"] for h in two["history"]]
    assert torch.equal(a["cluster_state"]["assignments"], b["cluster_state"]["assignments"])
    assert sum("clustering_s" in h for h in one["history"]) >= 1  # re-clustered after epoch 1
    # The same global batches: images and batches per epoch, and the loss of each epoch.
    for h1, h2 in zip(one["history"], two["history"]):
        assert (h1["images"], h1["batches"], h1["nonzero_terms"]) == (h2["images"], h2["batches"], h2["nonzero_terms"])
        assert h2["loss"] == pytest.approx(h1["loss"], rel=1e-4)
    assert_same_weights(a["model"], b["model"], STAGE_ATOL)  # weights and BatchNorm buffers
    torch.manual_seed(3)
    from dcml.algorithm.models import build_model

    start = build_model({**{k: v for k, v in MODEL.items() if k != "freeze_bn"}, "freeze_bn": False, "num_slices": 2})
    assert moved(start.state_dict(), a["model"]) > 1e-2  # it trained
    stats = [k for k in a["model"] if k.endswith(("running_mean", "running_var"))]
    assert stats and moved({k: start.state_dict()[k] for k in stats}, {k: a["model"][k] for k in stats}) > 1e-2
    assert not list(tmp_path.glob("*.resume.pt")), "the resume file is removed after a finished run"


# Every case at the default dropout (0.01): (small CNN overrides, TrainSettings overrides of distributed_cases.settings).
DROPOUT_CASES = {
    "k1-frozen-bn-margin": ({"freeze_bn": True}, {"loss": "margin", "recluster_every": 0}),
    "k1-trainable-bn-margin": ({"freeze_bn": False}, {"loss": "margin", "recluster_every": 0, "epochs": 1}),
    "shared-reclustering-frozen-bn-margin": ({"freeze_bn": True, "num_slices": 2}, {"loss": "margin"}),
    "shared-reclustering-trainable-bn-proxy-anchor": ({"freeze_bn": False, "num_slices": 2},
                                                      {"loss": "proxy_anchor", "epochs": 2}),
}
FLOOR_MULTIPLE = 30  # see the test's docstring


@pytest.mark.slow
@pytest.mark.parametrize("case", [pytest.param(c, marks=pytest.mark.full) if c == "shared-reclustering-frozen-bn-margin"
                                  else c for c in DROPOUT_CASES])  # that one: ~30 s, make test-all only
def test_two_processes_train_like_one_at_the_default_dropout(case, manifest, tmp_path):
    """Dropout (0.01, the default) masks are drawn for the whole global batch from a seed of (seed, epoch,
    batch) and each process keeps its share's rows (dcml.algorithm.noise), so two processes end within
    FLOOR_MULTIPLE x the float-order floor of one process. The floor is measured here, on the machine that
    runs the test: the larger of (one process, 1 vs 2 threads) and (one process vs one whose initial
    weights are moved by one float32 ulp, a perturbation of the size rounding makes). Measured on the
    development machine, where 1 vs 2 threads gave exactly 0 (the small CNN's kernels do not split across
    threads), so the ulp nudge set the floor (largest weight or BatchNorm buffer difference):

        case (epochs)                                  floor    2 vs 1 process   per-process masks (before)
        k1-frozen-bn-margin (3)                        4.9e-5   6.7e-5           2.4e-2
        k1-trainable-bn-margin (1)                     9.0e-7   3.2e-6           7.6e-2
        shared-reclustering-frozen-bn-margin (3)       2.7e-5   9.3e-7           2.3e-2, other clusters
        shared-reclustering-trainable-bn-proxy (2)     2.2e-4   1.5e-3           4.8e-1

    30 x the floor is 4x the largest ratio measured (7, the last case) and stays below every gap that
    per-process masks gave. Trainable BatchNorm runs are short on purpose: these tiny trainings are chaotic
    at the float level from their second epoch on (test_two_processes_train_shared_mode_with_reclustering_like_one)."""
    from tests import distributed_cases as cases

    model, overrides = DROPOUT_CASES[case]
    args = dict(manifest=str(manifest), model=model, settings_overrides=overrides)
    try:
        one = cases.train(out=str(tmp_path / "one.pt"), **args)
        cases.train(out=str(tmp_path / "threads.pt"), threads=2, **args)
        cases.train(out=str(tmp_path / "nudged.pt"), nudge=True, **args)
    finally:
        torch.set_num_threads(1)
    two = launch.run_processes("tests.distributed_cases:train", {**args, "out": str(tmp_path / "two.pt")}, 2)
    assert (one["world_size"], two["world_size"]) == (1, 2)
    assert two["terms"] == one["terms"] and two["cluster_sizes"] == one["cluster_sizes"]
    a = torch.load(tmp_path / "one.pt")
    floor = max(largest_gap(a, torch.load(tmp_path / "threads.pt")), largest_gap(a, torch.load(tmp_path / "nudged.pt")))
    gap = largest_gap(a, torch.load(tmp_path / "two.pt"))
    assert 0 < floor and gap <= FLOOR_MULTIPLE * floor, f"{case}: 2 vs 1 processes {gap:.2e}, floor {floor:.2e}"
    assert moved(cases.initial_model(model).state_dict(), a) > 1e-2  # it trained


@pytest.mark.slow
def test_batchnorm_over_processes_is_batchnorm_over_the_whole_batch(n=11, world=2):
    """Conv + BatchNorm2d + Linear + BatchNorm1d, three batches of 11 (shares of 6 and 5): two processes on their shares
    (dcml.algorithm.batchnorm on gloo) give the outputs, input gradients, summed parameter
    gradients and running statistics of torch's BatchNorm on the whole batch in one process.
    Float32 rounding only (differences ~1e-7 of values of order 1 to 100)."""
    result = launch.run_processes("tests.distributed_cases:batchnorm_shares", {"n": n}, world)
    assert result["world_size"] == world and "GlobalBatchNorm" in result["kinds"] and "BatchNorm2d" not in result["kinds"]
    assert result["batches_tracked"] == 3
    assert result["output"] <= 1e-5 and result["input_grad"] <= 1e-5 and result["running"] <= 1e-5, result
    assert result["param_grad"] <= 1e-5 * result["param_grad_scale"], result


@pytest.mark.slow
@pytest.mark.parametrize("n", [11, 1])
def test_a_dfml_router_initialises_from_the_whole_batch_on_every_process(n, world=2):
    """DFML's router data initialisation (mean direction removed, unit spread per sub-block) on two
    processes' shares gives the weights one process computes from the whole batch, the same on both
    processes (each initialising from its own share started them apart, and all-reduced gradients
    never brought them together). A batch of one leaves one process an empty share: no deadlock,
    nothing initialised anywhere (fewer than 2 rows), as in one process."""
    result = launch.run_processes("tests.distributed_cases:router_data_init_shares", {"n": n}, world)
    assert result["world_size"] == world and result["between"] == 0.0
    if n == 1:
        assert result["pending"] and result["moved"] == 0.0 and result["vs_one"] == 0.0
    else:
        assert not result["pending"] and result["moved"] > 0.1 and result["vs_one"] <= 1e-5, result


@pytest.mark.slow
def test_two_processes_fine_tune_like_one_in_fast_mode(manifest, tmp_path):
    """Fine-tuning on cached activations with a proxy loss: the proxies' gradients are
    computed in full by every process and averaged, the model's are summed."""
    from components.finetune import stage as finetune
    from components.train import stage as train
    from dcml.algorithm import activations
    from dcml.algorithm.models import build_model

    model_cfg = {**MODEL, "train_blocks": 1}
    man = manifest_mod.read(manifest)
    torch.manual_seed(0)
    cache_model = build_model({"backbone": "small_cnn", "weights": "none", "image_size": 28, "train_blocks": 1})
    activations.build(tmp_path / "cache", cache_model, man, views=2, seed=3)
    train.run(manifest=str(manifest), out=str(tmp_path / "start.pt"), epochs=1, miner="none", resume=False,
              activations=str(tmp_path / "cache"), **model_cfg, **TRAIN)

    common = dict(manifest=str(manifest), checkpoints=[str(tmp_path / "start.pt")], activations=str(tmp_path / "cache"),
                  epochs=2, loss="proxy_anchor", resume=False, **TRAIN)
    one = finetune.run(out=str(tmp_path / "one.pt"), nproc=1, **common)
    two = finetune.run(out=str(tmp_path / "two.pt"), nproc=2, **common)
    assert one["extra"]["processes"] == 1 and two["extra"]["processes"] == 2
    for h1, h2 in zip(one["history"], two["history"]):
        assert h1["images"] == h2["images"] and h2["loss"] == pytest.approx(h1["loss"], abs=1e-5)
    a, b = weights(tmp_path / "one.pt"), weights(tmp_path / "two.pt")
    assert_same_weights(a, b)
    assert moved(weights(tmp_path / "start.pt"), a) > 1e-2


@pytest.mark.slow
def test_a_killed_two_process_run_resumes_to_the_same_weights(manifest, tmp_path):
    """Dropout on (its masks come from a seed of (seed, epoch, batch), dcml.algorithm.noise); every process's
    RNG state is saved and restored all the same."""
    target = "tests.distributed_cases:fit"
    args = dict(manifest=str(manifest), dropout=0.1)
    straight = launch.run_processes(target, {**args, "resume_path": str(tmp_path / "a.resume.pt"),
                                             "out": str(tmp_path / "a.pt")}, 2)
    assert straight["world_size"] == 2 and straight["epoch"] == 3

    run = {**args, "resume_path": str(tmp_path / "b.resume.pt"), "out": str(tmp_path / "b.pt")}
    with pytest.raises(DcmlError, match="stopped after epoch 1"):
        launch.run_processes(target, {**run, "crash_after": 1}, 2)
    saved = torch.load(tmp_path / "b.resume.pt", weights_only=True)
    assert saved["epoch"] == 1 and len(saved["rng_by_rank"]) == 2

    resumed = launch.run_processes(target, run, 2)
    assert resumed["resumed_from"] == 1 and resumed["epoch"] == 3
    assert resumed["clusters"] == straight["clusters"]
    a, b = torch.load(tmp_path / "a.pt"), torch.load(tmp_path / "b.pt")
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.slow
def test_an_error_in_the_processes_is_one_line(manifest, tmp_path):
    from components.train import stage

    with pytest.raises(DcmlError, match="cluster_id is for mode=worker"):
        stage.run(manifest=str(manifest), out=str(tmp_path / "m.pt"), cluster_id=1, nproc=2, **MODEL, **TRAIN)
    assert not (tmp_path / "m.pt").exists()


@pytest.mark.slow
@pytest.mark.parametrize("loss,miner", [("multi_similarity", "multi_similarity"), ("triplet", "triplet"),
                                        ("margin", "multi_similarity")])
def test_the_gathered_loss_and_miner_are_pml_distributed_wrappers(loss, miner):
    """Every process's loss and miner see the embeddings of all processes, as
    pytorch-metric-learning's DistributedLossWrapper / DistributedMinerWrapper give
    them: the same loss and, for each process's share, the same gradient (theirs
    divided by the N they multiply by for DDP's averaging) -- and those of one process
    on the whole batch. Float32 on one small batch: differences are summation order
    only (~1e-7); 1e-5 leaves room for other CPUs' kernels."""
    result = launch.run_processes("tests.distributed_cases:pml_wrappers", {"loss": loss, "miner": miner}, 2)
    assert result["world_size"] == 2
    assert result["loss"] > 0 and result["grad_scale"] > 1e-3  # something to compare
    for key in ("ours_vs_one_loss", "ours_vs_pml_loss", "ours_vs_one_grad", "ours_vs_pml_grad"):
        assert result[key] <= 1e-5, (key, result)


@pytest.mark.slow
def test_two_processes_train_a_parallel_worker_like_one(manifest, tmp_path):
    """The parallel mode's worker (its cluster's rows, its own slice) with the cars196
    preset's loss and miner: margin loss (a learnable beta, averaged over the processes)
    and the reference miner, whose random draws come from a seed of (seed, epoch, batch)."""
    import pyarrow as pa

    from components.train import stage
    from dcml.contracts.io import write_parquet

    ids = manifest_mod.read(manifest).split("train")["image_id"].tolist()
    clusters = tmp_path / "clusters.parquet"
    write_parquet(clusters, pa.table({"image_id": pa.array(ids), "cluster": pa.array(np.arange(len(ids)) % 2,
                                                                                     pa.int64())}), {"k": 2})
    common = dict(manifest=str(manifest), clusters=str(clusters), mode="worker", cluster_id=1, epochs=3,
                  loss="margin", miner="reference", resume=False, **MODEL, **TRAIN)
    one = stage.run(out=str(tmp_path / "one.pt"), nproc=1, **common)
    two = stage.run(out=str(tmp_path / "two.pt"), nproc=2, **common)
    assert one["name"] == two["name"] == "train-worker-1" and two["extra"]["processes"] == 2
    for h1, h2 in zip(one["history"], two["history"]):
        assert (h1["images"], h1["batches"]) == (h2["images"], h2["batches"])
        assert h2["loss"] == pytest.approx(h1["loss"], rel=1e-5, abs=1e-5)  # float32 sums in another order
        assert (h1["mined_pos_pairs"], h1["mined_neg_pairs"]) == (h2["mined_pos_pairs"], h2["mined_neg_pairs"])
    a, b = checkpoint.load(tmp_path / "one.pt"), checkpoint.load(tmp_path / "two.pt")
    assert a["worker"] == b["worker"] == {"cluster_id": 1, "k": 2, "freeze_backbone": False}
    assert_same_weights(a["model"], b["model"])
