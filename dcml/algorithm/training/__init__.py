"""The training loop: K learners over one backbone, re-clustering, fine-tuning.

One :class:`Trainer` serves every training mode:

* **shared** (the paper): the model has K slices; each batch comes from one
  cluster k (:class:`dcml.algorithm.samplers.ClusterBatchSampler`) and learner k's loss
  sees only slice k of the embedding (``model(x, learner=k)``), so the backbone
  is shared by all learners. Every ``recluster_every`` epochs the training
  images are re-clustered (faiss k-means on the L2-normalised backbone
  features, or on the embedding), the new clusters are matched to the old
  learners (Hungarian), and classes with a single image in a cluster are left
  out of it. From ``whole_embedding_after`` (a share of the epochs before
  fine-tuning; the reference code's 8/19) on, the loss sees the whole
  embedding (normalised as one vector) instead of slice k, while batches
  still come from one cluster each and re-clustering goes on: the reference
  code's schedule. From ``finetune_epoch`` on, K is set to 1 and the whole
  embedding trains on all data. Controls: ``num_groups`` > the model's
  slices (a one-slice model on one-cluster batches: hard negatives without
  slices) and ``grouping="random"`` (K random groups of whole classes
  instead of k-means clusters).
* **worker** (``only_learner=k``): only cluster k's rows and only slice k are
  trained; the head rows of the other slices are kept exactly as they were,
  and with ``freeze_backbone`` the backbone (BatchNorm statistics included)
  does not change either.
* **fine-tune**: a K=1 model on all data (``clusters=None``).

After every epoch the trainer writes a resume checkpoint (atomically): model,
optimiser, loss parameters, cluster state, sampler position, history and the
torch / numpy / python RNG states, all as tensors and primitives so
``torch.load(weights_only=True)`` reads it. A run killed at any moment restarts
from the last finished epoch and, on the same device and thread count, ends
with exactly the weights an uninterrupted run of the same seed ends with: the
batches of an epoch are a pure function of (seed, epoch), data-loader workers
are seeded from a per-epoch generator, and the RNG states are restored.

**Data parallel** (a stage started with ``--nproc N``; :mod:`dcml.algorithm.distributed`):
every process runs this loop on the same batches. Each global batch (the
sampler's, a pure function of seed and epoch whatever N) is cut into N
contiguous shares; process r embeds share r, the shares' embeddings are
gathered so the loss and the miner see the whole batch in its order, and the
gradients are summed over the processes before the (identical) optimiser
step: up to float summation order, N processes compute what one process
computes on the same batches. An image's augmentation is drawn from a seed
fixed by its place in the epoch (seed, epoch, batch, position), not from a
process's RNG stream, a random miner draws from a per-batch seed, and the
dropout and stochastic-depth masks are drawn for the whole global batch from
a seed of (seed, epoch, batch), each process keeping its share's rows
(:mod:`dcml.algorithm.noise`), so all are the same whatever N. Rank 0 alone
re-clusters (then broadcasts the clusters), initialises the head, validates,
evaluates and writes the resume checkpoint (with every process's RNG state); all processes resume from it.
BatchNorm layers that train use the whole global batch's statistics
(:mod:`dcml.algorithm.batchnorm`: SyncBatchNorm on GPUs, an all-reduce of the
shares' sums on CPU). What still differs with N: the order of float sums
(docs/SCALE.md gives the measured gaps).

The pieces (each its own module, one job each)::

    Trainer (trainer.py: the loop: start, epochs, phases, fit)
      ├─ TrainingHooks (hooks.py)      the steps a method overrides: param_groups, train_step,
      │                                forward, epoch_started/finished, evaluate, head init
      ├─ TrainSettings (settings.py)   everything that decides what is computed
      ├─ Grouping (grouping.py)        clusters / random groups, re-clustering, the D&C schedule
      ├─ BatchSource (batches.py)      one-cluster sampler, this process's share, images or cache
      ├─ Scorer (scoring.py)           vectors and R@1 / MAP@R of rows, on a forked RNG
      ├─ EpochSelector (selection.py)  the best validated epoch, patience
      ├─ ResumeStore (resume.py)       fingerprint, state snapshot/restore, the file (resume_lock.py:
      │                                one live holder, no lock file left behind)
      ├─ optimisation.py               losses and miner, learning rate per step
      └─ rng.py                        seeding, RNG states as tensors, per-item and per-batch seeds

Trainer(model, manifest, train_rows, settings, ...) keyword arguments:

    clusters: initial cluster id per train row (-1 = left out), or None.
        With a K>1 model and no clusters, the trainer clusters at epoch 0.
    only_learner: worker mode: train slice k on cluster k's rows only.
    eval_rows: rows for the periodic test R@1 / MAP@R curve ("test" rows,
        or "query" and "gallery" rows). Never used for any choice.
    val_rows: validation rows (classes disjoint from the training ones):
        scored before training and after every epoch; the best epoch
        (the initial model included) is the one ``fit`` leaves in the model.
    activations: a :class:`dcml.algorithm.activations.ActivationCache` of the
        model's frozen lower part: train the top on it (the fast mode).
    fresh_head: the head was just built (not loaded), so ``head_init``
        applies to it.
    resume_path: where the per-epoch resume checkpoint lives; an existing
        one written by the same settings is resumed.
    resume_dir: instead of ``resume_path``, a folder where the resume
        checkpoint is named by the run's fingerprint (its settings, data,
        clusters and initial weights): any later run of the same training,
        in another output folder or another pod, finds and resumes it.
    fingerprint_extra: anything else that makes this run distinct (e.g.
        the lineage of the input files), mixed into the resume check.
"""

from dcml.algorithm.training.batches import SeededItems, ShareSampler, dense_labels
from dcml.algorithm.training.rng import item_seed, rng_state, seed_everything, set_rng_state
from dcml.algorithm.training.settings import TrainSettings
from dcml.algorithm.training.trainer import Trainer, default_device
from dcml.algorithm.training.masks import MaskedTrainer  # noqa: E402 (after the Trainer it extends)
from dcml.algorithm.training.distill import DistillTrainer  # noqa: E402

__all__ = ["DistillTrainer", "MaskedTrainer", "SeededItems", "ShareSampler", "TrainSettings", "Trainer", "default_device", "dense_labels", "item_seed",
           "rng_state", "seed_everything", "set_rng_state"]
