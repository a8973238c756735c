"""The neighbour file: stage 1's output and stage 2's bags.

`path` is an (N, k) integer .npy whose row i holds the dataset indices of image i's
k nearest neighbours, nearest first. A JSON sidecar `path + '.json'` records how it
was made, N, k and the `dataset_fingerprint` of the ImageFolder it indexes, so a
file built for another dataset, or for the same images listed in another order,
is refused instead of silently producing wrong bags. The released scripts write the
same array with no sidecar (format 'released'); it is read here too, checked as far
as a bare array allows.
"""
import json
import os

import numpy as np

from utils.atomic import write_atomic, write_json_atomic
from utils.errors import UserError


FORMATS = ('sidecar', 'released')


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


def read_sidecar(path):
    """The sidecar of neighbour file `path` as a dict (how the file was made), or None if it has none."""
    sidecar = sidecar_path(path)
    try:
        with open(sidecar) as f:
            return json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise NeighbourFileError(f'cannot read the sidecar {sidecar} of neighbours file {path}: {e}') from e


def load_neighbours(path, dataset_size, fingerprint, fmt='sidecar', k=None, report=None):
    """Read path and check it against the dataset; returns (N, k) int64.

    fmt 'sidecar': this project's file. fingerprint: the dataset's ImageFolder.fingerprint(); the
      sidecar must exist and match it. None skips the sidecar, though a sidecar that is present
      must still agree with the array's shape.
    fmt 'released': a bare .npy as the released compute_knn.py writes it, with no sidecar. Its
      shape, dtype and index range are checked; which images, in which order, it was built from
      cannot be, and `report` is told so. Rows listing the image itself (a duplicate image took
      the search's column 0, which the release drops) are used as they are, as the released
      trainer does, and counted in the report.
    k: use the first k columns only (the released trainer's --clus_pos_num); None: all of them.
    report: called with each line the user should read about the file (rank 0 passes print).
    """
    if fmt not in FORMATS:
        raise NeighbourFileError(f"unknown neighbours format '{fmt}' for {path}; choose one of {FORMATS}")
    report = report or (lambda line: None)
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
    n, width = neighbours.shape
    if n != dataset_size:
        raise NeighbourFileError(f'neighbours file {path} has {n} rows but the dataset has '
                                 f'{dataset_size} images')
    if k is not None and not 1 <= k <= width:
        raise NeighbourFileError(f'neighbours file {path} has {width} neighbours per image; '
                                 f'the first {k} were asked for (--clus_pos_num)')
    # Only the columns used are checked: the released trainer never reads the others.
    neighbours = neighbours[:, :k].astype(np.int64, copy=False)
    bad_rows = np.flatnonzero(((neighbours < 0) | (neighbours >= n)).any(axis=1))
    if bad_rows.size:
        row = int(bad_rows[0])
        raise NeighbourFileError(f'neighbours file {path}: row {row} holds {neighbours[row].tolist()}, '
                                 f'outside the dataset\'s indices 0..{n - 1} ({bad_rows.size} such rows)')

    sidecar = read_sidecar(path)
    _check_self(path, neighbours, fmt == 'released' or (sidecar or {}).get('self_removal') == 'first_column',
                report)
    if sidecar is None:
        if fmt == 'released':
            used = f', the first {neighbours.shape[1]} columns used' if neighbours.shape[1] < width else ''
            report(f'neighbours file {path}: released format, {n} x {width}{used}; checked: one row per '
                   f'dataset image, integer indices in 0..{n - 1}. NOT checked: that it was built from '
                   f'these images in this order (a bare .npy records no dataset fingerprint); bags built '
                   f'for another copy or order of the dataset would train without any error.')
            return neighbours
        if fingerprint is None:
            return neighbours
        raise NeighbourFileError(f'neighbours file {path} has no sidecar {sidecar_path(path)}, so it '
                                 f'cannot be checked against the dataset (fingerprint {fingerprint}); '
                                 f'a bare .npy of the released scripts needs --neighbours_format=released')
    if (sidecar.get('N'), sidecar.get('k')) != (n, width):
        raise NeighbourFileError(f'sidecar {sidecar_path(path)} describes N={sidecar.get("N")}, '
                                 f'k={sidecar.get("k")} but {path} has shape ({n}, {width})')
    if fingerprint is not None and sidecar.get('dataset_fingerprint') != fingerprint:
        raise NeighbourFileError(f'fingerprint {sidecar.get("dataset_fingerprint")} (from '
                                 f'{sidecar_path(path)}) != dataset\'s {fingerprint}: {path} was '
                                 f'built for other images or another order')
    return neighbours


def _check_self(path, neighbours, allowed, report):
    """Rows listing their own image: refused, unless the file was made by the released rule
    (`allowed`), which keeps the image itself where a duplicate outranked it; those are reported.
    A column 0 that is the image itself in every row is a raw search result, never a bag file."""
    own = neighbours == np.arange(len(neighbours))[:, None]
    self_rows = np.flatnonzero(own.any(axis=1))
    if not self_rows.size:
        return
    row = int(self_rows[0])
    if allowed and own[:, 0].all():
        raise NeighbourFileError(f'neighbours file {path}: column 0 of every row is the image itself, '
                                 f'so it is a raw search result; the released compute_knn.py drops that '
                                 f'column before saving (keep [:, 1:])')
    if not allowed:
        raise NeighbourFileError(f'neighbours file {path}: row {row} lists image {row} itself '
                                 f'({neighbours[row].tolist()}; {self_rows.size} such rows)')
    report(f'neighbours file {path}: {self_rows.size} of {len(neighbours)} rows list the image itself '
           f'(e.g. row {row}: {neighbours[row].tolist()}), where a duplicate image outranked it in the '
           f'search; used as they are, as the released trainer does')


def bag_precision(neighbours, targets):
    """Share of neighbours whose class equals their anchor's: how pure the bags are."""
    targets = np.asarray(targets)
    neighbours = np.asarray(neighbours)
    return float((targets[neighbours] == targets[:, None]).mean())
