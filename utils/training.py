"""Data loading, seeding and the random state of a training run, shared by the three stages.

A training epoch is a function of (seed, epoch, rank) alone, from any step: `EpochSampler` draws
the epoch's order and one seed per sample from (seed, epoch); `SeededSamples` draws each sample's
augmentations and bag neighbour from that seed (not from the RNG stream of whichever DataLoader
worker loads it); the training step's own draws (CutMix, shuffle BN) use the process's RNGs,
reseeded from (seed, epoch, rank) at the start of each epoch. A run stopped after step s
therefore resumes exactly by skipping the epoch's first s batches and restoring the process's RNG
state at that step (`epoch_batches`); the data do not depend on --workers either.
"""
import random
import signal

import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler, SequentialSampler

from utils import dist


def _epoch_value(seed: int, epoch: int) -> int:
    return seed * 1_000_003 + epoch


def seed_epoch(seed: int, epoch: int, rank: int):
    """Reseed this process's torch (CPU and CUDA), numpy and Python RNGs from (seed, epoch, rank),
    so ranks draw differently and each epoch's draws depend on these three numbers only."""
    value = _epoch_value(seed, epoch) * 1_009 + rank
    torch.manual_seed(value)
    np.random.seed(value % 2**32)
    random.seed(value)


def step_seed(seed: int, epoch: int, step: int, rank: int = -1) -> int:
    """A seed for the draws of one training step (-1: alike on every rank), so that a run resumed
    at that step draws them again without saved generator state."""
    return (_epoch_value(seed, epoch) * 1_000_003 + step) * 1_009 + rank + 1


class EpochSampler(torch.utils.data.Sampler):
    """This rank's share of a fresh random order of the dataset each epoch, as (index, seed) pairs.

    Like DistributedSampler(shuffle=True, drop_last=True) on any world size (one process too): the
    order depends on (seed, epoch) only, the tail that does not split evenly across ranks is
    dropped, rank r takes every world_size-th index from position r. Each index also gets a seed
    for its random draws in this epoch (SeededSamples). `set_epoch(epoch, start)` skips this
    rank's first `start` samples, for a run resumed mid-epoch; len() stays the whole share.
    """

    def __init__(self, size: int, seed: int = 0, rank: int = 0, world_size: int = 1):
        self.size, self.seed, self.rank, self.world_size = size, seed, rank, world_size
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0):
        self.epoch, self.start = epoch, start

    def __len__(self):
        return self.size // self.world_size

    def __iter__(self):
        generator = torch.Generator().manual_seed(_epoch_value(self.seed, self.epoch))
        order = torch.randperm(self.size, generator=generator)
        seeds = torch.randint(2**62, (self.size,), generator=generator)  # seeds[i]: index i's
        mine = order[self.rank:len(self) * self.world_size:self.world_size][self.start:]
        return iter(zip(mine.tolist(), seeds[mine].tolist()))


def _seed_sample(seed):
    torch.default_generator.manual_seed(seed)  # the CPU generator alone: CUDA's stream is the step's
    np.random.seed(seed % 2**32)
    random.seed(seed)


class SeededSamples(torch.utils.data.Dataset):
    """dataset[index] for a key (index, seed): torch's CPU, numpy's and Python's RNGs are seeded
    with `seed` for that one sample. In the main process (no loader workers) the caller's RNG
    state is restored after it; a worker's RNGs serve its samples alone, and saving numpy's state
    would cost more than most samples (60 us)."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        index, seed = key
        if torch.utils.data.get_worker_info() is not None:
            _seed_sample(seed)
            return self.dataset[index]
        saved = torch.get_rng_state(), np.random.get_state(), random.getstate()
        _seed_sample(seed)
        try:
            return self.dataset[index]
        finally:
            torch.set_rng_state(saved[0])
            np.random.set_state(saved[1])
            random.setstate(saved[2])


def _ignore_stop_signals(worker_id):
    """Loader workers leave SIGINT and SIGTERM to the main process, which finishes its step and
    saves (utils.preemption); a worker that died of them would fail the step instead."""
    del worker_id
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def make_loader(dataset, batch_size: int, workers: int, train: bool, seed: int = 0,
                persistent_workers: bool = False):
    """(loader, sampler) over this rank's share of `dataset`.

    train: an EpochSampler (random order per epoch, every sample drawn from its own seed), the
    last partial batch dropped (every step has the full batch); iterate it with `epoch_batches`.
    Otherwise in dataset order; under torchrun each rank reads every world_size-th index and the
    sampler pads the last round with repeats, which evaluation code removes by index
    (`list(sampler)`).
    persistent_workers: keep the workers from one epoch to the next (starting them cost the
    Fashion-MNIST teacher about 1.5 s an epoch on 2 cores); end them with `stop_workers`.
    """
    collate = getattr(dataset, 'collate', None)  # datasets may bring their own
    if train:
        sampler = EpochSampler(len(dataset), seed, dist.get_rank(), dist.get_world_size())
        dataset = SeededSamples(dataset)
    elif dist.is_dist():
        sampler = DistributedSampler(dataset, shuffle=False)
    else:
        sampler = SequentialSampler(dataset)
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                        pin_memory=torch.cuda.is_available(), drop_last=train,
                        persistent_workers=persistent_workers and workers > 0,
                        worker_init_fn=_ignore_stop_signals, collate_fn=collate)
    return loader, sampler


def stop_workers(loader):
    """End the workers a `persistent_workers` loader keeps; call it in a `finally`. After an
    exception the traceback keeps the loader alive into the interpreter's exit, where
    multiprocessing waits forever for workers that ignore SIGTERM (`_ignore_stop_signals`)."""
    iterator = loader._iterator  # DataLoader's iterator of its persistent workers (None until iterated)
    if iterator is not None:
        iterator._shutdown_workers()
        loader._iterator = None


def epoch_batches(loader, seed: int, epoch: int, rank: int, first_step: int = 0, rng=None):
    """enumerate() over epoch `epoch` of a training loader, from step `first_step`.

    Reseeds the process (seed_epoch), starts the sampler after the batches already trained, and,
    for a run resumed mid-epoch, restores the process's RNG state at that step (`rng`, saved by
    `rng_state`) once the loader has drawn its own seeds.
    """
    seed_epoch(seed, epoch, rank)
    loader.sampler.set_epoch(epoch, first_step * loader.batch_size)
    batches = iter(loader)
    if rng is not None:
        set_rng_state(rng)
    return enumerate(batches, start=first_step)


def rng_state(device) -> dict:
    """This process's RNG state (torch CPU, CUDA of `device`, numpy, Python) in types a
    weights-only torch.load reads."""
    numpy_state = np.random.get_state(legacy=False)
    state = {'torch': torch.get_rng_state(),
             'numpy': {'key': torch.from_numpy(numpy_state['state']['key'].astype(np.int64)),
                       'pos': numpy_state['state']['pos'], 'has_gauss': numpy_state['has_gauss'],
                       'gauss': numpy_state['gauss']},
             'python': random.getstate()}
    if device.type == 'cuda':
        state['cuda'] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict):
    """Restore what rng_state saved (CUDA on the current device)."""
    torch.set_rng_state(state['torch'])
    numpy_state = state['numpy']
    np.random.set_state({'bit_generator': 'MT19937',
                         'state': {'key': numpy_state['key'].numpy().astype(np.uint32), 'pos': numpy_state['pos']},
                         'has_gauss': numpy_state['has_gauss'], 'gauss': numpy_state['gauss']})
    random.setstate(state['python'])
    if 'cuda' in state:
        torch.cuda.set_rng_state(state['cuda'])
