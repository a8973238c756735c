"""The neighbour file: stage 1's output and stage 2's bags.

`path` is an (N, k) integer .npy whose row i holds the dataset indices of image i's
k nearest neighbours, nearest first. A JSON sidecar `path + '.json'` records how it
was made, N, k and the `dataset_fingerprint` of the ImageFolder it indexes, so a
file built for another dataset, or for the same images listed in another order,
is refused instead of silently producing wrong bags.
"""
import json
import os

import numpy as np

from utils.checkpoint import write_atomic, write_json_atomic
from utils.errors import UserError


class NeighbourFileError(UserError, ValueError):
    """A neighbour file that does not fit the dataset it is used with."""


def sidecar_path(path):
    return os.fspath(path) + '.json'


def save_neighbours(path, neighbours, meta):
    """Write the (N, k) index array to path (.npy) and meta + N, k to path + '.json'."""
    path = os.fspath(path)
    neighbours = np.asarray(neighbours)
    if neighbours.ndim != 2 or neighbours.dtype.kind not in 'iu':
        raise NeighbourFileError(f'neighbours for {path} must be a 2-D integer array, '
                                 f'got shape {neighbours.shape} dtype {neighbours.dtype}')
    n, k = neighbours.shape
    sidecar = dict(meta, N=n, k=k)
    write_atomic(path, lambda f: np.save(f, neighbours.astype(np.int64, copy=False)))
    write_json_atomic(sidecar, sidecar_path(path))


def _read_sidecar(path):
    sidecar = sidecar_path(path)
    try:
        with open(sidecar) as f:
            return json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise NeighbourFileError(f'cannot read the sidecar {sidecar} of neighbours file {path}: {e}') from e


def load_neighbours(path, dataset_size, fingerprint):
    """Read path and check it against the dataset; returns (N, k) int64.

    fingerprint: the dataset's ImageFolder.fingerprint(); the sidecar must exist and
    match it. None skips the sidecar (e.g. a bare .npy from the released scripts),
    though a sidecar that is present must still agree with the array's shape.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise NeighbourFileError(f'neighbours file {path} does not exist (run stage 1, knn_extract.py)')
    try:
        neighbours = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise NeighbourFileError(f'cannot read neighbours file {path}: {e}') from e
    if neighbours.ndim != 2 or neighbours.dtype.kind not in 'iu' or neighbours.shape[1] == 0:
        raise NeighbourFileError(f'neighbours file {path} holds shape {neighbours.shape} dtype '
                                 f'{neighbours.dtype}; expected an (N, k) integer array with k >= 1')
    n, k = neighbours.shape
    if n != dataset_size:
        raise NeighbourFileError(f'neighbours file {path} has {n} rows but the dataset has '
                                 f'{dataset_size} images')
    neighbours = neighbours.astype(np.int64, copy=False)
    bad_rows = np.flatnonzero(((neighbours < 0) | (neighbours >= n)).any(axis=1))
    if bad_rows.size:
        row = int(bad_rows[0])
        raise NeighbourFileError(f'neighbours file {path}: row {row} holds {neighbours[row].tolist()}, '
                                 f'outside the dataset\'s indices 0..{n - 1} ({bad_rows.size} such rows)')
    self_rows = np.flatnonzero((neighbours == np.arange(n)[:, None]).any(axis=1))
    if self_rows.size:
        row = int(self_rows[0])
        raise NeighbourFileError(f'neighbours file {path}: row {row} lists image {row} itself '
                                 f'({neighbours[row].tolist()}; {self_rows.size} such rows)')

    sidecar = _read_sidecar(path)
    if sidecar is None:
        if fingerprint is None:
            return neighbours
        raise NeighbourFileError(f'neighbours file {path} has no sidecar {sidecar_path(path)}, so it '
                                 f'cannot be checked against the dataset (fingerprint {fingerprint})')
    if (sidecar.get('N'), sidecar.get('k')) != (n, k):
        raise NeighbourFileError(f'sidecar {sidecar_path(path)} describes N={sidecar.get("N")}, '
                                 f'k={sidecar.get("k")} but {path} has shape ({n}, {k})')
    if fingerprint is not None and sidecar.get('dataset_fingerprint') != fingerprint:
        raise NeighbourFileError(f'fingerprint {sidecar.get("dataset_fingerprint")} (from '
                                 f'{sidecar_path(path)}) != dataset\'s {fingerprint}: {path} was '
                                 f'built for other images or another order')
    return neighbours


def bag_precision(neighbours, targets):
    """Share of neighbours whose class equals their anchor's: how pure the bags are."""
    targets = np.asarray(targets)
    neighbours = np.asarray(neighbours)
    return float((targets[neighbours] == targets[:, None]).mean())
