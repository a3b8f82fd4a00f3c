"""Where training batches come from: the epoch's one-cluster sampler and this process's share of each
batch, as augmented images (seeded per item) or as cached activations of the frozen lower part."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader

from dcml.algorithm import distributed
from dcml.algorithm.training.rng import item_seed, seed_worker
from dcml.contracts.errors import DcmlError


def dense_labels(labels: Sequence[int]) -> np.ndarray:
    """Labels renumbered 0..C-1 (proxy losses index their proxies by label)."""
    return np.unique(np.asarray(labels), return_inverse=True)[1].reshape(-1).astype(np.int64)


class ShareSampler:
    """The batch sampler a process iterates: its share of every batch of ``sampler``.

    ``sampler`` yields the global batches (:class:`dcml.algorithm.samplers.ClusterBatchSampler`);
    rank r of N takes the r-th contiguous share of each (the whole batch when
    N = 1). With ``seeds=(seed, epoch)`` each item becomes ``(index, item_seed)``
    with a seed fixed by its place in the epoch (:class:`SeededItems` draws the
    image's augmentation from it), so a batch's images are the same whatever N.
    """

    def __init__(self, sampler, rank: int = 0, world_size: int = 1, seeds: tuple[int, int] | None = None):
        self.sampler, self.rank, self.world_size, self.seeds = sampler, int(rank), int(world_size), seeds

    def __iter__(self):
        for b, batch in enumerate(self.sampler, self.sampler.position):
            if len(batch) < self.world_size:
                raise DcmlError(f"a batch of {len(batch)} images cannot be split over {self.world_size} processes; "
                                "raise classes_per_batch x images_per_class or use fewer processes")
            start, stop = distributed.share_bounds(len(batch), self.world_size)[self.rank]
            if self.seeds is None:
                yield batch[start:stop]
            else:
                yield [(i, item_seed(*self.seeds, b, start + j)) for j, i in enumerate(batch[start:stop])]

    def __len__(self) -> int:
        return len(self.sampler)


class SeededItems(torch.utils.data.Dataset):
    """Items ``dataset[index]`` for keys ``(index, item_seed)``: the item's random transform is drawn
    from torch's CPU generator seeded with ``item_seed`` (the generator's state is put back after)."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        index, seed = key
        generator = torch.default_generator
        state = generator.get_state()
        generator.manual_seed(seed)
        try:
            return self.dataset[index]
        finally:
            generator.set_state(state)


class Silent:
    """A loader without a progress bar (processes other than rank 0)."""

    def __init__(self, iterable):
        self.iterable = iterable

    def __iter__(self):
        return iter(self.iterable)

    def set_postfix(self, **_):
        pass

    def close(self):
        pass


class BatchSource:
    """The epoch's batches for this process: a :class:`ClusterBatchSampler` over the training rows
    and a loader of this process's share of each batch (images, or the fast mode's cached views)."""

    def __init__(self, model, manifest, train_rows: pd.DataFrame, labels: np.ndarray, settings, device,
                 activations=None, rank: int = 0, world_size: int = 1):
        self.model, self.manifest, self.train_rows, self.labels = model, manifest, train_rows, labels
        self.settings, self.device, self.activations = settings, device, activations
        self.rank, self.world_size = rank, world_size
        if activations is not None:
            activations.check_model(model)
            self.cache_rows = activations.locate(train_rows["image_id"], "train")

    def sampler(self, epoch: int, clusters):
        """The epoch's global batches: one cluster each (``clusters`` None: all rows, one cluster)."""
        from dcml.algorithm.samplers import ClusterBatchSampler

        s = self.settings
        return ClusterBatchSampler(self.labels, clusters, classes_per_batch=s.classes_per_batch,
                                   images_per_class=s.images_per_class, seed=s.seed, epoch=epoch,
                                   length=s.batches_per_epoch or None)

    def loader(self, sampler, epoch: int):
        """This process's share of every batch of ``sampler`` (the whole batch in one process)."""
        s = self.settings
        if self.activations is not None:  # the view of a row is a pure function of (seed, epoch, row)
            from dcml.algorithm.activations import TrainViews, batch_loader

            return batch_loader(TrainViews(self.activations, self.cache_rows, self.labels, s.seed, epoch),
                                ShareSampler(sampler, self.rank, self.world_size))
        from dcml.algorithm.data import ManifestImageDataset, build_transform

        rows = self.train_rows.assign(label=self.labels)
        dataset = ManifestImageDataset(self.manifest, rows, build_transform(self.model.config, train=True))
        generator = torch.Generator().manual_seed(s.seed * 1_000_003 + epoch)
        return DataLoader(SeededItems(dataset), batch_sampler=ShareSampler(sampler, self.rank, self.world_size,
                                                                           seeds=(s.seed, epoch)),
                          num_workers=s.num_workers, pin_memory=self.device.type == "cuda", generator=generator,
                          worker_init_fn=seed_worker if s.num_workers else None)
