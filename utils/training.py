"""Data loading and seeding shared by the three stages."""
import random

import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler, SequentialSampler

from utils import dist


def seed_epoch(seed: int, epoch: int, rank: int, sampler=None):
    """Reseed every RNG from (seed, epoch, rank) at the start of an epoch.

    Each epoch's augmentations, bag draws, CutMix boxes and shuffling then depend only on these
    three numbers, so a run resumed at an epoch boundary continues exactly as an uninterrupted one
    (the checkpoint needs no RNG state), while ranks still draw differently.
    """
    value = (seed * 1_000_003 + epoch) * 1_009 + rank
    torch.manual_seed(value)
    np.random.seed(value % 2**32)
    random.seed(value)
    if isinstance(sampler, DistributedSampler):
        sampler.set_epoch(epoch)


def make_loader(dataset, batch_size: int, workers: int, train: bool, seed: int = 0):
    """(loader, sampler) over this rank's share of `dataset`.

    train: shuffled, last partial batch dropped (every step has the full batch). Otherwise in
    dataset order; under torchrun each rank reads every world_size-th index and the sampler pads
    the last round with repeats, which evaluation code removes by index (`list(sampler)`).
    """
    if dist.is_dist():
        sampler = DistributedSampler(dataset, shuffle=train, drop_last=train, seed=seed)
    else:
        sampler = RandomSampler(dataset) if train else SequentialSampler(dataset)
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                        pin_memory=torch.cuda.is_available(), drop_last=train,
                        collate_fn=getattr(dataset, 'collate', None))  # datasets may bring their own
    return loader, sampler
